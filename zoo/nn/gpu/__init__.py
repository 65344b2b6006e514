"""The ``triton`` backend (`zoo.nn.backends`): the fused recurrences of the normalized LSTM and GRU cells and of
bn_indrnn with their per-step work in Triton kernels, for CUDA.

Per time step and direction, forward: the recurrent GEMM (`torch.mm`, cuBLAS on a GPU) and ONE Triton kernel for
everything else (the norms of W_h h and of c_t, batch statistics included, the gates, the state update, the output);
backward: one kernel and one GEMM. The weight and gain gradients are large products and reductions after the loop.
bn_indrnn, elementwise, runs all steps in one launch each way. `LAUNCHES` counts what the loops launch (the tests
assert the count per step). The algorithm is `zoo.nn.fused`'s (packed rows: at step t the first ``batch_sizes[t]``
rows run), so the results equal the other backends'.

On a CPU the kernels run under Triton's interpreter (numpy) when ``TRITON_INTERPRET=1`` is set before this backend
first runs; ``backend="auto"`` never picks it there. The kernels live in `zoo.nn.gpu.kernels`, the autograd functions
in `zoo.nn.gpu.recurrence`; both are imported on first use, so that importing `zoo.nn` needs no Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter

import torch

LAUNCHES: Counter[str] = Counter()  # "kernel" (Triton launches) and "gemm" (torch.mm calls) made by the step loops
INSTALL = "pip install 'zoo[triton]'"


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton then runs its kernels with numpy on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def installed() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def unusable(device: torch.device) -> str | None:
    """Why the ``triton`` backend cannot run on ``device`` here, or None if it can."""
    if not installed():
        return f"Triton is not installed (`{INSTALL}`)"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"the Triton kernels run on cuda (or on the CPU under Triton's interpreter), not on {device.type}"
    if not interpret_requested():
        return "on the CPU the Triton kernels run only under Triton's interpreter: set TRITON_INTERPRET=1"
    kernels = sys.modules.get(__name__ + ".kernels")
    if kernels is not None and not kernels.INTERPRETED:
        return "the Triton kernels were defined before TRITON_INTERPRET=1 was set (set it before their first use)"
    return None


def lstm_recurrence(cell, u: torch.Tensor, state: tuple[torch.Tensor, ...], layout):
    """A normalized LSTM cell's `fused_recurrence` on this backend (`recurrence.TritonLSTM`)."""
    from ..fused import StepNorm
    from .recurrence import TritonLSTM

    mh, mc = cell.norm_at(1), cell.norm_at(2)
    nh, nc = StepNorm(mh), StepNorm(mc)
    grad = torch.is_grad_enabled()
    out, h, c = TritonLSTM.apply(u, *state, cell.weight_hh, *nh.params(), *nc.params(), layout, nh, nc, grad)
    return out, (h, c)


def gru_recurrence(cell, u: torch.Tensor, state: tuple[torch.Tensor, ...], layout):
    """A normalized GRU cell's `fused_recurrence` on this backend (`recurrence.TritonGRU`)."""
    from ..fused import StepNorm
    from .recurrence import TritonGRU

    b_hn = None if cell.bias_hh is None else cell.bias_hh[2 * cell.hidden_size :]  # (the r, z part is in u)
    n_rz, n_n = StepNorm(cell.norm_at(2)), StepNorm(cell.norm_at(3), shift=b_hn)
    grad = torch.is_grad_enabled()
    out, h = TritonGRU.apply(u, state[0], cell.weight_hh, b_hn, *n_rz.params(), *n_n.params(), layout, n_rz, n_n, grad)
    return out, (h,)


def indrnn_recurrence(cell, u: torch.Tensor, state: tuple[torch.Tensor, ...], layout):
    """bn_indrnn's `fused_recurrence` on this backend (`recurrence.TritonIndRNN`)."""
    from .recurrence import TritonIndRNN

    out, h = TritonIndRNN.apply(u, state[0], cell.weight_hh, layout)
    return out, (h,)
