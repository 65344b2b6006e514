"""`FusedGRU`: the normalized GRU's recurrence with a hand-written backward through time."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import _grads, recording
from .gemm import Linear, Panels, bf16_products
from .packed import Layout, OuterSum
from .step_norm import StepNorm, _extension


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
        ctx.bf16 = ext is not None and bf16_products(ext, u)
        lin = Linear(w_hh, first) if ext is None else Panels(ext, w_hh, ctx.bf16)
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
        lin_t = (
            Linear(w_hh.t().contiguous(), layout.batch_sizes[0])
            if ctx.ext is None
            else Panels(ctx.ext, w_hh.t(), ctx.bf16)
        )
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
