"""The fused recurrence: a hand-written backward through time for the normalized LSTM and GRU cells.

The cell's input term, W_x x and its normalization, is computed for all steps at once (`normalize_input`: one autograd
node); what remains, the recurrence, runs in one `torch.autograd.Function` whose backward is written out step by step,
with the weight and gain gradients taken as large products after (W_h: in chunks during) the loop. The sequences are
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

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _ext
from .backends import compiled_allowed
from .norm import MIN_ROWS, MaskedBatchNorm

aten = torch.ops.aten

BLOCK = 1 << 19  # elements worked on at a time where a whole tensor would not stay in cache (input term, IndRNN dw)


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
    brgemm calls (``pack_panels``: blocks of 64 output features, packed once per sequence) in ``packed``; float64, and
    a build without brgemm (``ext.brgemm`` false: not x86-64), go through `torch.mm`."""

    def __init__(self, ext, weight: Tensor) -> None:
        self.weight = weight
        self.packed = ext.pack_panels(weight) if weight.dtype == torch.float32 and ext.brgemm else None


def _onednn(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()


@functools.cache
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _outer_onednn(t: Tensor) -> bool:
    """Whether `outer` goes through oneDNN for ``t``: float32 on a CPU with AVX-512, where MKL (`torch.mm`) runs these
    shapes at about half of oneDNN's speed (AMD EPYC, Zen 4). On an AVX2 CPU (Zen 3) MKL is the faster one, by
    1.15–1.7× (`benchmarks/speed.py`'s weight gradients)."""
    return _onednn(t) and _avx512()


def outer(a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` (a weight gradient: ``(N, F)``, ``(N, H)`` -> ``(F, H)``), through the faster GEMM of this CPU.

    Through oneDNN (`_outer_onednn`) it is computed as ``(b.T @ a).T`` with oneDNN's linear: ``b.T`` (the smaller
    operand: the hidden or input features) is copied, ``a`` is read in place as the linear's weight, and the result is
    a transposed view; else it is `torch.mm`'s.
    """
    if not _outer_onednn(a):
        return a.t().mm(b)
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


class StepNorm:
    """One normalization inside the recurrence, applied step by step without autograd.

    ``kind``: "none", "ln" (LayerNorm), "rms" (RMSNorm) or "bn" (`MaskedBatchNorm`). A batch norm with per-step
    statistics uses row t of its running statistics at step t (the last row past ``max_steps``); one with shared
    statistics (``max_steps=None``) uses its single row at every step: training normalizes each step with that step's
    batch statistics and moves the one running set at every step, evaluation reads it at every step.
    ``scale`` (a vector over the features, or None) multiplies the output in the forward pass only: the doubled
    candidate block of the sigmoid trick, at no extra kernel. ``shift`` (a tensor or None) is a bias added after the
    normalization (the GRU's b_hn, which the reset gate multiplies); its gradient is the caller's.
    """

    def __init__(self, module: nn.Module | None, scale: Tensor | None = None, shift: Tensor | None = None) -> None:
        if module is None:
            self.kind = "none"
        elif isinstance(module, nn.LayerNorm):
            self.kind = "ln"
        elif isinstance(module, nn.RMSNorm):
            self.kind = "rms"
        elif isinstance(module, MaskedBatchNorm):
            self.kind = "bn"
        else:
            raise TypeError(f"no fused path for {module!r}")
        self.module = module
        self.weight = getattr(module, "weight", None)
        self.bias = getattr(module, "bias", None)
        self.eps = getattr(module, "eps", None)
        with torch.no_grad():
            w = self.weight if self.weight is not None else None
            b = self.bias
            if b is not None and shift is not None:
                b = b + shift
            elif b is None:
                b = shift
            if scale is not None:
                w = scale if w is None else w * scale
                b = None if b is None else b * scale
            self.fwd_weight, self.fwd_bias = w, b
        self.stats: list[tuple[Tensor, ...]] = []
        self.dw = self.db = None

    def params(self) -> list[Tensor | None]:
        return [self.weight, self.bias]

    def start(self, steps: int, like: Tensor) -> None:
        """Prepare a new sequence of ``steps`` steps (evaluation-mode batch norm: the per-step affine maps)."""
        self.stats = []
        self.dw = self.db = None
        if self.kind == "bn" and not self.module.training:
            bn: MaskedBatchNorm = self.module
            # row t of the running statistics at step t, the last past it (shared statistics: the one row): the maps
            # of the distinct rows, then the last one repeated
            k = min(steps, bn.max_steps if bn.per_step else 1)
            mean = bn.running_mean[:k].to(like.dtype, copy=True)  # (not a view of the buffer)
            rstd = torch.rsqrt(bn.running_var[:k].to(like.dtype) + self.eps)
            scale = rstd * self.fwd_weight
            shift = -mean * scale
            if self.fwd_bias is not None:
                shift += self.fwd_bias

            def every_step(x: Tensor) -> Tensor:
                return x if k == steps else torch.cat([x, x[-1:].expand(steps - k, -1)])

            self.eval_mean, self.eval_rstd = every_step(mean), every_step(rstd)
            self.eval_scale, self.eval_shift = every_step(scale), every_step(shift)

    def forward(self, z: Tensor, t: int) -> Tensor:
        """The normalized (and scaled) ``z`` of step ``t``, a new tensor."""
        if self.kind == "none":
            y = z if self.fwd_weight is None else z * self.fwd_weight
            return y if self.fwd_bias is None else y + self.fwd_bias
        if self.kind == "ln":
            y, mean, rstd = torch.native_layer_norm(z, (z.shape[-1],), self.fwd_weight, self.fwd_bias, self.eps)
            self.stats.append((mean, rstd))
            return y
        if self.kind == "rms":
            y, rstd = aten._fused_rms_norm(z, [z.shape[-1]], self.fwd_weight, self.eps)
            self.stats.append((rstd,))
            return y if self.fwd_bias is None else y.add_(self.fwd_bias)
        bn: MaskedBatchNorm = self.module
        if not bn.training:
            return torch.addcmul(self.eval_shift[t], z, self.eval_scale[t])
        row = t if bn.per_step else 0  # shared statistics: every step moves the one row
        update = z.shape[0] >= MIN_ROWS and row < bn.running_mean.shape[0]
        rm = bn.running_mean[row] if update else None
        rv = bn.running_var[row] if update else None
        y, mean, rstd = torch.native_batch_norm(z, self.fwd_weight, self.fwd_bias, rm, rv, True, bn.momentum, self.eps)
        self.stats.append((mean, rstd))
        return y

    def output(self, z: Tensor, t: int) -> Tensor:
        """`forward`'s result for step ``t`` again, from the statistics it saved (a layer or RMS norm, or none)."""
        if self.kind == "ln":
            mean, rstd = self.stats[t]
            y = torch.addcmul(-mean * rstd, z, rstd)
        elif self.kind == "rms":
            (rstd,) = self.stats[t]
            y = z * rstd
        elif self.kind == "none":
            y = z.clone()
        else:
            raise TypeError("output() recomputes a layer or RMS norm only")
        if self.fwd_weight is not None:
            y.mul_(self.fwd_weight)
        return y if self.fwd_bias is None else y.add_(self.fwd_bias)

    def backward(self, dy: Tensor, z: Tensor, t: int) -> Tensor:
        """The gradient with respect to ``z`` given that of the (unscaled, unshifted) normalized output ``dy``.

        The gradients of the gain and shift are accumulated step by step (`param_grads` returns them): the kernels
        produce them in the same pass, so no tensor of all steps' inputs is ever built for them.
        """
        if self.kind == "none":
            return dy
        w_mask, b_mask = self.weight is not None, self.bias is not None
        if self.kind == "ln":
            mean, rstd = self.stats[t]
            dz, dw, db = aten.native_layer_norm_backward(
                dy, z, [z.shape[-1]], mean, rstd, self.weight, self.bias, [True, w_mask, b_mask]
            )
        elif self.kind == "rms":  # (the fused RMSNorm backward kernel has no CPU implementation)
            (rstd,) = self.stats[t]
            zhat = z * rstd
            dzhat = dy * self.weight
            dw, db = (dy * zhat).sum(0), None
            dz = (dzhat - zhat * (dzhat * zhat).mean(-1, keepdim=True)).mul_(rstd)
        elif self.module.training:
            mean, rstd = self.stats[t]
            dz, dw, db = aten.native_batch_norm_backward(
                dy, z, self.weight, None, None, mean, rstd, True, self.eps, [True, w_mask, b_mask]
            )
        else:
            dz = dy * (self.eval_rstd[t] * self.weight)
            dw = (dy * (z - self.eval_mean[t]) * self.eval_rstd[t]).sum(0)
            db = dy.sum(0) if b_mask else None
        self.dw = dw if self.dw is None else self.dw.add_(dw)
        if db is not None:
            self.db = db if self.db is None else self.db.add_(db)
        return dz

    def zero_grads(self) -> None:
        """Start a backward pass: forget the gain and shift gradients of an earlier one."""
        self.dw = self.db = None
        if getattr(self, "ext", None) is not None:
            self.ext.dw = None if self.kind == "none" or self.weight is None else torch.zeros_like(self.weight)
            self.ext.db = None if self.kind in ("none", "rms") or self.bias is None else torch.zeros_like(self.bias)

    def ext_tensors(self) -> list[Tensor]:
        """The tensors the compiled step would read (to check their dtype and device)."""
        out = [t for t in (self.weight, self.bias, self.fwd_weight, self.fwd_bias) if t is not None]
        if self.kind == "bn":
            out += [self.module.running_mean, self.module.running_var]
        return out

    def ext_start(self, ext, steps: int, rows: int, like: Tensor, folded: bool = False) -> None:
        """Configure the compiled step's `Norm` (after `start`): ``rows`` rows of LayerNorm/RMSNorm statistics.

        ``folded``: the forward scale is already in the GEMM's weight (a "none" norm applies nothing then).
        """
        n = self.ext = ext.Norm()
        n.fw, n.fb, n.w = self.fwd_weight, self.fwd_bias, self.weight
        if self.kind == "none":
            n.kind = ext.Kind.AFFINE  # x·scale (identity when folded); the backward is the identity
            if folded:
                n.fw = n.fb = None
            return
        n.eps = self.eps if self.eps is not None else torch.finfo(like.dtype).eps
        if self.kind in ("ln", "rms"):
            n.kind = ext.Kind.LN if self.kind == "ln" else ext.Kind.RMS
            n.mean = like.new_empty(rows) if self.kind == "ln" else None
            n.rstd = like.new_empty(rows)
            return
        bn: MaskedBatchNorm = self.module
        features = self.weight.shape[0]
        if bn.training:
            n.kind, n.per_step, n.momentum = ext.Kind.BN_TRAIN, bn.per_step, bn.momentum
            n.mean, n.rstd = like.new_empty(steps, features), like.new_empty(steps, features)
            n.rm, n.rv = bn.running_mean, bn.running_var
        else:  # the per-step affine maps of `start`, and the statistics for the gain gradient
            n.kind = ext.Kind.AFFINE
            n.fw, n.fb = self.eval_scale.contiguous(), self.eval_shift.contiguous()
            n.mean, n.rstd = self.eval_mean.contiguous(), self.eval_rstd.contiguous()

    def ext_finish(self) -> None:
        """After a compiled backward pass: its accumulated gain and shift gradients become `param_grads`'."""
        self.dw, self.db = self.ext.dw, self.ext.db

    def param_grads(self) -> tuple[Tensor | None, Tensor | None]:
        """The gradients of the gain and shift accumulated by `backward`."""
        return self.dw, self.db


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
    if x.dim() != 3 or not x.is_contiguous() or norm.weight is None:
        return None
    ext = _extension(x, *(t for t in (proj, shift) if t is not None), norm)
    if ext is None:
        return None
    if norm.bias is not None:
        shift = norm.bias if shift is None else norm.bias + shift
    recompute = proj is not None and not keep_projection and 8 * proj.shape[1] <= proj.shape[0]
    return _InputNorm.apply(x, proj, norm.weight, shift, norm, ext, recompute, torch.is_grad_enabled())


class _InputNorm(torch.autograd.Function):
    """`normalize_input`'s node: the projection through oneDNN, then the compiled `norm_rows` kernels on the
    ``(T·B, F)`` rows (a batch norm with per-step statistics: one group of B rows per step). The forward projects and
    normalizes a block of about `BLOCK` elements at a time while it is in cache, except for a batch norm whose
    statistics span all rows."""

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
            packed = _InputNorm.block_weight(proj, rows.shape[0], batch)
            ext.norm_rows_project(n, rows, proj, packed, y.view(-1, features), groups, p, BLOCK)
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
            packed = _InputNorm.block_weight(proj, rows.shape[0], x.shape[1])
            ctx.ext.norm_rows_project_backward(n, dy, rows, proj, packed, dp, ctx.groups, BLOCK)
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

    @staticmethod
    def block_weight(proj: Tensor, rows: int, batch: int) -> Tensor | None:
        """``proj`` packed for oneDNN's GEMM over blocks of about `BLOCK` output elements (at least one step of
        ``batch`` rows; None where oneDNN does not apply)."""
        return Linear(proj, min(rows, max(batch, BLOCK // proj.shape[0]))).packed


@dataclass
class Layout:
    """Packed order: ``batch_sizes[t]`` rows run at step t, starting at row ``offsets[t]`` of the packed tensors."""

    batch_sizes: list[int]
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for b in self.batch_sizes[:-1]:
            self.offsets.append(self.offsets[-1] + b)

    @property
    def rows(self) -> int:
        return self.offsets[-1] + self.batch_sizes[-1]

    def at(self, t: int) -> slice:
        return slice(self.offsets[t], self.offsets[t] + self.batch_sizes[t])

    def prev(self, t: int) -> slice:
        """The rows of step t − 1 that are still running at step t."""
        return slice(self.offsets[t - 1], self.offsets[t - 1] + self.batch_sizes[t])

    def last_rows(self, device: torch.device) -> Tensor:
        """For every sequence (in sorted order), the packed row of its last step."""
        sizes = torch.tensor(self.batch_sizes)
        lengths = (torch.arange(sizes[0]).unsqueeze(0) < sizes.unsqueeze(1)).sum(0)
        return (torch.tensor(self.offsets)[lengths - 1] + torch.arange(sizes[0])).to(device)

    def previous(self, first: Tensor, packed: Tensor, steps: range | None = None) -> Tensor:
        """For the packed rows of ``steps`` (default: all), the row of the step before: ``first`` at t = 0, else the
        packed row of step t − 1. Consecutive steps of equal batch size read one slice of ``packed`` (no copy)."""
        parts: list[Tensor] = []
        lo = hi = -1  # the packed rows [lo, hi) not yet taken
        for t in steps if steps is not None else range(len(self.batch_sizes)):
            if t == 0:
                parts.append(first[: self.batch_sizes[0]])
                continue
            prev = self.prev(t)
            if prev.start != hi:
                if hi > lo:
                    parts.append(packed[lo:hi])
                lo = prev.start
            hi = prev.stop
        if hi > lo:
            parts.append(packed[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class OuterSum:
    """Σ_t dz_t^T h_{t-1} over a backward pass (the gradient of W_h), in chunks of at most ``rows`` packed rows.

    The backward pass walks `chunks` (latest first), writes each step's dz_t into `rows` of the chunk buffer, and
    calls `add` when a chunk is done: one large GEMM per chunk. The memory is one chunk, not a tensor of all steps.
    """

    def __init__(self, layout: Layout, h0: Tensor, h: Tensor, features: int, rows: int = 1024) -> None:
        self.layout, self.h0, self.h = layout, h0, h
        self.cap = min(max(rows, layout.batch_sizes[0]), layout.rows)
        self.buf = h.new_empty(self.cap, features)
        # (the layout `outer` returns)
        self.grad = h.new_zeros(h.shape[1], features).t() if _outer_onednn(h) else h.new_zeros(features, h.shape[1])

    def chunks(self) -> list[range]:
        """The steps in chunks of at most ``cap`` packed rows, in backward order (the latest chunk first)."""
        sizes, out, hi = self.layout.batch_sizes, [], len(self.layout.batch_sizes)
        while hi > 0:
            lo, rows = hi - 1, sizes[hi - 1]
            while lo > 0 and rows + sizes[lo - 1] <= self.cap:
                lo, rows = lo - 1, rows + sizes[lo - 1]
            out.append(range(lo, hi))
            hi = lo
        return out

    def rows(self, chunk: range, t: int) -> Tensor:
        """Where dz_t goes: step t's rows of the chunk buffer."""
        lo = self.layout.offsets[t] - self.layout.offsets[chunk.start]
        return self.buf[lo : lo + self.layout.batch_sizes[t]]

    def add(self, chunk: range) -> None:
        """Add the finished chunk's Σ dz_t^T h_{t-1}."""
        n = (
            self.layout.offsets[chunk.stop - 1]
            + self.layout.batch_sizes[chunk.stop - 1]
            - self.layout.offsets[chunk.start]
        )
        outer_add(self.grad, self.buf[:n], self.layout.previous(self.h0, self.h, chunk))

    def result(self) -> Tensor:
        return self.grad


def run_packed(recurrence, u: Tensor, state: tuple[Tensor, ...], mask: Tensor | None):
    """Run ``recurrence(u_packed, state_sorted, layout) -> (out_packed, final_sorted)`` on a padded ``(T, B, G)`` ``u``.

    Returns the padded output ``(T, B, H)`` (zeros at padded positions) and the final state in the batch's own order.
    """
    steps, batch = u.shape[:2]
    if mask is None:
        out, final = recurrence(u.reshape(steps * batch, -1), state, Layout([batch] * steps))
        return out.view(steps, batch, -1), final
    packed = pack_padded_sequence(u, mask.sum(0).cpu(), enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    layout = Layout(packed.batch_sizes.tolist())
    out, final = recurrence(packed.data, tuple(s.index_select(0, order) for s in state), layout)
    out, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes, order, unorder), total_length=steps)
    return out, tuple(f.index_select(0, unorder) for f in final)


def candidate_scale(hidden: int, like: Tensor) -> Tensor:
    """1 on the i, f, o blocks and 2 on the candidate block g (gate order i, f, g, o)."""
    scale = like.new_ones(4 * hidden)
    scale[2 * hidden : 3 * hidden] = 2
    return scale


def recording(ctx, grad: bool) -> bool:
    """Whether a `torch.autograd.Function` call records its backward: ``grad`` is `torch.is_grad_enabled` at the call
    (always off inside ``forward``), and ``ctx.needs_input_grad`` follows the inputs' ``requires_grad`` alone, under
    `torch.no_grad` and `torch.inference_mode` too."""
    return grad and any(ctx.needs_input_grad)


def _grads(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """One gradient per input of the forward: None for those that need none and for the non-tensor inputs."""
    grads = grads + (None,) * (len(ctx.needs_input_grad) - len(grads))
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


class FusedLSTM(torch.autograd.Function):
    """The recurrence of an LSTM whose gates are u_t + N_h(W_h h_{t-1}) and whose output is σ(o) ⊙ tanh(N_c(c_t)).

    ``u`` ``(N, 4H)`` is the input term (bias included) in packed order, ``h0``, ``c0`` ``(B, H)`` sorted by length;
    ``norm_h`` carries the candidate-doubling scale, ``norm_c`` a scale of 2. Returns the packed outputs ``(N, H)`` and
    the final ``h``, ``c`` (sorted order). The gains and shifts of the norms are inputs so that autograd routes their
    gradients; the norms themselves travel in ``norm_h`` and ``norm_c``.
    """

    @staticmethod
    def forward(ctx, u, h0, c0, w_hh, wh, bh, wc, bc, layout: Layout, norm_h: StepNorm, norm_c: StepNorm, grad: bool):
        n, hidden = u.shape[0], h0.shape[1]
        steps = len(layout.batch_sizes)
        norm_h.start(steps, u)
        norm_c.start(steps, u)
        gscale = candidate_scale(hidden, u)  # doubles the candidate block: one sigmoid gives tanh(g) = 2σ(2g) − 1
        weight = w_hh * gscale.unsqueeze(1) if norm_h.kind == "none" else w_hh
        ext = _extension(u, h0, c0, w_hh, norm_h, norm_c)
        lin = Linear(weight, layout.batch_sizes[0]) if ext is None else Panels(ext, weight)
        train = recording(ctx, grad)  # else inference: keep only what the next step reads
        h, c = u.new_empty(n, hidden), u.new_empty(n, hidden)
        s = torch.empty_like(u) if train else None  # σ of the pre-activations (the candidate block: σ(2g))
        sc = u.new_empty(n, hidden) if train else None  # σ(2 N_c(c_t)), so that tanh(N_c(c_t)) = 2 sc − 1
        z = torch.empty_like(u) if train and norm_h.kind != "none" else None  # W_h h_{t-1}, for backward
        loop = FusedLSTM._forward_ext if ext is not None else FusedLSTM._forward_python
        loop(ext, u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z)
        last = layout.last_rows(u.device)
        ctx.save_for_backward(h0, c0, w_hh, s, h, c, sc, z)
        ctx.layout, ctx.norm_h, ctx.norm_c, ctx.ext = layout, norm_h, norm_c, ext
        return h, h[last], c[last]

    @staticmethod
    def _forward_python(ext, u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z) -> None:
        """The steps through ATen kernels (``s``, ``sc``, ``z`` None in inference)."""
        for t in range(len(layout.batch_sizes)):
            rows = layout.at(t)
            hp, cp = (h0, c0) if t == 0 else (h[layout.prev(t)], c[layout.prev(t)])
            zt = lin(hp)
            if z is not None:
                z[rows] = zt
            if norm_h.kind != "none":
                zt = norm_h.forward(zt, t)
            st = torch.addcmul(zt, u[rows], gscale, out=None if s is None else s[rows]).sigmoid_()
            i, f, g, o = st.chunk(4, dim=1)
            ct = torch.mul(i, g, out=c[rows]).mul_(2).sub_(i).addcmul_(f, cp)  # f ⊙ c_{t-1} + i ⊙ tanh(g)
            sct = torch.sigmoid(norm_c.forward(ct, t), out=None if sc is None else sc[rows])
            torch.mul(o, sct, out=h[rows]).mul_(2).sub_(o)  # o ⊙ tanh(N_c(c_t))

    @staticmethod
    def _forward_ext(ext, u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z) -> None:
        """All steps in the compiled loop, GEMMs included (inference: ``s``, ``sc`` a scratch of the first rows)."""
        train, first = s is not None, layout.batch_sizes[0]
        rows = layout.rows if train else first
        norm_h.ext_start(ext, len(layout.batch_sizes), rows, u, folded=True)
        norm_c.ext_start(ext, len(layout.batch_sizes), rows, u)
        s_buf = s if train else u.new_empty(first, u.shape[1])
        sc_buf = sc if train else u.new_empty(first, h.shape[1])
        ext.forward_loop(
            norm_h.ext, norm_c.ext, lin.weight, lin.packed, h0.contiguous(), u, gscale, c0.contiguous(),
            s_buf, c, sc_buf, h, z, layout.batch_sizes, train,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, dout, dhn, dcn):
        h0, c0, w_hh, s, h, c, sc, z = ctx.saved_tensors
        layout, norm_h, norm_c = ctx.layout, ctx.norm_h, ctx.norm_c
        none_h = norm_h.kind == "none"
        # The carries hold the gradient of the state at the current step, for every sequence: from the step after it,
        # or, for a sequence that ends here, the gradient of its final state.
        dh_carry = torch.empty_like(h0, memory_format=torch.contiguous_format).copy_(dhn) if dhn is not None else None
        dc_carry = torch.empty_like(c0, memory_format=torch.contiguous_format).copy_(dcn) if dcn is not None else None
        dh_carry = torch.zeros_like(h0, memory_format=torch.contiguous_format) if dh_carry is None else dh_carry
        dc_carry = torch.zeros_like(c0, memory_format=torch.contiguous_format) if dc_carry is None else dc_carry
        lin_t = Linear(w_hh.t().contiguous(), layout.batch_sizes[0]) if ctx.ext is None else Panels(ctx.ext, w_hh.t())
        norm_h.zero_grads()
        norm_c.zero_grads()
        du = torch.empty_like(s)  # gradient of the gate pre-activations, which is that of u
        dw_hh = None if none_h else OuterSum(layout, h0, h, z.shape[1])
        loop = FusedLSTM._backward_ext if ctx.ext is not None else FusedLSTM._backward_python
        loop(ctx.ext, dout, h0, c0, s, c, sc, z, layout, norm_h, norm_c, lin_t, dh_carry, dc_carry, du, dw_hh)
        dh0, dc0 = dh_carry, dc_carry
        dw_hh = outer(du, layout.previous(h0, h)) if none_h else dw_hh.result()
        return _grads(ctx, du, dh0, dc0, dw_hh, *norm_h.param_grads(), *norm_c.param_grads())

    @staticmethod
    def _backward_python(ext, dout, h0, c0, s, c, sc, z, layout, norm_h, norm_c, lin_t, dh_carry, dc_carry, du, dw_hh):
        """The backward steps through ATen kernels: fills ``du``, updates the carries, feeds ``dw_hh``."""
        for chunk in [range(len(layout.batch_sizes))] if dw_hh is None else dw_hh.chunks():
            for t in reversed(chunk):
                rows, bs = layout.at(t), layout.batch_sizes[t]
                st, sct = s[rows], sc[rows]
                i, f, g, o = st.chunk(4, dim=1)
                cp = c0 if t == 0 else c[layout.prev(t)]
                dh = dh_carry[:bs] if dout is None else dh_carry[:bs].add_(dout[rows])
                dst = du[rows]
                di, df, dg, do = dst.chunk(4, dim=1)
                torch.mul(sct, 2, out=do).sub_(1).mul_(dh)  # dh ⊙ tanh(N_c(c_t))
                dn = torch.addcmul(sct, sct, sct, value=-1).mul_(o).mul_(dh).mul_(4)  # through tanh: 4σ'(2x)
                dc = norm_c.backward(dn, c[rows], t).add_(dc_carry[:bs])
                torch.mul(dc, g, out=di).mul_(2).sub_(dc)  # dc ⊙ tanh(g)
                torch.mul(dc, cp, out=df)
                torch.mul(dc, i, out=dg).mul_(4)
                dst.mul_(torch.addcmul(st, st, st, value=-1))  # σ'; the candidate block: tanh' = 4σ'(2g)
                if dw_hh is None:
                    dzt = dst
                else:
                    dzt = dw_hh.rows(chunk, t)
                    dzt.copy_(norm_h.backward(dst, z[rows], t))
                dh_carry[:bs] = lin_t(dzt)
                torch.mul(dc, f, out=dc_carry[:bs])
            if dw_hh is not None:
                dw_hh.add(chunk)

    @staticmethod
    def _backward_ext(ext, dout, h0, c0, s, c, sc, z, layout, norm_h, norm_c, lin_t, dh_carry, dc_carry, du, dw_hh):
        """The backward steps in the compiled loop, GEMMs included, a chunk of ``dw_hh`` at a time."""
        dout = None if dout is None else dout.contiguous()
        c0, work = c0.contiguous(), c.new_empty(layout.batch_sizes[0], c.shape[1])
        steps = len(layout.batch_sizes)
        for chunk in [range(steps)] if dw_hh is None else dw_hh.chunks():
            ext.backward_loop(
                norm_h.ext, norm_c.ext, lin_t.weight, lin_t.packed, s, sc, c, c0, z, dout, dh_carry, dc_carry, du,
                None if dw_hh is None else dw_hh.buf, work, layout.batch_sizes, chunk.start, chunk.stop,
            )  # fmt: skip
            if dw_hh is not None:
                dw_hh.add(chunk)
        norm_h.ext_finish()
        norm_c.ext_finish()


def _extension(u: Tensor, *items: Tensor | StepNorm):
    """The compiled extension when it is built, allowed (the ``compiled`` backend, `zoo.nn.backends`) and applies to
    ``u`` and ``items`` (tensors, and norms whose tensors count too): CPU, float32/float64, one dtype, ``u``
    contiguous; else None."""
    if not compiled_allowed():
        return None
    if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or not u.is_contiguous():
        return None
    tensors = [t for i in items for t in (i.ext_tensors() if isinstance(i, StepNorm) else [i])]
    if any(t.device != u.device or t.dtype != u.dtype for t in tensors):
        return None
    return _ext.load()


class FusedGRU(torch.autograd.Function):
    """The recurrence of a GRU whose recurrent terms are normalized: with a = W_h h_{t-1},

    r, z = σ(u_rz + N_rz(a_rz));  n = tanh(u_n + r ⊙ (N_n(a_n) + b_hn));  h_t = n + z ⊙ (h_{t-1} − n).

    ``u`` ``(N, 3H)`` holds the input term with b_ih and b_hh's r, z part folded in; ``b_hn`` stays inside because the
    reset gate multiplies it. Returns the packed outputs and the final ``h`` (sorted order). With row-local norms
    (LayerNorm, RMSNorm) the loop over steps runs in the compiled extension, GEMMs included.
    """

    @staticmethod
    def forward(
        ctx, u, h0, w_hh, b_hn, w_rz, b_rz, w_n, b_n, layout: Layout, norm_rz: StepNorm, norm_n: StepNorm, grad: bool
    ):
        n_rows, hidden = u.shape[0], h0.shape[1]
        steps, first = len(layout.batch_sizes), layout.batch_sizes[0]
        norm_rz.start(steps, u)
        norm_n.start(steps, u)
        train = recording(ctx, grad)  # else inference: keep only what the next step reads
        row_local = "bn" not in (norm_rz.kind, norm_n.kind)
        ext = _extension(u, h0, w_hh, norm_rz, norm_n) if row_local else None
        lin = Linear(w_hh, first) if ext is None else Panels(ext, w_hh)
        keep = train or ext is None  # (the Python loop keeps every step's rows)
        rz = u.new_empty(n_rows if keep else first, 2 * hidden)  # σ(r), σ(z)
        nn_ = u.new_empty(n_rows if keep else first, hidden)  # the candidate n
        h = u.new_empty(n_rows, hidden)
        a_all = torch.empty_like(u) if train else None  # W_h h_{t-1}; its gradient in backward
        loop = FusedGRU._forward_ext if ext is not None else FusedGRU._forward_python
        loop(ext, u, h0, lin, layout, norm_rz, norm_n, rz, nn_, h, a_all)
        last = layout.last_rows(u.device)
        ctx.save_for_backward(h0, w_hh, rz, nn_, h, a_all)
        ctx.layout, ctx.norm_rz, ctx.norm_n, ctx.ext = layout, norm_rz, norm_n, ext
        return h, h[last]

    @staticmethod
    def _forward_ext(ext, u, h0, lin, layout, norm_rz, norm_n, rz, nn_, h, a_all) -> None:
        """All steps in the compiled loop, GEMMs included (inference: ``rz``, ``nn_`` a scratch of the first rows,
        ``a_all`` None)."""
        train, steps = a_all is not None, len(layout.batch_sizes)
        rows = layout.rows if train else layout.batch_sizes[0]
        norm_rz.ext_start(ext, steps, rows, u)
        norm_n.ext_start(ext, steps, rows, u)
        ext.gru_forward_loop(
            norm_rz.ext, norm_n.ext, lin.weight, lin.packed, h0.contiguous(), u, rz, nn_, h, a_all, layout.batch_sizes,
            train,
        )  # fmt: skip

    @staticmethod
    def _forward_python(ext, u, h0, lin, layout, norm_rz, norm_n, rz, nn_, h, a_all) -> None:
        """The steps through ATen kernels (``a_all`` None in inference)."""
        hidden = h0.shape[1]
        for t in range(len(layout.batch_sizes)):
            rows = layout.at(t)
            hp = h0 if t == 0 else h[layout.prev(t)]
            a = lin(hp)
            if a_all is not None:
                a_all[rows] = a
            a_rz, a_n = a[:, : 2 * hidden], a[:, 2 * hidden :]
            u_rz, u_n = u[rows, : 2 * hidden], u[rows, 2 * hidden :]
            rzt = torch.add(norm_rz.forward(a_rz, t), u_rz, out=rz[rows]).sigmoid_()
            r, z = rzt[:, :hidden], rzt[:, hidden:]
            ynt = norm_n.forward(a_n, t)  # (not kept: backward recomputes it from its statistics)
            nt = torch.tanh(torch.addcmul(u_n, r, ynt), out=nn_[rows])
            torch.addcmul(nt, z, hp - nt, out=h[rows])

    @staticmethod
    def backward(ctx, dout, dhn):
        h0, w_hh, rz, nn_, h, a_all = ctx.saved_tensors
        layout, norm_rz, norm_n = ctx.layout, ctx.norm_rz, ctx.norm_n
        # (as in FusedLSTM.backward)
        dh_carry = torch.zeros_like(h0, memory_format=torch.contiguous_format)
        if dhn is not None:
            dh_carry.copy_(dhn)
        lin_t = Linear(w_hh.t().contiguous(), layout.batch_sizes[0]) if ctx.ext is None else Panels(ctx.ext, w_hh.t())
        du = rz.new_empty(rz.shape[0], 3 * h0.shape[1])
        norm_rz.zero_grads()
        norm_n.zero_grads()
        dw_hh = OuterSum(layout, h0, h, a_all.shape[1])
        loop = FusedGRU._backward_ext if ctx.ext is not None else FusedGRU._backward_python
        dbhn = loop(ctx.ext, dout, h0, rz, nn_, h, a_all, layout, norm_rz, norm_n, lin_t, dh_carry, du, dw_hh)
        return _grads(ctx, du, dh_carry, dw_hh.result(), dbhn, *norm_rz.param_grads(), *norm_n.param_grads())

    @staticmethod
    def _backward_ext(ext, dout, h0, rz, nn_, h, a_all, layout, norm_rz, norm_n, lin_t, dh_carry, du, dw_hh) -> Tensor:
        """The backward steps in the compiled loop, GEMMs included, a chunk of ``dw_hh`` at a time; returns the
        gradient of b_hn."""
        dbhn = torch.zeros_like(h0[0])
        dout = None if dout is None else dout.contiguous()
        work = h.new_empty(layout.batch_sizes[0], h.shape[1])
        for chunk in dw_hh.chunks():
            ext.gru_backward_loop(
                norm_rz.ext, norm_n.ext, lin_t.weight, lin_t.packed, h0.contiguous(), h, rz, nn_, a_all, dout,
                dh_carry, du, dw_hh.buf, dbhn, work, layout.batch_sizes, chunk.start, chunk.stop,
            )  # fmt: skip
            dw_hh.add(chunk)
        norm_rz.ext_finish()
        norm_n.ext_finish()
        return dbhn

    @staticmethod
    def _backward_python(ext, dout, h0, rz, nn_, h, a_all, layout, norm_rz, norm_n, lin_t, dh_carry, du, dw_hh):
        """The backward steps through ATen kernels: fills ``du``, updates the carry, feeds ``dw_hh``; returns the
        gradient of b_hn."""
        hidden = h0.shape[1]
        dyn = torch.empty_like(nn_)
        for chunk in dw_hh.chunks():
            for t in reversed(chunk):
                rows, bs = layout.at(t), layout.batch_sizes[t]
                hp = h0 if t == 0 else h[layout.prev(t)]
                rzt, nt = rz[rows], nn_[rows]
                ynt = norm_n.output(a_all[rows, 2 * hidden :], t)  # N_n(a_n) + b_hn
                dh = dh_carry[:bs] if dout is None else dh_carry[:bs].add_(dout[rows])
                r, z = rzt[:, :hidden], rzt[:, hidden:]
                dut = du[rows]
                dr, dz, dn = dut[:, :hidden], dut[:, hidden : 2 * hidden], dut[:, 2 * hidden :]
                torch.mul(dh, 1 - z, out=dn).mul_(torch.addcmul(torch.ones_like(nt), nt, nt, value=-1))  # tanh'
                torch.mul(dh, hp - nt, out=dz)
                torch.mul(dn, ynt, out=dr)
                rzd = dut[:, : 2 * hidden]
                rzd.mul_(torch.addcmul(rzt, rzt, rzt, value=-1))  # σ'
                dynt = torch.mul(dn, r, out=dyn[rows])
                at, dat = a_all[rows], dw_hh.rows(chunk, t)
                dat[:, : 2 * hidden] = norm_rz.backward(rzd, at[:, : 2 * hidden], t)
                dat[:, 2 * hidden :] = norm_n.backward(dynt, at[:, 2 * hidden :], t)
                dh_carry[:bs] = lin_t.add(dat, dh * z)
            dw_hh.add(chunk)
        return dyn.sum(0)


class FusedIndRNN(torch.autograd.Function):
    """The IndRNN recurrence h_t = ReLU(u_t + w ⊙ h_{t-1}) on packed rows; returns the outputs and the final h."""

    @staticmethod
    def forward(ctx, u, h0, w, layout: Layout):
        h = torch.empty_like(u)
        for t in range(len(layout.batch_sizes)):
            hp = h0 if t == 0 else h[layout.prev(t)]
            torch.addcmul(u[layout.at(t)], w, hp, out=h[layout.at(t)]).relu_()
        ctx.save_for_backward(h0, w, h)
        ctx.layout = layout
        return h, h[layout.last_rows(u.device)]

    @staticmethod
    def backward(ctx, dout, dhn):
        h0, w, h = ctx.saved_tensors
        layout = ctx.layout
        dh_carry = dhn.clone() if dhn is not None else torch.zeros_like(h0)  # as in FusedLSTM.backward
        du = torch.empty_like(h)
        for t in reversed(range(len(layout.batch_sizes))):
            rows, bs = layout.at(t), layout.batch_sizes[t]
            dh = dh_carry[:bs] if dout is None else dh_carry[:bs].add_(dout[rows])
            dpre = du[rows]
            dpre.copy_(aten.threshold_backward(dh, h[rows], 0))
            torch.mul(dpre, w, out=dh_carry[:bs])
        dh0 = dh_carry
        dw = torch.zeros_like(w) if ctx.needs_input_grad[2] else None
        if dw is not None:  # Σ_t du_t ⊙ h_{t-1}, a few steps at a time: no (N, H) temporaries at the peak
            steps = len(layout.batch_sizes)
            chunk = max(1, BLOCK * steps // max(1, h.numel()))
            for t0 in range(0, steps, chunk):
                t1 = min(t0 + chunk, steps)
                rows = slice(layout.offsets[t0], layout.offsets[t1 - 1] + layout.batch_sizes[t1 - 1])
                dw.add_((du[rows] * layout.previous(h0, h, range(t0, t1))).sum(0))
        return _grads(ctx, du, dh0, dw)
