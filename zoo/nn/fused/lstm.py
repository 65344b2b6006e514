"""`FusedLSTM`: the normalized LSTM's recurrence with a hand-written backward through time."""

from __future__ import annotations

import torch

from .common import _grads, recording
from .gemm import Linear, Panels, bf16_products, outer
from .input_term import DeferredInput
from .packed import Layout, OuterSum, candidate_scale
from .step_norm import StepNorm, _extension


class FusedLSTM(torch.autograd.Function):
    """The recurrence of an LSTM whose gates are u_t + N_h(W_h h_{t-1}) and whose output is σ(o) ⊙ tanh(N_c(c_t)).

    ``u`` ``(N, 4H)`` is the input term (bias included) in packed order, or in inference a `DeferredInput` that the
    compiled loop computes a step at a time; ``h0``, ``c0`` ``(B, H)`` sorted by length;
    ``norm_h`` carries the candidate-doubling scale, ``norm_c`` a scale of 2. Returns the packed outputs ``(N, H)`` and
    the final ``h``, ``c`` (sorted order). The gains and shifts of the norms are inputs so that autograd routes their
    gradients; the norms themselves travel in ``norm_h`` and ``norm_c``.
    """

    @staticmethod
    def forward(ctx, u, h0, c0, w_hh, wh, bh, wc, bc, layout: Layout, norm_h: StepNorm, norm_c: StepNorm, grad: bool):
        deferred = None
        if isinstance(u, DeferredInput):  # u: the loop's scratch for a step's input term
            deferred, u = u, u.x.new_empty(layout.batch_sizes[0], u.proj.shape[0])
        n, hidden = layout.rows, h0.shape[1]
        steps = len(layout.batch_sizes)
        norm_h.start(steps, u)
        norm_c.start(steps, u)
        gscale = candidate_scale(hidden, u)  # doubles the candidate block: one sigmoid gives tanh(g) = 2σ(2g) − 1
        weight = w_hh * gscale.unsqueeze(1) if norm_h.kind == "none" else w_hh
        ext = _extension(u, h0, c0, w_hh, norm_h, norm_c)
        if deferred is not None and ext is None:
            u, deferred = deferred.materialize(layout), None
        ctx.bf16 = ext is not None and bf16_products(ext, u)
        lin = Linear(weight, layout.batch_sizes[0]) if ext is None else Panels(ext, weight, ctx.bf16)
        train = recording(ctx, grad)  # else inference: keep only what the next step reads (a DeferredInput: always)
        h, c = u.new_empty(n, hidden), u.new_empty(n, hidden)
        s = torch.empty_like(u) if train else None  # σ of the pre-activations (the candidate block: σ(2g))
        sc = u.new_empty(n, hidden) if train else None  # σ(2 N_c(c_t)), so that tanh(N_c(c_t)) = 2 sc − 1
        z = torch.empty_like(u) if train and norm_h.kind != "none" else None  # W_h h_{t-1}, for backward
        if ext is not None:
            FusedLSTM._forward_ext(ext, u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z, deferred)
        else:
            FusedLSTM._forward_python(u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z)
        last = layout.last_rows(u.device)
        ctx.save_for_backward(h0, c0, w_hh, s, h, c, sc, z)
        ctx.layout, ctx.norm_h, ctx.norm_c, ctx.ext = layout, norm_h, norm_c, ext
        return h, h[last], c[last]

    @staticmethod
    def _forward_python(u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z) -> None:
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
    def _forward_ext(ext, u, h0, c0, gscale, lin, layout, norm_h, norm_c, h, c, s, sc, z, deferred) -> None:
        """All steps in the compiled loop, GEMMs included (inference: ``s``, ``sc`` a scratch of the first rows; with
        a `DeferredInput`, ``u`` too)."""
        train, first = s is not None, layout.batch_sizes[0]
        rows = layout.rows if train else first
        norm_h.ext_start(ext, len(layout.batch_sizes), rows, u, folded=True)
        norm_c.ext_start(ext, len(layout.batch_sizes), rows, u)
        s_buf = s if train else u.new_empty(first, u.shape[1])
        sc_buf = sc if train else u.new_empty(first, h.shape[1])
        x = {}
        if deferred is not None:
            x = dict(nx=deferred.ext_norm(ext, first), x=deferred.x.contiguous(), wx=deferred.proj,
                     x_panels=Panels(ext, deferred.proj).packed)  # fmt: skip
        ext.forward_loop(
            norm_h.ext, norm_c.ext, lin.weight, lin.packed, h0.contiguous(), u, gscale, c0.contiguous(),
            s_buf, c, sc_buf, h, z, layout.batch_sizes, train, **x,
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
        lin_t = (
            Linear(w_hh.t().contiguous(), layout.batch_sizes[0])
            if ctx.ext is None
            else Panels(ctx.ext, w_hh.t(), ctx.bf16)
        )
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
