"""The fused recurrence: a hand-written backward through time for the normalized LSTM and GRU cells.

The cell's input term, W_x x and its normalization, is computed for all steps at once (`normalize_input`: one autograd
node), or, in the normalized LSTMs' inference, a step at a time inside the compiled loop (`DeferredInput`); what
remains, the recurrence, runs in one `torch.autograd.Function` whose backward is written out step by step, with the
weight and gain gradients taken as large products after (W_h: in chunks during) the loop. The sequences are
processed in `PackedSequence` order (sorted by length, time-major): at step t only the first ``batch_sizes[t]`` rows are
still running, so a masked batch statistic is a statistic over a prefix, and finished rows cost nothing.

What makes it fast, from measurement on CPU: for the LSTM and GRU families the whole loop over steps runs in the
compiled extension (``zoo/nn/csrc/``, built by ``python -m zoo.nn.build``), its recurrent products through
oneDNN's brgemm micro-kernel (`at::native::cpublas::brgemm`, which picks its instruction set at run time) over W_h
packed once per sequence (`Panels`; a call of oneDNN's linear costs more than a small step's arithmetic), each step's
normalizations, gates and state update in one pass per row: with per-sample norms the LSTM loop gives each thread its
rows for all steps (no barrier between steps), a training batch norm combines its statistics across threads at barriers;
tanh(x) = 2σ(2x) − 1 lets one sigmoid cover all four LSTM gates (the candidate block of the pre-activations is doubled).
Without the extension, a Python loop calls oneDNN's GEMM with the weights packed once per sequence and the vendor
kernels `native_layer_norm`, `_fused_rms_norm` and `native_batch_norm` (and their backward kernels), one per step and
norm.
The ``reference`` backend (`zoo.nn.backends`) defines the result; the tests hold all of them equal.
"""

from .gemm import Linear, Panels, extension_available, linear, outer, outer_add
from .gru import FusedGRU
from .indrnn import FusedIndRNN
from .input_term import DeferredInput, defer_input, normalize_input
from .lstm import FusedLSTM
from .packed import Layout, OuterSum, candidate_scale, run_packed
from .step_norm import StepNorm

__all__ = [
    "DeferredInput",
    "FusedGRU",
    "FusedIndRNN",
    "FusedLSTM",
    "Layout",
    "Linear",
    "OuterSum",
    "Panels",
    "StepNorm",
    "candidate_scale",
    "defer_input",
    "extension_available",
    "linear",
    "normalize_input",
    "outer",
    "outer_add",
    "run_packed",
]
