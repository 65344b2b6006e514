"""The GEMMs of the fused recurrence: oneDNN's linear with weights packed once per sequence, the compiled loops'
weight blocks (`Panels`), and outer products into the weight gradients."""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext


def extension_available() -> bool:
    """Whether the compiled loops (`zoo.nn._ext`, built by ``python -m zoo.nn.build``) are loaded and enabled."""
    return _ext.load() is not None


class Linear:
    """``x @ weight.T`` for a weight fixed during one sequence, through oneDNN's prepacked GEMM where it applies."""

    def __init__(self, weight: Tensor, rows: int) -> None:
        self.weight = weight
        self.packed = None
        if _onednn(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            except (RuntimeError, AttributeError):  # a build without oneDNN's linear: plain GEMM
                self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return torch.mm(x, self.weight.t())
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def add(self, x: Tensor, other: Tensor) -> Tensor:
        """``x @ weight.T + other``."""
        if self.packed is None:
            return torch.addmm(other, x, self.weight.t())
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, None, "add")


class Panels:
    """A recurrent weight as the compiled loops take it: ``weight``, and for float32 its blocks for the extension's
    brgemm calls (``pack_panels``: blocks of ``ext.PANEL_WIDTH`` output features, 64 in the AVX-512 build and 32 below
    it, packed once per sequence) in ``packed``, bfloat16 where ``bf16`` (`bf16_products`); float64, and a build
    without brgemm (``ext.brgemm`` false: not x86-64), go through `torch.mm`."""

    def __init__(self, ext, weight: Tensor, bf16: bool = False) -> None:
        self.weight = weight
        self.packed = ext.pack_panels(weight, bf16) if weight.dtype == torch.float32 and ext.brgemm else None


def bf16_products(ext, u: Tensor) -> bool:
    """Whether the compiled loops run their recurrent GEMMs in bfloat16 (float32 accumulation): under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` with a float32 input, where oneDNN packs bfloat16 for the CPU's
    matrix unit (``ext.brgemm_bf16``: AMX). The norms, gates and cell state stay float32. Elsewhere autocast is logged
    once and the products stay float32."""
    if u.dtype != torch.float32 or not torch.is_autocast_enabled("cpu"):
        return False
    if torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    if not (ext.brgemm and ext.brgemm_bf16):
        _ext.say_once(
            "autocast bfloat16: this CPU has no bfloat16 matrix unit oneDNN packs for (AMX); the recurrent "
            "GEMMs of the compiled loops stay float32"
        )
        return False
    return True


def _onednn(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()


@functools.cache
def _onednn_outer_cpu() -> bool:
    """Whether this CPU takes the weight gradients through oneDNN rather than MKL: AVX-512 on a CPU not Intel's (on an
    AMD EPYC Zen 4, a training step with oneDNN's took 3% less time at 1000 units and as long at 256 and 512 units, in
    alternation with MKL's in one process). On Intel's AVX-512 CPUs MKL's in-place
    `torch.Tensor.addmm_` is the faster one (a Xeon: 230 GFLOP/s against 145 for oneDNN's product plus the add, one
    1024-row chunk of W_h's gradient at 1000 units on 2 cores), and on AVX2 CPUs MKL leads too (Zen 3: 1.15-1.7x)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_vendor() != "GenuineIntel"


def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), from /proc/cpuinfo, else `platform`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "GenuineIntel" if "Intel" in platform.processor() else platform.processor()


def _outer_onednn(t: Tensor) -> bool:
    """Whether `outer` goes through oneDNN for ``t``: float32 on a CPU where oneDNN is the faster
    (`_onednn_outer_cpu`)."""
    return _onednn(t) and _onednn_outer_cpu()


def outer(a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` (a weight gradient: ``(N, F)``, ``(N, H)`` -> ``(F, H)``), through the faster GEMM of this CPU.

    It is computed as ``(b.T @ a).T``, a transposed view: through MKL (`torch.mm`) this order ran 1.2-1.7x faster
    than ``a.T @ b`` at the input term's shapes (``b`` the input features) on a Xeon. Through oneDNN
    (`_outer_onednn`) with its linear: ``b.T`` (the smaller operand) is copied, ``a`` is read in place as the linear's
    weight.
    """
    if not _outer_onednn(a):
        return b.t().mm(a).t()
    return torch.ops.mkldnn._linear_pointwise(b.t().contiguous(), a.t(), None, "none", [], "").t()


def outer_add(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a.T @ b`` for ``out`` in `outer`'s layout: in place through `torch.Tensor.addmm_` (MKL), or, through
    oneDNN, its product added."""
    if _outer_onednn(a):
        out.add_(outer(a, b))
    else:
        out.addmm_(a.t(), b)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = Linear(weight.t().contiguous(), dy.shape[0])(dy) if ctx.needs_input_grad[0] else None
        dw = outer(dy, x) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`torch.nn.functional.linear`, through oneDNN's GEMM (forward and backward) for float32 on CPU."""
    if not _onednn(x) or x.numel() == 0:
        return F.linear(x, weight, bias)
    y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
