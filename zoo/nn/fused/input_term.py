"""The input term N(W_x x) + b for all steps at once, in one autograd node."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..norm import MaskedBatchNorm
from . import common
from .common import _grads, recording
from .gemm import Linear, Panels, outer
from .packed import Layout
from .step_norm import StepNorm, _extension


def normalize_input(
    module: nn.Module,
    x: Tensor,
    proj: Tensor | None,
    shift: Tensor | None,
    mask: Tensor | None,
    keep_projection: bool = False,
) -> Tensor | None:
    """``module(x @ proj.T) + shift`` (``proj`` None: ``module(x) + shift``) for the input term of all steps, ``x``
    ``(T, B, ·)``, in one autograd node whose normalization is one compiled pass each way.

    It applies to LayerNorm and RMSNorm, to a batch norm in evaluation, and to one in training without padding
    (``mask`` None) or synchronization; elsewhere (and without the compiled extension) it returns None and the caller
    runs the module. The shift (the cell's bias) is added inside the normalization's pass. Where the input is narrow (at
    most an eighth of the projection's width, as a first layer usually is) the projection is not kept for backward but
    recomputed there, a block at a time: GEMMs of a few rows instead of a (T, B, 4H) tensor held through the backward,
    unless ``keep_projection`` (the LSTM cells: their training steps were 1-4% faster with it at every shape of
    ``benchmarks/speed.py``, for one tensor of the projection's size more).
    """
    norm = StepNorm(module)
    if norm.kind == "bn":
        bn: MaskedBatchNorm = module
        if bn.training and (mask is not None or bn.synchronized):
            return None
        if bn.per_step and bn.past_max_steps == "error" and x.shape[0] > bn.max_steps:
            return None  # the module raises its error
    if x.dim() != 3 or norm.weight is None:
        return None
    x = x.contiguous()  # (a batch-first layer's input arrives as a transposed view: a copy costs less than no fusion)
    ext = _extension(x, *(t for t in (proj, shift) if t is not None), norm)
    if ext is None:
        return None
    if norm.bias is not None:
        shift = norm.bias if shift is None else norm.bias + shift
    recompute = proj is not None and not keep_projection and 8 * proj.shape[1] <= proj.shape[0]
    return _InputNorm.apply(x, proj, norm.weight, shift, norm, ext, recompute, torch.is_grad_enabled())


class _InputNorm(torch.autograd.Function):
    """`normalize_input`'s node: the projection, then the compiled `norm_rows` kernels on the ``(T·B, F)`` rows (a
    batch norm with per-step statistics: one group of B rows per step). The forward projects and normalizes a block of
    about `common.BLOCK` elements at a time while it is in cache (the projection through brgemm over the weight's
    `Panels`, as the recurrent GEMM, written straight into the kept projection where it is kept; float64: ATen's
    GEMM), except for a batch norm whose statistics span all rows (oneDNN's linear over all rows first)."""

    @staticmethod
    def forward(ctx, x, proj, weight, shift, norm: StepNorm, ext, recompute: bool, grad: bool):
        steps, batch = x.shape[:2]
        rows = x.view(steps * batch, x.shape[2])
        features = rows.shape[1] if proj is None else proj.shape[0]
        n = ext.Norm()
        n.fw, n.fb, n.w = weight, shift, weight
        n.eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        groups = 1
        if norm.kind in ("ln", "rms"):
            n.kind = ext.Kind.LN if norm.kind == "ln" else ext.Kind.RMS
            n.mean = x.new_empty(steps * batch) if norm.kind == "ln" else None
            n.rstd = x.new_empty(steps * batch)
        elif norm.module.training:
            bn: MaskedBatchNorm = norm.module
            groups = steps if bn.per_step else 1
            n.kind, n.per_step, n.momentum = ext.Kind.BN_TRAIN, bn.per_step, bn.momentum
            n.mean, n.rstd = x.new_empty(groups, features), x.new_empty(groups, features)
            n.rm, n.rv = bn.running_mean, bn.running_var
        else:  # evaluation: each step's affine map from the running statistics (`StepNorm.start`), shift included
            groups = steps if norm.module.per_step else 1
            norm.start(groups, x)
            n.kind, n.mean, n.rstd = ext.Kind.AFFINE, norm.eval_mean.contiguous(), norm.eval_rstd.contiguous()
            n.fw = n.rstd * weight
            n.fb = -n.mean * n.fw if shift is None else shift - n.mean * n.fw
        ctx.blocked = proj is not None and (
            n.kind != ext.Kind.BN_TRAIN or groups > 1
        )  # (not a batch norm's statistics of all rows)
        if ctx.blocked:
            keep = not recompute and recording(ctx, grad)  # (inference: no projection to keep)
            p = x.new_empty(rows.shape[0], features) if keep else None
            y = x.new_empty(steps, batch, features)
            ext.norm_rows_project(
                n, rows, proj, Panels(ext, proj).packed, y.view(-1, features), groups, p, common.BLOCK
            )
        else:
            p = rows if proj is None else Linear(proj, rows.shape[0])(rows)
            y = x.new_empty(steps, batch, features)
            ext.norm_rows_forward(n, p, y.view_as(p), groups)
        ctx.save_for_backward(x, proj, None if recompute or proj is None else p)
        ctx.norm, ctx.groups, ctx.ext = n, groups, ext
        return y

    @staticmethod
    def backward(ctx, dy):
        x, proj, p = ctx.saved_tensors
        rows = x.view(-1, x.shape[-1])
        n = ctx.norm
        n.dw = torch.zeros_like(n.w) if ctx.needs_input_grad[2] else None
        n.db = n.w.new_zeros(n.w.shape) if ctx.needs_input_grad[3] else None
        dy = dy.contiguous().view(rows.shape[0], -1)
        if ctx.blocked and p is None:  # the projection recomputed a block at a time
            dp = torch.empty_like(dy)
            panels = Panels(ctx.ext, proj).packed
            ctx.ext.norm_rows_project_backward(n, dy, rows, proj, panels, dp, ctx.groups, common.BLOCK)
        else:
            if proj is None:
                p = rows
            elif p is None:  # recompute the projection
                p = Linear(proj, rows.shape[0])(rows)
            dp = torch.empty_like(dy)
            ctx.ext.norm_rows_backward(n, dy, p, dp, ctx.groups)
        if proj is None:
            return _grads(ctx, dp.view_as(x), None, n.dw, n.db)
        dx = Linear(proj.t().contiguous(), dp.shape[0])(dp).view_as(x) if ctx.needs_input_grad[0] else None
        dproj = outer(dp, rows) if ctx.needs_input_grad[1] else None
        return _grads(ctx, dx, dproj, n.dw, n.db)


@dataclass
class DeferredInput:
    """An LSTM's input term N(W_x x) + b left for the compiled loop to compute a step at a time (`defer_input`), so
    that no ``(T, B, 4H)`` tensor is written to memory and read back: ``x`` ``(T, B, I)``, or ``(N, I)`` in packed order
    once `run_packed` has packed it; ``proj`` W_x; ``kind`` "ln", "rms" or "affine" (a batch norm in evaluation,
    ``gain`` and ``shift`` a row per step); ``shift`` includes the cell's bias."""

    x: Tensor
    proj: Tensor
    kind: str
    gain: Tensor
    shift: Tensor | None
    eps: float

    def with_rows(self, rows: Tensor) -> DeferredInput:
        return replace(self, x=rows)

    def ext_norm(self, ext, rows: int):
        """The compiled loop's `Norm` for a step of at most ``rows`` rows."""
        n = ext.Norm()
        n.fw, n.fb, n.eps = self.gain, self.shift, self.eps
        n.kind = {"ln": ext.Kind.LN, "rms": ext.Kind.RMS, "affine": ext.Kind.AFFINE}[self.kind]
        if self.kind != "affine":
            n.mean = self.x.new_empty(rows) if self.kind == "ln" else None
            n.rstd = self.x.new_empty(rows)
        return n

    def materialize(self, layout: Layout) -> Tensor:
        """The input term of the packed rows, where the compiled loop does not run after all."""
        p = self.x @ self.proj.t()
        if self.kind == "ln":
            return F.layer_norm(p, p.shape[-1:], self.gain, self.shift, self.eps)
        if self.kind == "rms":
            p = F.rms_norm(p, p.shape[-1:], self.gain, self.eps)
            return p if self.shift is None else p + self.shift
        step = torch.repeat_interleave(torch.tensor(layout.batch_sizes)).to(p.device)  # each packed row's step
        return torch.addcmul(self.shift[step], p, self.gain[step])


def defer_input(module: nn.Module, x: Tensor, proj: Tensor, shift: Tensor | None) -> DeferredInput | None:
    """``normalize_input(module, x, proj, shift)`` as a `DeferredInput`, where the compiled LSTM loop computes it: in
    inference (autograd off), float32, on a CPU with brgemm, for LayerNorm, RMSNorm and a batch norm in evaluation;
    else None. On 2 cores of an AVX-512 Xeon this made inference 4-7% faster at 256 and 512 units (docs/speed.md)."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.dim() != 3:
        return None
    norm = StepNorm(module, shift=shift)
    if norm.weight is None or (norm.kind == "bn" and module.training):
        return None
    if norm.kind == "bn" and module.per_step and module.past_max_steps == "error" and x.shape[0] > module.max_steps:
        return None  # the module raises its error
    x = x.contiguous()  # (after the checks: a declined deferral leaves the copy to normalize_input)
    ext = _extension(x, proj, *(t for t in (shift,) if t is not None), norm)
    if ext is None or not ext.brgemm:
        return None
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    if norm.kind in ("ln", "rms"):
        return DeferredInput(x, proj, norm.kind, norm.fwd_weight, norm.fwd_bias, eps)
    norm.start(x.shape[0], x)
    return DeferredInput(x, proj, "affine", norm.eval_scale.contiguous(), norm.eval_shift.contiguous(), eps)
