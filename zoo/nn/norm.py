"""Normalization layers for recurrent networks.

`MaskedBatchNorm` is the one batch normalization every BN variant uses. Its statistics are computed over the *valid*
positions of a padded, time-major batch only, either per time step (Cooijmans et al. 2016, sec. 3) or over batch x time
(Laurent et al. 2016, "sequence-wise"). Layer normalization and RMSNorm are per sample and need no mask: the layers use
`torch.nn.LayerNorm` and `torch.nn.RMSNorm` directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

PAST_MAX_STEPS = ("reuse", "error")
MIN_ROWS = 2  # a training step's batch statistics move the running ones only from this many valid rows


class MaskedBatchNorm(nn.Module):
    """Batch normalization of a time-major ``(T, B, F)`` tensor whose padded positions never enter a statistic.

    Args:
        num_features: F.
        max_steps: ``None`` for statistics shared over time (over all valid batch x time positions); an integer
            T_max for separate statistics at every time step t < T_max (Cooijmans et al. 2016).
        gamma: initial value of the gain (Cooijmans et al. use 0.1).
        bias: whether to learn a shift beta (initialised to 0).
        momentum: rate of the exponential moving average of the running statistics (as in `torch.nn.BatchNorm1d`;
            the official Recurrent-BN code uses 0.01).
        eps: added to the variance.
        past_max_steps: what happens at steps t >= T_max (per-step mode only). ``"reuse"``: training normalizes with
            the batch statistics as always but does not update running statistics there; evaluation reuses the
            running statistics of step T_max - 1 (the paper's choice). ``"error"``: raise.
        sync: synchronize the batch statistics over the processes of the default `torch.distributed` process group
            (data-parallel training): every rank normalizes with the statistics of the global batch, keeps the same
            running statistics, and the backward all-reduces the statistics' gradient terms, so that W ranks with
            batch B each compute what one process computes with batch W x B. ``None`` (default): whenever
            `torch.distributed` is initialized with more than one process; ``True``: always (an error without a
            process group); ``False``: never (per-rank statistics). Per-step statistics need the same number of
            steps on every rank: `zoo.nn.RNN` pads each rank's batch to the longest one (`sync_steps`).

    Training normalizes with the (biased) batch statistics of the valid positions and updates the running statistics
    with the unbiased variance, like `torch.nn.BatchNorm1d`; a step with fewer than two valid positions leaves its
    running statistics unchanged. Evaluation normalizes with the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int | None = None,
        gamma: float = 1.0,
        bias: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
        past_max_steps: str = "reuse",
        sync: bool | None = None,
    ) -> None:
        super().__init__()
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps}")
        if past_max_steps not in PAST_MAX_STEPS:
            raise ValueError(f"past_max_steps must be one of {PAST_MAX_STEPS}, got {past_max_steps!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_features = num_features
        self.max_steps = max_steps
        self.gamma_init = gamma
        self.momentum = momentum
        self.eps = eps
        self.past_max_steps = past_max_steps
        self.sync = sync
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features)) if bias else None
        slots = 1 if max_steps is None else max_steps
        self.register_buffer("running_mean", torch.zeros(slots, num_features))
        self.register_buffer("running_var", torch.ones(slots, num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    @property
    def per_step(self) -> bool:
        return self.max_steps is not None

    @property
    def synchronized(self) -> bool:
        """Whether training synchronizes the batch statistics over processes now (see ``sync``)."""
        if self.sync is False:
            return False
        if not (dist.is_available() and dist.is_initialized()):
            if self.sync:
                raise RuntimeError("MaskedBatchNorm(sync=True) needs an initialized torch.distributed process group")
            return False
        return self.sync is True or dist.get_world_size() > 1

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, momentum={self.momentum}, eps={self.eps}, "
            f"past_max_steps={self.past_max_steps!r}"
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, start: int = 0) -> Tensor:
        """Normalize ``x`` of shape ``(T, B, F)`` whose first row is time step ``start``.

        ``mask`` (``(T, B)``, bool) marks the valid positions; ``None`` means all are valid. Whatever the padded
        positions hold (NaN and inf too), they enter no statistic and no valid output; in the result they hold finite
        values that the caller discards.
        """
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0)  # (not a multiply: 0 · NaN is NaN)
        steps = x.shape[0]
        if self.per_step and self.past_max_steps == "error" and start + steps > self.max_steps:
            raise ValueError(
                f"sequence of {start + steps} steps is longer than max_steps={self.max_steps} of this batch-norm "
                "layer; raise max_steps or use past_max_steps='reuse'"
            )
        if not self.training:
            mean, var = self._running_stats(steps, start)
            scale = torch.rsqrt(var + self.eps) * self.weight
            shift = -mean * scale if self.bias is None else self.bias - mean * scale
            return torch.addcmul(shift, x, scale)
        w = None if mask is None else mask.unsqueeze(-1).to(x.dtype)
        sync = self.synchronized
        with torch.no_grad():
            mean, var, count = self._batch_stats(x, w, sync)
            self._update_running(mean, var, count, start)
        rstd = torch.rsqrt(var + self.eps)
        return _BatchNormTrain.apply(x, self.weight, self.bias, mean, rstd, w, count, self.per_step, sync)

    def _batch_stats(self, x: Tensor, w: Tensor | None, sync: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Biased mean and variance over the valid positions (``w``: ``(T, B, 1)`` 1/0 weights, None for all), per
        step ``(T, 1, F)`` or shared ``(1, 1, F)``, and the number of valid positions; over all ranks if ``sync``
        (two all-reduces: the counts and sums, then the squared deviations from the global mean)."""
        if w is None:  # (two passes: torch.var_mean over these dimensions is ten times slower on CPU)
            n = x.shape[1] if self.per_step else x.shape[0] * x.shape[1]
            count = x.new_full((x.shape[0] if self.per_step else 1, 1, 1), float(n))
        else:
            count = group_sum(w, None, self.per_step)
        total = group_sum(x, w, self.per_step)
        if sync:
            both = torch.cat([count, total], dim=-1)
            dist.all_reduce(both)
            count, total = both[..., :1], both[..., 1:]
        safe = count.clamp(min=1)
        mean = total / safe
        d = x - mean
        squares = group_sum(d * d, w, self.per_step)
        if sync:
            dist.all_reduce(squares)
        return mean, squares / safe, count

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: Tensor, start: int) -> None:
        mean, var, count = mean.flatten(1), var.flatten(1), count.flatten(1)
        unbiased = var * count / (count - 1).clamp(min=1)
        ok = (count >= MIN_ROWS).to(mean.dtype)
        rate = self.momentum * ok
        if self.per_step:
            stop = min(start + mean.shape[0], self.max_steps)
            if stop <= start:
                return
            n = stop - start
            sl = slice(start, stop)
            mean, unbiased, rate = mean[:n], unbiased[:n], rate[:n]
        else:
            sl = slice(0, 1)
        self.running_mean[sl].lerp_(mean.to(self.running_mean.dtype), rate.to(self.running_mean.dtype))
        self.running_var[sl].lerp_(unbiased.to(self.running_var.dtype), rate.to(self.running_var.dtype))

    def _running_stats(self, steps: int, start: int) -> tuple[Tensor, Tensor]:
        if not self.per_step:
            return self.running_mean.unsqueeze(0), self.running_var.unsqueeze(0)
        idx = torch.arange(start, start + steps, device=self.running_mean.device).clamp(max=self.max_steps - 1)
        return self.running_mean[idx].unsqueeze(1), self.running_var[idx].unsqueeze(1)


def group_sum(v: Tensor, w: Tensor | None, per_step: bool) -> Tensor:
    """The sum of ``v`` ``(T, B, F)`` over the batch (``per_step``: ``(T, 1, F)``) or over time and batch
    (``(1, 1, F)``), weighted by ``w`` ``(T, B, 1)`` (None: all ones); one matrix product, no weighted copy of ``v``."""
    if w is None:
        return v.sum(dim=1 if per_step else (0, 1), keepdim=True)
    if per_step:
        return torch.bmm(w.transpose(1, 2), v)
    return torch.mm(w.reshape(1, -1), v.reshape(-1, v.shape[-1])).unsqueeze(0)


class _BatchNormTrain(torch.autograd.Function):
    """y = γ (x − μ) / σ + β with the batch statistics μ, σ of the valid positions, and its hand-written backward,
    in which the statistics' dependence on x is accounted for (padded positions get y = 0 and no gradient). With
    ``sync`` the statistics are global (over all ranks): the backward all-reduces its two group sums for dx, while
    dγ and dβ stay this rank's share (data-parallel training reduces parameter gradients itself)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, rstd, w, count, per_step: bool, sync: bool = False):
        scale = rstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        y = torch.addcmul(shift, x, scale)
        if w is not None:
            y.mul_(w)
        ctx.save_for_backward(x, weight, mean, rstd, w, count)
        ctx.per_step = per_step
        ctx.sync = sync
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd, w, count = ctx.saved_tensors
        per_step = ctx.per_step
        n = count.clamp(min=1)
        xhat = torch.addcmul(-mean * rstd, x, rstd)
        sum_dy = group_sum(dy, w, per_step)
        sum_dy_xhat = group_sum(dy * xhat, w, per_step)
        dweight = sum_dy_xhat.sum((0, 1))
        dbias = sum_dy.sum((0, 1)) if ctx.has_bias else None
        if ctx.sync:
            both = torch.cat([sum_dy, sum_dy_xhat], dim=-1)
            dist.all_reduce(both)
            sum_dy, sum_dy_xhat = both.split(dy.shape[-1], dim=-1)
        a = rstd * weight
        dx = torch.addcmul(-a * sum_dy / n, dy, a)  # γ/σ (dy − mean(dy) − x̂ mean(dy x̂)), over the valid positions
        dx.addcmul_(xhat, -a * sum_dy_xhat / n)
        if w is not None:
            dx.mul_(w)
        return dx, dweight, dbias, None, None, None, None, None, None


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` over the last dimension (Zhang & Sennrich 2019, eq. 4), a / sqrt(mean(a²) + ε) ⊙ g, with a
    hand-written backward: the fused forward kernel, and no saved intermediate tensors beyond the input."""

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1 or self.weight is None:
            return super().forward(x)
        return _RMSNormFn.apply(x, self.weight, self.eps)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        features = x.shape[-1]
        x2, dy2, rstd2 = x.reshape(-1, features), dy.reshape(-1, features), rstd.reshape(-1, 1)
        dx = torch.empty_like(x2)
        dweight = torch.zeros_like(weight)
        for i in range(0, x2.shape[0], 1024):  # in row chunks: the temporaries stay small
            rows = slice(i, i + 1024)
            xhat = x2[rows] * rstd2[rows]
            dweight.add_((dy2[rows] * xhat).sum(0))
            dxhat = dy2[rows] * weight
            mean = (dxhat * xhat).mean(-1, keepdim=True)
            torch.mul(dxhat.sub_(xhat.mul_(mean)), rstd2[rows], out=dx[rows])  # rstd (dx̂ − x̂ mean(dx̂ x̂))
        dx = dx.view_as(x)
        return dx, dweight, None
