"""`StepNorm`: one normalization as the fused recurrence applies it at every step, in Python or in the compiled
loops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _ext
from ..backends import compiled_allowed
from ..norm import MIN_ROWS, MaskedBatchNorm
from .common import aten


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
            rstd = bn.running_var[:k].to(like.dtype).add(self.eps).rsqrt_()
            scale = rstd * self.fwd_weight
            shift = (
                torch.mul(mean, scale).neg_() if self.fwd_bias is None else self.fwd_bias.addcmul(mean, scale, value=-1)
            )

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
