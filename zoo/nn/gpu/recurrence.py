"""The autograd functions of the ``triton`` backend: `zoo.nn.fused`'s recurrences with their step work in
`zoo.nn.gpu.kernels`.

Each function takes and returns what its `zoo.nn.fused` counterpart does (`FusedLSTM`, `FusedGRU`, `FusedIndRNN`), on
packed rows (`zoo.nn.fused.Layout`). A step's loop body is the GEMM and one kernel launch (`launch`, `gemm`: counted in
`zoo.nn.gpu.LAUNCHES`); nothing else in the loop launches work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..fused import Layout, StepNorm
from ..fused.common import _grads, recording
from ..norm import MIN_ROWS, MaskedBatchNorm
from . import LAUNCHES
from . import kernels as K

TILE = 4096  # elements per program, about (rows x gates x units), where the norms leave a choice


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch a Triton kernel, counted; its warps from its tile (`warps`) unless ``meta`` names them."""
    LAUNCHES["kernel"] += 1
    meta.setdefault("num_warps", warps(meta["BR"] * meta["BJ"] * GATES.get(kernel.__name__, 1)))
    kernel[grid](*args, **meta)


GATES = {"lstm_forward": 4, "lstm_backward": 4, "gru_forward": 3, "gru_backward": 3}


def warps(elements: int) -> int:
    """Warps for a tile of ``elements``: 8 for the 4096 of `TILE` (with 4, the batch-norm LSTM forward kernel
    compiled for sm_90 spilled 56-64 bytes of stack; with 8 no kernel spills), fewer for smaller tiles."""
    return min(8, _pow2(max(1, elements // 512)))


def gemm(a: Tensor, b: Tensor, out: Tensor, add: bool = False) -> None:
    """``out = a @ b`` (``add``: ``out += a @ b``) in one `torch` GEMM call, counted."""
    LAUNCHES["gemm"] += 1
    if add:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def kind(norm: StepNorm) -> int:
    """The kernels' norm kind of ``norm``."""
    if norm.kind == "none":
        return K.NONE
    if norm.weight is None:
        raise TypeError(f"the triton backend needs a norm with a gain, got {norm.module!r}")
    if norm.kind == "ln":
        return K.LN
    if norm.kind == "rms":
        return K.RMS
    return K.BN if norm.module.training else K.AFFINE


def tile(kinds: tuple[int, ...], rows: int, units: int, gates: int) -> tuple[int, int]:
    """(BR, BJ): rows x units of a program's tile. A batch norm needs all rows in it, a layer or RMS norm all units."""
    br, bj = _pow2(rows), _pow2(units)
    if K.BN in kinds:
        if K.LN in kinds or K.RMS in kinds:
            raise TypeError("the triton backend has no kernel for a batch norm beside a layer or RMS norm")
        return br, max(1, min(bj, _pow2(TILE // (br * gates) + 1) // 2))
    if K.LN in kinds or K.RMS in kinds:
        return max(1, min(br, _pow2(TILE // (bj * gates) + 1) // 2)), bj
    return min(br, 16), min(bj, 64)


def acc(dtype: torch.dtype):
    """The kernels' arithmetic type for states of ``dtype``."""
    return K.tl.float64 if dtype == torch.float64 else K.tl.float32


def precisions(u: Tensor, *others: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtype of the states and gates (that of the inputs, promoted; the kernels compute in float32 or float64,
    and keep the statistics so) and that of the recurrent GEMMs: autocast's (bfloat16 or float16) where it is on and
    the states are float32, else the same."""
    dtype = u.dtype
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    kind = u.device.type
    if dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return dtype, torch.get_autocast_dtype(kind)
    return dtype, dtype


def fold_final(dout: Tensor | None, dfinal: Tensor | None, layout: Layout, like: Tensor) -> Tensor:
    """The gradient of the packed outputs with that of the final state added at each sequence's last row (one tensor:
    the backward kernels read the gradient of h at a step from it and from the carries)."""
    d = (
        like.new_zeros(like.shape)
        if dout is None
        else dout.to(like.dtype, copy=True, memory_format=torch.contiguous_format)
    )
    if dfinal is not None:
        d.index_add_(0, layout.last_rows(like.device), dfinal.to(like.dtype))
    return d


def eps(norm: StepNorm, like: Tensor) -> float:
    return float(norm.eps) if norm.eps is not None else float(torch.finfo(like.dtype).eps)


def step_index(layout: Layout, device: torch.device) -> Tensor:
    """The time step of every packed row."""
    sizes = torch.tensor(layout.batch_sizes)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)


class _Stats:
    """Where a norm's kernel statistics go: per row for LN/RMS ``(N,)``, per step and feature for BN ``(T, F)``;
    for an evaluation batch norm the per-step scale and shift (`StepNorm.start`) are read instead."""

    def __init__(self, norm: StepNorm, k: int, layout: Layout, features: int, like: Tensor) -> None:
        self.norm, self.k = norm, k
        steps, rows = len(layout.batch_sizes), layout.rows
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        shape = (steps, features) if k == K.BN else (rows,) if k in (K.LN, K.RMS) else (1,)  # (else unused)
        self.mean = like.new_zeros(shape, dtype=dtype)
        self.rstd = like.new_zeros(shape, dtype=dtype)
        self.layout = layout

    def at(self, t: int) -> tuple[Tensor, Tensor]:
        """The statistics of step ``t`` as the kernels address them."""
        if self.k == K.BN:
            return self.mean[t], self.rstd[t]
        if self.k not in (K.LN, K.RMS):
            return self.mean, self.rstd
        rows = self.layout.at(t)
        return self.mean[rows], self.rstd[rows]

    def affine(self, t: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The gain and shift vectors the forward kernel reads at step ``t`` (evaluation BN: the step's map)."""
        n = self.norm
        if self.k == K.AFFINE:
            return n.eval_scale[t], n.eval_shift[t]
        return (like if n.fwd_weight is None else n.fwd_weight), n.fwd_bias

    def running(self, t: int, rows: int, like: Tensor) -> tuple[Tensor, Tensor, int]:
        """A training batch norm's running mean and variance rows for step ``t`` and whether the kernel moves them."""
        if self.k != K.BN:
            return like, like, 0
        bn: MaskedBatchNorm = self.norm.module
        row = t if bn.per_step else 0
        update = int(rows >= MIN_ROWS and row < bn.running_mean.shape[0])
        row = min(row, bn.running_mean.shape[0] - 1)
        return bn.running_mean[row], bn.running_var[row], update

    def hat(self, x: Tensor, steps: Tensor) -> Tensor:
        """The normalized packed rows ``x`` (before gain and shift), for the gain gradients."""
        x = x.to(self.mean.dtype if self.k != K.AFFINE else self.norm.eval_mean.dtype)
        if self.k == K.LN:
            return (x - self.mean.unsqueeze(1).to(x.dtype)) * self.rstd.unsqueeze(1).to(x.dtype)
        if self.k == K.RMS:
            return x * self.rstd.unsqueeze(1).to(x.dtype)
        if self.k == K.BN:
            return (x - self.mean[steps].to(x.dtype)) * self.rstd[steps].to(x.dtype)
        n = self.norm  # AFFINE: the running statistics of each step
        return (x - n.eval_mean[steps]) * n.eval_rstd[steps]

    def param_grads(self, dy: Tensor, x: Tensor, steps: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The gain and shift gradients Σ dy ⊙ x̂ and Σ dy over the packed rows (None where there is none)."""
        n = self.norm
        if self.k == K.NONE:
            return None, None
        dw = (dy * self.hat(x, steps)).sum(0)
        db = dy.sum(0) if n.bias is not None else None
        return dw, db


class TritonLSTM(torch.autograd.Function):
    """`zoo.nn.fused.FusedLSTM` with each step's work after the GEMM in `kernels.lstm_forward` (backward:
    `kernels.lstm_backward`); the same inputs and outputs. The norms travel as `StepNorm`s built without a scale.
    Under autocast the GEMMs run in its dtype (W_h and h cast: h by the kernel, as a second output), the norms, gates
    and states in float32."""

    @staticmethod
    def forward(ctx, u, h0, c0, w_hh, wh, bh, wc, bc, layout: Layout, norm_h: StepNorm, norm_c: StepNorm, grad):
        n_rows, hidden = u.shape[0], h0.shape[1]
        steps, first = len(layout.batch_sizes), layout.batch_sizes[0]
        dtype, low = precisions(u, h0, c0, w_hh)
        u, h0, c0 = u.contiguous(), h0.to(dtype).contiguous(), c0.to(dtype).contiguous()
        w_g, lowp = w_hh.to(low).contiguous(), low != dtype
        norm_h.start(steps, u)
        norm_c.start(steps, u)
        kh, kc = kind(norm_h), kind(norm_c)
        br, bj = tile((kh, kc), first, hidden, 4)
        train = recording(ctx, grad)
        keep = n_rows if train else first
        h, c = u.new_empty(n_rows, hidden, dtype=dtype), u.new_empty(n_rows, hidden, dtype=dtype)
        s, tc = u.new_empty(keep, 4 * hidden, dtype=dtype), u.new_empty(keep, hidden, dtype=dtype)
        z = u.new_empty(keep, 4 * hidden, dtype=low)
        h0g, hl = (h0.to(low), u.new_empty(n_rows, hidden, dtype=low)) if lowp else (h0, h)
        sh = _Stats(norm_h, kh, layout, 4 * hidden, h)
        sc = _Stats(norm_c, kc, layout, hidden, h)
        w_t = w_g.t()
        for t in range(steps):
            rows, b = layout.at(t), layout.batch_sizes[t]
            hp, cp = (h0g[:b], c0[:b]) if t == 0 else (hl[layout.prev(t)], c[layout.prev(t)])
            saved = rows if train else slice(0, b)
            gemm(hp, w_t, z[saved])
            (wh_t, bh_t), (wc_t, bc_t) = sh.affine(t, u), sc.affine(t, u)
            rmh, rvh, upd_h = sh.running(t, b, u)
            rmc, rvc, upd_c = sc.running(t, b, u)
            launch(
                K.lstm_forward, (triton_cdiv(b, br), triton_cdiv(hidden, bj)),
                z[saved], u[rows], cp, h[rows], c[rows], s[saved], tc[saved], hl[rows],
                wh_t, u if bh_t is None else bh_t, wc_t, u if bc_t is None else bc_t,
                *sh.at(t), *sc.at(t), rmh, rvh, rmc, rvc,
                b, hidden, eps(norm_h, u) if kh else 0.0, eps(norm_c, u) if kc else 0.0,
                _momentum(norm_h, norm_c), upd_h or upd_c,
                KH=kh, KC=kc, HAS_BH=bh_t is not None, HAS_BC=bc_t is not None, SAVE=train, LOWP=lowp,
                ACC=acc(dtype), BR=br, BJ=bj,
            )  # fmt: skip
        last = layout.last_rows(u.device)
        ctx.save_for_backward(h0g, c0, w_g, s, hl, c, tc, z)
        ctx.layout, ctx.stats, ctx.tile, ctx.dtypes = layout, (sh, sc), (br, bj), (u.dtype, w_hh.dtype)
        return h, h[last], c[last]

    @staticmethod
    def backward(ctx, dout, dhn, dcn):
        h0g, c0, w_g, s, hl, c, tc, z = ctx.saved_tensors
        layout, (sh, sc), (br, bj) = ctx.layout, ctx.stats, ctx.tile
        hidden, dtype = c0.shape[1], c.dtype
        dh_in = fold_final(dout, dhn, layout, c)  # (the gradient of h at each row, but for the recurrent part)
        dh_gemm = torch.zeros_like(h0g)  # dz_{t+1} W_h: the recurrent part, written by the GEMM
        dc_carry = torch.zeros_like(c0) if dcn is None else dcn.to(dtype).contiguous().clone()
        du = torch.empty_like(s)
        store_dz = sh.k != K.NONE or w_g.dtype != dtype
        dz = torch.empty_like(s, dtype=w_g.dtype) if store_dz else du
        dn = torch.empty_like(c)
        wh = sh.affine(0, s)[0] if sh.k != K.AFFINE else None
        wc = sc.affine(0, s)[0] if sc.k != K.AFFINE else None
        for t in reversed(range(len(layout.batch_sizes))):
            rows, b = layout.at(t), layout.batch_sizes[t]
            cp = c0[:b] if t == 0 else c[layout.prev(t)]
            launch(
                K.lstm_backward, (triton_cdiv(b, br), triton_cdiv(hidden, bj)),
                dh_gemm, dh_in[rows], dc_carry, s[rows], tc[rows], c[rows], cp, z[rows],
                _gain(sh, t, wh, s), _gain(sc, t, wc, s), *sh.at(t), *sc.at(t),
                du[rows], dz[rows], dn[rows],
                b, hidden,
                KH=sh.k, KC=sc.k, STORE_DZ=store_dz, ACC=acc(dtype), BR=br, BJ=bj,
            )  # fmt: skip
            gemm(dz[rows], w_g, dh_gemm[:b])
        steps = step_index(layout, s.device)
        u_dtype, w_dtype = ctx.dtypes
        dw_hh = dz.t().mm(layout.previous(h0g, hl)).to(w_dtype) if ctx.needs_input_grad[3] else None
        dh0 = dh_gemm.to(dtype)
        grads = (*sh.param_grads(du, z, steps), *sc.param_grads(dn, c, steps))
        return _grads(ctx, du.to(u_dtype), dh0, dc_carry, dw_hh, *grads)


def _gain(stats: _Stats, t: int, w: Tensor | None, like: Tensor) -> Tensor:
    """The vector the backward kernel multiplies the incoming gradient by: the gain, or an evaluation batch norm's
    scale of step ``t``."""
    if stats.k == K.AFFINE:
        return stats.norm.eval_scale[t]
    return like if w is None else w


def _momentum(*norms: StepNorm) -> float:
    for n in norms:
        if n.kind == "bn":
            return float(n.module.momentum)
    return 0.0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TritonGRU(torch.autograd.Function):
    """`zoo.nn.fused.FusedGRU` with each step's work after the GEMM in `kernels.gru_forward` (backward:
    `kernels.gru_backward`); the same inputs and outputs. Row-local norms (LayerNorm, RMSNorm) only. Under autocast
    as `TritonLSTM`."""

    @staticmethod
    def forward(ctx, u, h0, w_hh, b_hn, w_rz, b_rz, w_n, b_n, layout: Layout, norm_rz, norm_n, grad):
        n_rows, hidden = u.shape[0], h0.shape[1]
        steps, first = len(layout.batch_sizes), layout.batch_sizes[0]
        dtype, low = precisions(u, h0, w_hh)
        u, h0 = u.contiguous(), h0.to(dtype).contiguous()
        w_g, lowp = w_hh.to(low).contiguous(), low != dtype
        norm_rz.start(steps, u)
        norm_n.start(steps, u)
        krz, kn = kind(norm_rz), kind(norm_n)
        if K.BN in (krz, kn) or K.AFFINE in (krz, kn):
            raise TypeError("the triton GRU kernels normalize with layer or RMS norms only")
        br, bj = tile((K.LN,), first, hidden, 3)  # (the tile spans all units)
        train = recording(ctx, grad)
        keep = n_rows if train else first
        h = u.new_empty(n_rows, hidden, dtype=dtype)
        rz, nn_ = u.new_empty(keep, 2 * hidden, dtype=dtype), u.new_empty(keep, hidden, dtype=dtype)
        a = u.new_empty(keep, 3 * hidden, dtype=low)
        h0g, hl = (h0.to(low), u.new_empty(n_rows, hidden, dtype=low)) if lowp else (h0, h)
        srz = _Stats(norm_rz, krz, layout, 2 * hidden, h)
        sn = _Stats(norm_n, kn, layout, hidden, h)
        w_t = w_g.t()
        for t in range(steps):
            rows, b = layout.at(t), layout.batch_sizes[t]
            hp, hpg = (h0[:b], h0g[:b]) if t == 0 else (h[layout.prev(t)], hl[layout.prev(t)])
            saved = rows if train else slice(0, b)
            gemm(hpg, w_t, a[saved])
            (wrz, brz), (wn, bn) = srz.affine(t, u), sn.affine(t, u)
            launch(
                K.gru_forward, (triton_cdiv(b, br),),
                a[saved], u[rows], hp, h[rows], rz[saved], nn_[saved], hl[rows],
                wrz, u if brz is None else brz, wn, u if bn is None else bn,
                *srz.at(t), *sn.at(t),
                b, hidden, eps(norm_rz, u) if krz else 0.0, eps(norm_n, u) if kn else 0.0,
                KRZ=krz, KN=kn, HAS_BRZ=brz is not None, HAS_BN=bn is not None, SAVE=train, LOWP=lowp,
                ACC=acc(dtype), BR=br, BJ=bj,
            )  # fmt: skip
        last = layout.last_rows(u.device)
        ctx.save_for_backward(h0, h0g, w_g, rz, nn_, h, hl, a)
        ctx.layout, ctx.stats, ctx.tile, ctx.dtypes = layout, (srz, sn), (br, bj), (u.dtype, w_hh.dtype)
        return h, h[last]

    @staticmethod
    def backward(ctx, dout, dhn):
        h0, h0g, w_g, rz, nn_, h, hl, a = ctx.saved_tensors
        layout, (srz, sn), (br, bj) = ctx.layout, ctx.stats, ctx.tile
        hidden, dtype = h0.shape[1], h.dtype
        dh_in = fold_final(dout, dhn, layout, h)
        dh_direct = torch.zeros_like(h0)  # z ⊙ dh of the step after
        dh_gemm = torch.zeros_like(h0g)  # da_{t+1} W_h
        du = torch.empty_like(a, dtype=dtype)
        da, dyn = torch.empty_like(a), torch.empty_like(nn_)
        wrz, (wn, bn) = srz.affine(0, h)[0], sn.affine(0, h)
        for t in reversed(range(len(layout.batch_sizes))):
            rows, b = layout.at(t), layout.batch_sizes[t]
            hp = h0[:b] if t == 0 else h[layout.prev(t)]
            launch(
                K.gru_backward, (triton_cdiv(b, br),),
                dh_direct, dh_gemm, dh_in[rows], hp, rz[rows], nn_[rows], a[rows],
                wrz, wn, h if bn is None else bn, *srz.at(t), *sn.at(t),
                du[rows], da[rows], dyn[rows],
                b, hidden,
                KRZ=srz.k, KN=sn.k, HAS_BN=bn is not None, ACC=acc(dtype), BR=br, BJ=bj,
            )  # fmt: skip
            gemm(da[rows], w_g, dh_gemm[:b])
        steps = step_index(layout, h.device)
        u_dtype, w_dtype = ctx.dtypes
        dw_hh = da.t().mm(layout.previous(h0g, hl)).to(w_dtype) if ctx.needs_input_grad[2] else None
        dbhn = dyn.sum(0) if ctx.needs_input_grad[3] else None
        rz_grads = srz.param_grads(du[:, : 2 * hidden], a[:, : 2 * hidden], steps)
        n_grads = sn.param_grads(dyn, a[:, 2 * hidden :], steps)
        dh0 = dh_direct.add_(dh_gemm)
        return _grads(ctx, du.to(u_dtype), dh0, dw_hh, dbhn, *rz_grads, *n_grads)


class TritonIndRNN(torch.autograd.Function):
    """`zoo.nn.fused.FusedIndRNN` in one kernel launch each way (`kernels.indrnn_forward`, `kernels.indrnn_backward`):
    the recurrence is elementwise, so a program runs its tile of sequences x units through all steps."""

    @staticmethod
    def forward(ctx, u, h0, w, layout: Layout):
        hidden, first = h0.shape[1], layout.batch_sizes[0]
        dtype = precisions(u, h0, w)[0]
        u, h0 = u.contiguous(), h0.to(dtype).contiguous()
        h = torch.empty_like(u, dtype=dtype)
        sizes = torch.tensor(layout.batch_sizes, dtype=torch.int32, device=u.device)
        offsets = torch.tensor(layout.offsets, dtype=torch.int32, device=u.device)
        br, bj = tile((K.NONE,), first, hidden, 1)
        grid = (triton_cdiv(first, br), triton_cdiv(hidden, bj))
        launch(K.indrnn_forward, grid, u, h0, w, h, sizes, offsets, len(layout.batch_sizes), first, hidden,
               ACC=acc(dtype), BR=br, BJ=bj)  # fmt: skip
        ctx.save_for_backward(h0, w, h, sizes, offsets)
        ctx.layout, ctx.grid, ctx.tile = layout, grid, (br, bj)
        return h, h[layout.last_rows(u.device)]

    @staticmethod
    def backward(ctx, dout, dhn):
        h0, w, h, sizes, offsets = ctx.saved_tensors
        layout, (br, bj) = ctx.layout, ctx.tile
        dhn = torch.zeros_like(h0) if dhn is None else dhn.contiguous()
        dout = None if dout is None else dout.contiguous()
        du, dh0 = torch.empty_like(h), torch.empty_like(h0)
        first, hidden = layout.batch_sizes[0], h0.shape[1]
        launch(
            K.indrnn_backward, ctx.grid, h if dout is None else dout, dhn, h, w, du, dh0, sizes, offsets,
            len(layout.batch_sizes), first, hidden, HAS_DOUT=dout is not None, ACC=acc(h.dtype), BR=br, BJ=bj,
        )  # fmt: skip
        dw = (du * layout.previous(h0, h)).sum(0) if ctx.needs_input_grad[2] else None
        return _grads(ctx, du, dh0, dw)
