"""The fused recurrence: a hand-written backward through time for the normalized LSTM and GRU cells.

The cell's input projection (and its normalization) is computed for all steps at once by autograd; what remains, the
recurrence, runs here in one `torch.autograd.Function` whose backward is written out step by step, with the weight and
gain gradients taken as single large products after the loop. The sequences are processed in `PackedSequence` order
(sorted by length, time-major): at step t only the first ``batch_sizes[t]`` rows are still running, so a masked batch
statistic is a statistic over a prefix, and finished rows cost nothing.

Two tricks from measurement: tanh(x) = 2σ(2x) − 1 lets one sigmoid cover all gates (the candidate block of the
pre-activations is doubled), and the vendor kernels `native_layer_norm`, `_fused_rms_norm` and `native_batch_norm`
(with their backward kernels) normalize each step in one call. The reference path (`fused=False`) defines the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .norm import MaskedBatchNorm

aten = torch.ops.aten


class StepNorm:
    """One normalization of the recurrence (of W_h h or of c_t), applied step by step without autograd.

    ``kind``: "none", "ln" (LayerNorm), "rms" (RMSNorm) or "bn" (`MaskedBatchNorm` with per-step statistics).
    ``scale`` (a vector over the features, or None) multiplies the output in the forward pass only: it implements the
    doubled candidate block of the sigmoid trick without another elementwise kernel.
    """

    def __init__(self, module: nn.Module | None, scale: Tensor | None = None) -> None:
        if module is None:
            self.kind = "none"
        elif isinstance(module, nn.LayerNorm):
            self.kind = "ln"
        elif isinstance(module, nn.RMSNorm):
            self.kind = "rms"
        elif isinstance(module, MaskedBatchNorm):
            self.kind = "bn"
        else:
            raise TypeError(f"no fused path for {type(module).__name__}")
        if self.kind == "bn" and not module.per_step:
            raise ValueError("the fused recurrence normalizes with per-step batch statistics only")
        self.module = module
        self.weight = None if module is None else module.weight
        self.bias = getattr(module, "bias", None)
        self.eps = None if module is None else module.eps
        self.scale = scale
        with torch.no_grad():
            self.fwd_weight = self.weight if (self.weight is None or scale is None) else self.weight * scale
            self.fwd_bias = self.bias if (self.bias is None or scale is None) else self.bias * scale

    def params(self) -> list[Tensor | None]:
        return [self.weight, self.bias]

    def start(self, rows: int, steps: int, features: int, like: Tensor) -> None:
        """Allocate the per-row or per-step statistics of one sequence."""
        if self.kind in ("ln", "rms"):
            self.mean = like.new_empty(rows, 1) if self.kind == "ln" else None
            self.rstd = like.new_empty(rows, 1)
        elif self.kind == "bn":
            bn: MaskedBatchNorm = self.module
            self.training = bn.training
            if bn.training:
                self.mean = like.new_empty(steps, features)
                self.rstd = like.new_empty(steps, features)
            else:
                if bn.per_step:
                    idx = torch.arange(steps, device=like.device).clamp(max=bn.max_steps - 1)
                    rm, rv = bn.running_mean[idx], bn.running_var[idx]
                else:
                    rm, rv = bn.running_mean.expand(steps, -1), bn.running_var.expand(steps, -1)
                self.mean, self.rstd = rm.to(like.dtype), torch.rsqrt(rv.to(like.dtype) + self.eps)
                self.eval_scale = self.rstd * self.fwd_weight
                self.eval_shift = -self.mean * self.eval_scale
                if self.fwd_bias is not None:
                    self.eval_shift = self.eval_shift + self.fwd_bias
                self.eval_grad_scale = self.rstd * self.weight

    def forward(self, z: Tensor, t: int, rows: slice) -> Tensor:
        if self.kind == "none":
            return z if self.scale is None else z * self.scale
        if self.kind == "ln":
            y, self.mean[rows], self.rstd[rows] = torch.native_layer_norm(
                z, (z.shape[-1],), self.fwd_weight, self.fwd_bias, self.eps
            )
            return y
        if self.kind == "rms":
            y, self.rstd[rows] = aten._fused_rms_norm(z, [z.shape[-1]], self.fwd_weight, self.eps)
            return y
        if not self.training:
            return torch.addcmul(self.eval_shift[t], z, self.eval_scale[t])
        bn: MaskedBatchNorm = self.module
        update = z.shape[0] >= 2 and (not bn.per_step or t < bn.max_steps)
        slot = t if bn.per_step else 0
        rm = bn.running_mean[slot] if update else None
        rv = bn.running_var[slot] if update else None
        y, self.mean[t], self.rstd[t] = torch.native_batch_norm(
            z, self.fwd_weight, self.fwd_bias, rm, rv, True, bn.momentum, self.eps
        )
        return y

    def backward(self, dy: Tensor, z: Tensor, t: int, rows: slice) -> Tensor:
        """The gradient with respect to ``z`` (the unscaled output's gradient ``dy`` in)."""
        if self.kind == "none":
            return dy
        if self.kind == "ln":
            return aten.native_layer_norm_backward(
                dy, z, [z.shape[-1]], self.mean[rows], self.rstd[rows], self.weight, None, [True, False, False]
            )[0]
        if self.kind == "rms":  # (the fused RMSNorm backward kernel has no CPU implementation)
            rstd = self.rstd[rows]
            zhat = z * rstd
            dzhat = dy * self.weight
            return (dzhat - zhat * (dzhat * zhat).mean(-1, keepdim=True)).mul_(rstd)
        if not self.training:
            return dy * self.eval_grad_scale[t]
        return aten.native_batch_norm_backward(
            dy, z, self.weight, None, None, self.mean[t], self.rstd[t], True, self.eps, [True, False, False]
        )[0]

    def param_grads(self, dy: Tensor, z: Tensor, steps: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Gradients of the gain and shift from all rows at once: ``dy``, ``z`` are ``(N, F)``, ``steps`` ``(N,)``."""
        if self.kind == "none":
            return None, None
        if self.kind == "ln":
            _, dw, db = aten.native_layer_norm_backward(
                dy, z, [z.shape[-1]], self.mean, self.rstd, self.weight, self.bias, [False, True, self.bias is not None]
            )
            return dw, db
        if self.kind == "rms":
            return (dy * z * self.rstd).sum(0), None
        zhat = (z - self.mean[steps]) * self.rstd[steps]
        return (dy * zhat).sum(0), None if self.bias is None else dy.sum(0)


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

    def steps(self, device: torch.device) -> Tensor:
        """The time step of every packed row."""
        sizes = torch.tensor(self.batch_sizes, device=device)
        return torch.repeat_interleave(torch.arange(len(self.batch_sizes), device=device), sizes)

    def last_rows(self, device: torch.device) -> Tensor:
        """For every sequence (in sorted order), the packed row of its last step."""
        sizes = torch.tensor(self.batch_sizes)
        lengths = (torch.arange(sizes[0]).unsqueeze(0) < sizes.unsqueeze(1)).sum(0)
        offsets = torch.tensor(self.offsets)
        return (offsets[lengths - 1] + torch.arange(sizes[0])).to(device)


def _cat_prev(first: Tensor, packed: Tensor, layout: Layout) -> Tensor:
    """The previous step's rows for every packed row: ``first`` at t = 0, then the packed rows of step t − 1."""
    parts = [first[: layout.batch_sizes[0]]]
    parts += [packed[layout.prev(t)] for t in range(1, len(layout.batch_sizes))]
    return torch.cat(parts)


class FusedLSTM(torch.autograd.Function):
    """The recurrence of an LSTM whose gates are u_t + N_h(W_h h_{t-1}) and whose output is σ(o) ⊙ tanh(N_c(c_t)).

    Inputs are in packed order: ``u`` ``(N, 4H)`` (the input term, bias included), ``h0``, ``c0`` ``(B, H)`` sorted
    by length. Returns the packed outputs ``(N, H)`` and the final ``h``, ``c`` (sorted order).
    """

    @staticmethod
    def forward(ctx, u, h0, c0, w_hh, wh, bh, wc, bc, layout: Layout, norm_h: StepNorm, norm_c: StepNorm):
        n, hidden = u.shape[0], h0.shape[1]
        steps = len(layout.batch_sizes)
        norm_h.start(n, steps, 4 * hidden, u)
        norm_c.start(n, steps, hidden, u)
        us = u * norm_h.scale  # doubled candidate block: one sigmoid gives tanh(g) = 2σ(2g) − 1
        s = torch.empty_like(u)  # sigmoid of the (scaled) pre-activations
        z = torch.empty_like(u)  # W_h h_{t-1}
        h = u.new_empty(n, hidden)
        c = u.new_empty(n, hidden)
        sc = u.new_empty(n, hidden)  # σ(2 N_c(c_t)), so tanh(N_c(c_t)) = 2 sc − 1
        wt = w_hh.t()
        for t in range(steps):
            rows = layout.at(t)
            hp, cp = (h0, c0) if t == 0 else (h[layout.prev(t)], c[layout.prev(t)])
            zt = torch.mm(hp, wt, out=z[rows])
            st = torch.add(us[rows], norm_h.forward(zt, t, rows), out=s[rows]).sigmoid_()
            i, f, g, o = st.chunk(4, dim=1)
            ct = torch.mul(i, g, out=c[rows]).mul_(2).sub_(i)  # i ⊙ tanh(g)
            ct.addcmul_(f, cp)
            sct = torch.sigmoid(norm_c.forward(ct, t, rows), out=sc[rows])
            torch.mul(o, sct, out=h[rows]).mul_(2).sub_(o)  # o ⊙ tanh(N_c(c_t))
        last = layout.last_rows(u.device)
        ctx.save_for_backward(h0, c0, w_hh, s, z, h, c, sc)
        ctx.layout, ctx.norm_h, ctx.norm_c = layout, norm_h, norm_c
        ctx.needs = (wh is not None, bh is not None, wc is not None, bc is not None)
        return h, h[last], c[last]

    @staticmethod
    def backward(ctx, dout, dhn, dcn):
        h0, c0, w_hh, s, z, h, c, sc = ctx.saved_tensors
        layout, norm_h, norm_c = ctx.layout, ctx.norm_h, ctx.norm_c
        last = layout.last_rows(s.device)
        dout = dout.clone() if dout is not None else torch.zeros_like(h)
        dc_all = torch.zeros_like(c)
        if dhn is not None:
            dout.index_add_(0, last, dhn)
        if dcn is not None:
            dc_all.index_add_(0, last, dcn)
        du = torch.empty_like(s)  # gradient of the gate pre-activations = of u
        dz = du if norm_h.kind == "none" else torch.empty_like(z)
        dchat = None if norm_c.kind == "none" else torch.empty_like(c)
        dh0, dc0 = torch.zeros_like(h0), torch.zeros_like(c0)
        for t in reversed(range(len(layout.batch_sizes))):
            rows, bs = layout.at(t), layout.batch_sizes[t]
            st, sct, ct = s[rows], sc[rows], c[rows]
            i, f, g, o = st.chunk(4, dim=1)
            cp = c0[:bs] if t == 0 else c[layout.prev(t)]
            dh, dc = dout[rows], dc_all[rows]
            dst = du[rows]
            di, df, dg, do = dst.chunk(4, dim=1)
            tanh_c = sct * 2 - 1
            torch.mul(dh, tanh_c, out=do)
            dn = dh * o * (sct - sct * sct) * 4  # through tanh(N_c(c))
            if norm_c.kind != "none":
                dchat[rows] = dn
                dn = norm_c.backward(dn, ct, t, rows)
            dc = dc + dn
            torch.mul(dc, g, out=di).mul_(2).sub_(dc)  # dc ⊙ tanh(g)
            torch.mul(dc, cp, out=df)
            torch.mul(dc, i, out=dg).mul_(4)
            dst.mul_(st - st * st)  # σ' (and tanh' = 4σ'(2g) for the candidate block)
            dcp = dc * f
            dzt = norm_h.backward(dst, z[rows], t, rows)
            if norm_h.kind != "none":
                dz[rows] = dzt
            dhp = torch.mm(dzt, w_hh)
            if t == 0:
                dh0[:bs], dc0[:bs] = dhp, dcp
            else:
                prev = layout.prev(t)
                dout[prev] += dhp
                dc_all[prev] += dcp
        hprev = _cat_prev(h0, h, layout)
        dw_hh = dz.t().mm(hprev)
        steps = layout.steps(s.device)
        dwh, dbh = norm_h.param_grads(du, z, steps)
        dwc = dbc = None
        if norm_c.kind != "none":
            dwc, dbc = norm_c.param_grads(dchat, c, steps)
        wh_, bh_, wc_, bc_ = ctx.needs
        return (
            du,
            dh0,
            dc0,
            dw_hh,
            dwh if wh_ else None,
            dbh if bh_ else None,
            dwc if wc_ else None,
            dbc if bc_ else None,
            None,
            None,
            None,
        )


def candidate_scale(hidden: int, like: Tensor) -> Tensor:
    """1 on the i, f, o blocks and 2 on the candidate block g (gate order i, f, g, o)."""
    scale = like.new_ones(4 * hidden)
    scale[2 * hidden : 3 * hidden] = 2
    return scale


def run_packed(recurrence, u: Tensor, state: tuple[Tensor, ...], mask: Tensor | None):
    """Run ``recurrence(u_packed, state_sorted, layout) -> (out_packed, final_sorted)`` on a padded ``(T, B, G)`` ``u``.

    Returns the padded output ``(T, B, H)`` (zeros at padded positions) and the final state in the batch's own order.
    """
    steps, batch = u.shape[:2]
    if mask is None:
        layout = Layout([batch] * steps)
        out, final = recurrence(u.reshape(steps * batch, -1), state, layout)
        return out.view(steps, batch, -1), final
    packed = pack_padded_sequence(u, mask.sum(0).cpu(), enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    layout = Layout(packed.batch_sizes.tolist())
    out, final = recurrence(packed.data, tuple(s.index_select(0, order) for s in state), layout)
    out, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes, order, unorder), total_length=steps)
    return out, tuple(f.index_select(0, unorder) for f in final)
