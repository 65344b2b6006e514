"""`FusedIndRNN`: the IndRNN's elementwise recurrence with a hand-written backward through time."""

from __future__ import annotations

import torch

from . import common
from .common import _grads, aten
from .packed import Layout


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
            chunk = max(1, common.BLOCK * steps // max(1, h.numel()))
            for t0 in range(0, steps, chunk):
                t1 = min(t0 + chunk, steps)
                rows = slice(layout.offsets[t0], layout.offsets[t1 - 1] + layout.batch_sizes[t1 - 1])
                dw.add_((du[rows] * layout.previous(h0, h, range(t0, t1))).sum(0))
        return _grads(ctx, du, dh0, dw)
