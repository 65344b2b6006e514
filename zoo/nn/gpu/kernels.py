"""The Triton kernels of the ``triton`` backend: per time step, one launch for everything but the recurrent GEMM.

Imported only when the backend first runs: ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined, so the
choice between compiling for the GPU and interpreting on the CPU (numpy) is made at this module's import.

Norm kinds (a ``tl.constexpr``): `NONE` (identity), `LN` (layer norm over a row's features), `RMS`, `BN` (a training
batch norm: the statistics of the step's rows, per feature) and `AFFINE` (an evaluation batch norm: the step's scale
and shift vectors, passed in place of the gain and shift). A program owns a tile of rows x hidden units, with all
gates of those units: a row-local norm (LN, RMS) needs the tile to span all hidden units, a batch norm all of the
step's rows; the host picks the tile (`zoo.nn.gpu.recurrence.tile`). Arithmetic is in ``ACC`` (float32, or float64
for float64 tensors); the statistics are written in that type, the states and gates in their tensors' types.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

NONE, LN, RMS, BN, AFFINE = 0, 1, 2, 3, 4
# how these kernels were defined: interpreted (CPU) or compiled (triton.knobs from Triton 3.4; the variable before)
_knobs = getattr(triton, "knobs", None)
INTERPRETED = bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _move_running(rm_ptr, rv_ptr, off, mask, mean, var, bs, momentum, ACC: tl.constexpr):
    """A training batch norm's running statistics at ``off``: the exponential average of the step's mean and its
    unbiased variance (as torch.native_batch_norm), stored in the buffers' dtype."""
    rm = tl.load(rm_ptr + off, mask=mask, other=0.0).to(ACC)
    rv = tl.load(rv_ptr + off, mask=mask, other=0.0).to(ACC)
    tl.store(rm_ptr + off, (rm + momentum * (mean - rm)).to(rm_ptr.dtype.element_ty), mask=mask)
    tl.store(rv_ptr + off, (rv + momentum * (var * bs / (bs - 1) - rv)).to(rv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gate(x, gates, k: tl.constexpr):
    """Gate ``k`` of a ``(rows, 4, units)`` tile as a ``(rows, units)`` tile."""
    return tl.sum(tl.where(gates[None, :, None] == k, x, 0.0), axis=1)


@triton.jit
def _lstm_tile(bs, H, BR: tl.constexpr, BJ: tl.constexpr):
    """The tile of an LSTM step kernel: ``BR`` rows by ``BJ`` features of each of the 4 gates. Returns the row and
    feature indices, the gate index, their validity, the (rows, features) and (rows, gates, features) masks, the
    feature index in 4H ``col`` (4, BJ) and its mask, and the offsets of the tile in a (bs, 4H) tensor."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    js = tl.program_id(1) * BJ + tl.arange(0, BJ)
    gates = tl.arange(0, 4)
    rv, jv = rows < bs, js < H
    m2 = rv[:, None] & jv[None, :]
    m3 = m2[:, None, :] & (gates >= 0)[None, :, None]
    col = gates[:, None] * H + js[None, :]
    colm = (gates >= 0)[:, None] & jv[None, :]
    off3 = rows[:, None, None] * (4 * H) + col[None, :, :]
    return rows, js, gates, rv, jv, m2, m3, col, colm, off3


@triton.jit
def _row_sum(x):
    """The sum of each row of a ``(rows, units)`` or ``(rows, gates, units)`` tile."""
    if len(x.shape) == 3:
        return tl.sum(tl.sum(x, axis=2), axis=1)
    else:
        return tl.sum(x, axis=1)


@triton.jit
def _by_row(v, x):
    """A per-row vector ``v`` shaped to broadcast against the tile ``x`` (2-d or 3-d)."""
    if len(x.shape) == 3:
        return v[:, None, None]
    else:
        return v[:, None]


@triton.jit
def _row_norm(x, m, count, eps, stat_ptr, rstd_ptr, rows, rv, KIND: tl.constexpr):
    """A row-local norm (LN, RMS) of a tile (``(rows, units)`` or ``(rows, gates, units)``) holding all ``count``
    features of each row: the normalized tile, its statistics stored; the other kinds: ``x``."""
    if KIND == 1 or KIND == 2:
        if KIND == 1:
            mean = _row_sum(x) / count
            d = tl.where(m, x - _by_row(mean, x), 0.0)
            tl.store(stat_ptr + rows, mean, mask=rv)
        else:
            d = x
        rstd = 1.0 / tl.sqrt(_row_sum(d * d) / count + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rv)
        return d * _by_row(rstd, x)
    else:
        return x


@triton.jit
def _row_hat(x, m, stat_ptr, rstd_ptr, rows, rv, KIND: tl.constexpr):
    """The normalized tile again from the statistics `_row_norm` stored (the other kinds: ``x``)."""
    if KIND == 1:
        mean = tl.load(stat_ptr + rows, mask=rv, other=0.0).to(x.dtype)
        rstd = tl.load(rstd_ptr + rows, mask=rv, other=0.0).to(x.dtype)
        return tl.where(m, (x - _by_row(mean, x)) * _by_row(rstd, x), 0.0)
    elif KIND == 2:
        rstd = tl.load(rstd_ptr + rows, mask=rv, other=0.0).to(x.dtype)
        return x * _by_row(rstd, x)
    else:
        return x


@triton.jit
def _row_norm_backward(gy, xhat, count, rstd_ptr, rows, rv, KIND: tl.constexpr):
    """The gradient of x through `_row_norm` (LN, RMS), given that of the normalized tile ``gy`` (its gain applied)
    and the normalized tile ``xhat`` (`_row_hat`)."""
    if KIND == 1:
        gy = gy - _by_row(_row_sum(gy) / count, gy)
    rstd = tl.load(rstd_ptr + rows, mask=rv, other=0.0).to(xhat.dtype)
    return (gy - xhat * _by_row(_row_sum(gy * xhat) / count, gy)) * _by_row(rstd, gy)


@triton.jit
def _batch_norm(x, m, bs, eps, mean_ptr, rstd_ptr, off, mask, update, rm_ptr, rv_ptr, momentum, ACC: tl.constexpr):
    """A training batch norm of a tile holding all ``bs`` rows of the step on its first axis (any rank): each
    feature's statistics over the rows, stored at ``off`` (and, with ``update``, the running ones moved); returns
    (x − mean) · rstd, zero outside ``m``."""
    mean = tl.sum(x, axis=0) / bs
    d = tl.where(m, x - tl.expand_dims(mean, 0), 0.0)
    var = tl.sum(d * d, axis=0) / bs
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + off, mean, mask=mask)
    tl.store(rstd_ptr + off, rstd, mask=mask)
    if update != 0:
        _move_running(rm_ptr, rv_ptr, off, mask, mean, var, bs, momentum, ACC)
    return d * tl.expand_dims(rstd, 0)


@triton.jit
def _batch_norm_backward(gy, x, m, bs, mean_ptr, rstd_ptr, off, mask, ACC: tl.constexpr):
    """The gradient of x through `_batch_norm`, given that of its output ``gy`` (the gain applied)."""
    mean = tl.expand_dims(tl.load(mean_ptr + off, mask=mask, other=0.0).to(ACC), 0)
    rstd = tl.expand_dims(tl.load(rstd_ptr + off, mask=mask, other=0.0).to(ACC), 0)
    xhat = tl.where(m, (x - mean) * rstd, 0.0)
    dx = gy - tl.expand_dims(tl.sum(gy, axis=0), 0) / bs - xhat * tl.expand_dims(tl.sum(gy * xhat, axis=0) / bs, 0)
    return dx * rstd


@triton.jit
def lstm_forward(
    z_ptr, u_ptr, cp_ptr, h_ptr, c_ptr, s_ptr, tc_ptr, hl_ptr,
    wh_ptr, bh_ptr, wc_ptr, bc_ptr,
    mh_ptr, rh_ptr, mc_ptr, rc_ptr,
    rmh_ptr, rvh_ptr, rmc_ptr, rvc_ptr,
    bs, H, eps_h, eps_c, momentum, update,
    KH: tl.constexpr, KC: tl.constexpr, HAS_BH: tl.constexpr, HAS_BC: tl.constexpr, SAVE: tl.constexpr,
    LOWP: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """One LSTM step on its ``bs`` rows: gates u + N_h(z), c = σ(f) c_prev + σ(i) tanh(g), h = σ(o) tanh(N_c(c)).

    ``z`` = W_h h_prev ``(bs, 4H)``; writes ``h``, ``c`` and (``SAVE``) the activated gates ``s`` and tanh(N_c(c)) in
    ``tc``; the statistics of the norms at ``mh``/``rh`` and ``mc``/``rc`` (LN, RMS: per row; BN: per feature), and
    with ``update`` the running statistics of a batch norm (the exponential average with the unbiased variance);
    ``LOWP``: h also in ``hl`` (the low-precision copy the next step's GEMM reads, under autocast).
    """
    rows, js, gates, rv, jv, m2, m3, col, colm, off3 = _lstm_tile(bs, H, BR, BJ)
    z = tl.load(z_ptr + off3, mask=m3, other=0.0).to(ACC)
    # ---- N_h(z)
    if KH == 3:
        y = _batch_norm(z, m3, bs, eps_h, mh_ptr, rh_ptr, col, colm, update, rmh_ptr, rvh_ptr, momentum, ACC)
    else:
        y = _row_norm(z, m3, 4 * H, eps_h, mh_ptr, rh_ptr, rows, rv, KH)
    if KH == 1 or KH == 2 or KH == 3 or KH == 4:
        y = y * tl.load(wh_ptr + col, mask=colm, other=0.0).to(ACC)[None, :, :]
        if HAS_BH:
            y = y + tl.load(bh_ptr + col, mask=colm, other=0.0).to(ACC)[None, :, :]
    pre = tl.load(u_ptr + off3, mask=m3, other=0.0).to(ACC) + y
    act = tl.where(gates[None, :, None] == 2, _tanh(pre), _sigmoid(pre))
    i, f, g, o = _gate(act, gates, 0), _gate(act, gates, 1), _gate(act, gates, 2), _gate(act, gates, 3)
    off2 = rows[:, None] * H + js[None, :]
    cp = tl.load(cp_ptr + off2, mask=m2, other=0.0).to(ACC)
    c = tl.where(m2, f * cp + i * g, 0.0)
    # ---- N_c(c)
    if KC == 3:
        yc = _batch_norm(c, m2, bs, eps_c, mc_ptr, rc_ptr, js, jv, update, rmc_ptr, rvc_ptr, momentum, ACC)
    else:
        yc = _row_norm(c, m2, H, eps_c, mc_ptr, rc_ptr, rows, rv, KC)
    if KC == 1 or KC == 2 or KC == 3 or KC == 4:
        yc = yc * tl.load(wc_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
        if HAS_BC:
            yc = yc + tl.load(bc_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    tc = _tanh(yc)
    tl.store(h_ptr + off2, (o * tc).to(h_ptr.dtype.element_ty), mask=m2)
    if LOWP:
        tl.store(hl_ptr + off2, (o * tc).to(hl_ptr.dtype.element_ty), mask=m2)
    tl.store(c_ptr + off2, c.to(c_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        tl.store(s_ptr + off3, act.to(s_ptr.dtype.element_ty), mask=m3)
        tl.store(tc_ptr + off2, tc.to(tc_ptr.dtype.element_ty), mask=m2)


@triton.jit
def lstm_backward(
    dhg_ptr, dout_ptr, dcc_ptr, s_ptr, tc_ptr, c_ptr, cp_ptr, z_ptr,
    wh_ptr, wc_ptr, mh_ptr, rh_ptr, mc_ptr, rc_ptr,
    du_ptr, dz_ptr, dn_ptr,
    bs, H,
    KH: tl.constexpr, KC: tl.constexpr, STORE_DZ: tl.constexpr,
    ACC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """The backward of `lstm_forward` for one step: from the gradient of h (``dhg``: the previous backward step's
    GEMM, plus ``dout``: the output's, the final state's folded in) and the carried gradient of c (``dcc``) writes
    the gradient of the gate pre-activations ``du``, that of z = W_h h_prev in ``dz`` (``STORE_DZ``; else ``dz`` is
    ``du``), that of the normalized-and-shifted c in ``dn`` (for the gain gradients), and the carried gradient of
    c_prev into ``dcc``. The host then computes dh_prev = dz W_h into ``dhg`` (one GEMM)."""
    rows, js, gates, rv, jv, m2, m3, col, colm, off3 = _lstm_tile(bs, H, BR, BJ)
    off2 = rows[:, None] * H + js[None, :]
    dh = tl.load(dhg_ptr + off2, mask=m2, other=0.0).to(ACC) + tl.load(dout_ptr + off2, mask=m2, other=0.0).to(ACC)
    act = tl.load(s_ptr + off3, mask=m3, other=0.0).to(ACC)
    i, f, g, o = _gate(act, gates, 0), _gate(act, gates, 1), _gate(act, gates, 2), _gate(act, gates, 3)
    tc = tl.load(tc_ptr + off2, mask=m2, other=0.0).to(ACC)
    do = dh * tc * o * (1.0 - o)
    dn = tl.where(m2, dh * o * (1.0 - tc * tc), 0.0)
    tl.store(dn_ptr + off2, dn.to(dn_ptr.dtype.element_ty), mask=m2)
    # ---- through N_c
    if KC == 1 or KC == 2 or KC == 3 or KC == 4:
        gy = dn * tl.load(wc_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    else:
        gy = dn
    if KC == 1 or KC == 2:
        c = tl.load(c_ptr + off2, mask=m2, other=0.0).to(ACC)
        dc = _row_norm_backward(gy, _row_hat(c, m2, mc_ptr, rc_ptr, rows, rv, KC), H, rc_ptr, rows, rv, KC)
    elif KC == 3:
        c = tl.load(c_ptr + off2, mask=m2, other=0.0).to(ACC)
        dc = _batch_norm_backward(gy, c, m2, bs, mc_ptr, rc_ptr, js, jv, ACC)
    else:
        dc = gy
    dc = tl.where(m2, dc + tl.load(dcc_ptr + off2, mask=m2, other=0.0).to(ACC), 0.0)
    cp = tl.load(cp_ptr + off2, mask=m2, other=0.0).to(ACC)
    tl.store(dcc_ptr + off2, (dc * f).to(dcc_ptr.dtype.element_ty), mask=m2)
    di = dc * g * i * (1.0 - i)
    df = dc * cp * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    k = gates[None, :, None]
    du = tl.where(k == 2, dg[:, None, :], do[:, None, :])
    du = tl.where(k == 0, di[:, None, :], tl.where(k == 1, df[:, None, :], du))
    du = tl.where(m3, du, 0.0)
    tl.store(du_ptr + off3, du.to(du_ptr.dtype.element_ty), mask=m3)
    # ---- through N_h
    if KH == 1 or KH == 2 or KH == 3 or KH == 4:
        gz = du * tl.load(wh_ptr + col, mask=colm, other=0.0).to(ACC)[None, :, :]
        if KH == 1 or KH == 2:
            z = tl.load(z_ptr + off3, mask=m3, other=0.0).to(ACC)
            dz = _row_norm_backward(gz, _row_hat(z, m3, mh_ptr, rh_ptr, rows, rv, KH), 4 * H, rh_ptr, rows, rv, KH)
        elif KH == 3:
            z = tl.load(z_ptr + off3, mask=m3, other=0.0).to(ACC)
            dz = _batch_norm_backward(gz, z, m3, bs, mh_ptr, rh_ptr, col, colm, ACC)
        else:
            dz = gz
    else:
        dz = du
    if STORE_DZ:
        tl.store(dz_ptr + off3, dz.to(dz_ptr.dtype.element_ty), mask=m3)


@triton.jit
def _row_norm2(x1, x2, m, count, eps, stat_ptr, rstd_ptr, rows, rv, KIND: tl.constexpr):
    """`_row_norm` of the features of two tiles jointly (the GRU's r and z blocks): both normalized tiles."""
    if KIND == 1 or KIND == 2:
        if KIND == 1:
            mean = (tl.sum(x1, axis=1) + tl.sum(x2, axis=1)) / count
            d1 = tl.where(m, x1 - mean[:, None], 0.0)
            d2 = tl.where(m, x2 - mean[:, None], 0.0)
            tl.store(stat_ptr + rows, mean, mask=rv)
        else:
            d1, d2 = x1, x2
        rstd = 1.0 / tl.sqrt((tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1)) / count + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rv)
        return d1 * rstd[:, None], d2 * rstd[:, None]
    else:
        return x1, x2


@triton.jit
def _gru_tile(bs, H, BR: tl.constexpr, BJ: tl.constexpr):
    """The tile of a GRU step kernel: ``BR`` rows by all ``H`` units (``BJ`` >= H). Returns the row and unit indices,
    their validity, the (rows, units) mask and the tile's offsets in a (bs, 3H) and a (bs, H) tensor."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    js = tl.arange(0, BJ)
    rv, jv = rows < bs, js < H
    m = rv[:, None] & jv[None, :]
    return rows, js, rv, jv, m, rows[:, None] * (3 * H) + js[None, :], rows[:, None] * H + js[None, :]


@triton.jit
def gru_forward(
    a_ptr, u_ptr, hp_ptr, h_ptr, rz_ptr, n_ptr, hl_ptr,
    wrz_ptr, brz_ptr, wn_ptr, bn_ptr,
    mrz_ptr, rrz_ptr, mn_ptr, rn_ptr,
    bs, H, eps_rz, eps_n,
    KRZ: tl.constexpr, KN: tl.constexpr, HAS_BRZ: tl.constexpr, HAS_BN: tl.constexpr, SAVE: tl.constexpr,
    LOWP: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """One GRU step on its ``bs`` rows (the tile spans all H units): with a = W_h h_prev ``(bs, 3H)``,
    r, z = σ(u_rz + N_rz(a_rz)), n = tanh(u_n + r ⊙ N_n(a_n)) (N_n's shift includes b_hn), h = n + z (h_prev − n).
    Writes ``h`` (``LOWP``: also its low-precision copy ``hl``), the statistics, and (``SAVE``) σ(r), σ(z) in ``rz``
    ``(bs, 2H)`` and n in ``n``."""
    rows, js, rv, jv, m, off3, off2 = _gru_tile(bs, H, BR, BJ)
    ar = tl.load(a_ptr + off3, mask=m, other=0.0).to(ACC)
    az = tl.load(a_ptr + off3 + H, mask=m, other=0.0).to(ACC)
    an = tl.load(a_ptr + off3 + 2 * H, mask=m, other=0.0).to(ACC)
    yr, yz = _row_norm2(ar, az, m, 2 * H, eps_rz, mrz_ptr, rrz_ptr, rows, rv, KRZ)
    yn = _row_norm(an, m, H, eps_n, mn_ptr, rn_ptr, rows, rv, KN)
    if KRZ != 0:
        yr = yr * tl.load(wrz_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
        yz = yz * tl.load(wrz_ptr + H + js, mask=jv, other=0.0).to(ACC)[None, :]
    if HAS_BRZ:
        yr = yr + tl.load(brz_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
        yz = yz + tl.load(brz_ptr + H + js, mask=jv, other=0.0).to(ACC)[None, :]
    if KN != 0:
        yn = yn * tl.load(wn_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    if HAS_BN:
        yn = yn + tl.load(bn_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    r = _sigmoid(tl.load(u_ptr + off3, mask=m, other=0.0).to(ACC) + yr)
    z = _sigmoid(tl.load(u_ptr + off3 + H, mask=m, other=0.0).to(ACC) + yz)
    n = _tanh(tl.load(u_ptr + off3 + 2 * H, mask=m, other=0.0).to(ACC) + r * yn)
    hp = tl.load(hp_ptr + off2, mask=m, other=0.0).to(ACC)
    h = n + z * (hp - n)
    tl.store(h_ptr + off2, h.to(h_ptr.dtype.element_ty), mask=m)
    if LOWP:
        tl.store(hl_ptr + off2, h.to(hl_ptr.dtype.element_ty), mask=m)
    if SAVE:
        offrz = rows[:, None] * (2 * H) + js[None, :]
        tl.store(rz_ptr + offrz, r.to(rz_ptr.dtype.element_ty), mask=m)
        tl.store(rz_ptr + offrz + H, z.to(rz_ptr.dtype.element_ty), mask=m)
        tl.store(n_ptr + off2, n.to(n_ptr.dtype.element_ty), mask=m)


@triton.jit
def gru_backward(
    dhc_ptr, dhg_ptr, dout_ptr, hp_ptr, rz_ptr, n_ptr, a_ptr,
    wrz_ptr, wn_ptr, bn_ptr, mrz_ptr, rrz_ptr, mn_ptr, rn_ptr,
    du_ptr, da_ptr, dyn_ptr,
    bs, H,
    KRZ: tl.constexpr, KN: tl.constexpr, HAS_BN: tl.constexpr,
    ACC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """The backward of `gru_forward` for one step: the gradient of h is ``dhc`` (the direct part z ⊙ dh of the step
    after) + ``dhg`` (its GEMM part) + ``dout`` (the output's, the final state's folded in). Writes the gradient of u
    ``du`` ``(bs, 3H)``, that of a = W_h h_prev in ``da``, that of N_n(a_n) (after its gain) ``dyn`` (for the gain
    and b_hn gradients) and z ⊙ dh into ``dhc``; the host then computes da W_h into ``dhg`` (one GEMM)."""
    rows, js, rv, jv, m, off3, off2 = _gru_tile(bs, H, BR, BJ)
    offrz = rows[:, None] * (2 * H) + js[None, :]
    dh = tl.load(dhc_ptr + off2, mask=m, other=0.0).to(ACC) + tl.load(dhg_ptr + off2, mask=m, other=0.0).to(ACC)
    dh += tl.load(dout_ptr + off2, mask=m, other=0.0).to(ACC)
    r = tl.load(rz_ptr + offrz, mask=m, other=0.0).to(ACC)
    z = tl.load(rz_ptr + offrz + H, mask=m, other=0.0).to(ACC)
    n = tl.load(n_ptr + off2, mask=m, other=0.0).to(ACC)
    hp = tl.load(hp_ptr + off2, mask=m, other=0.0).to(ACC)
    an = tl.load(a_ptr + off3 + 2 * H, mask=m, other=0.0).to(ACC)
    nhat = _row_hat(an, m, mn_ptr, rn_ptr, rows, rv, KN)
    yn = nhat
    if KN != 0:
        wn = tl.load(wn_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
        yn = yn * wn
    if HAS_BN:
        yn = yn + tl.load(bn_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    dn = tl.where(m, dh * (1.0 - z) * (1.0 - n * n), 0.0)
    dz = tl.where(m, dh * (hp - n) * z * (1.0 - z), 0.0)
    dr = tl.where(m, dn * yn * r * (1.0 - r), 0.0)
    dyn = dn * r
    tl.store(du_ptr + off3, dr.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + off3 + H, dz.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + off3 + 2 * H, dn.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dyn_ptr + off2, dyn.to(dyn_ptr.dtype.element_ty), mask=m)
    tl.store(dhc_ptr + off2, (dh * z).to(dhc_ptr.dtype.element_ty), mask=m)
    # ---- through N_rz (jointly over 2H) and N_n
    if KRZ != 0:
        gr = dr * tl.load(wrz_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
        gz = dz * tl.load(wrz_ptr + H + js, mask=jv, other=0.0).to(ACC)[None, :]
        ar = tl.load(a_ptr + off3, mask=m, other=0.0).to(ACC)
        az = tl.load(a_ptr + off3 + H, mask=m, other=0.0).to(ACC)
        rhat = _row_hat(ar, m, mrz_ptr, rrz_ptr, rows, rv, KRZ)
        zhat = _row_hat(az, m, mrz_ptr, rrz_ptr, rows, rv, KRZ)
        rstd = tl.load(rrz_ptr + rows, mask=rv, other=0.0).to(ACC)[:, None]
        if KRZ == 1:
            mg = (tl.sum(gr, axis=1) + tl.sum(gz, axis=1)) / (2 * H)
            gr, gz = gr - mg[:, None], gz - mg[:, None]
        proj = ((tl.sum(gr * rhat, axis=1) + tl.sum(gz * zhat, axis=1)) / (2 * H))[:, None]
        gr, gz = (gr - rhat * proj) * rstd, (gz - zhat * proj) * rstd
    else:
        gr, gz = dr, dz
    if KN != 0:
        gn = _row_norm_backward(dyn * wn, nhat, H, rn_ptr, rows, rv, KN)
    else:
        gn = dyn
    tl.store(da_ptr + off3, gr.to(da_ptr.dtype.element_ty), mask=m)
    tl.store(da_ptr + off3 + H, gz.to(da_ptr.dtype.element_ty), mask=m)
    tl.store(da_ptr + off3 + 2 * H, gn.to(da_ptr.dtype.element_ty), mask=m)


@triton.jit
def indrnn_forward(
    u_ptr, h0_ptr, w_ptr, h_ptr, sizes_ptr, offsets_ptr, T, B0, H,
    ACC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """All steps of h_t = ReLU(u_t + w ⊙ h_{t-1}) in one launch: a program owns a tile of sequences x units for the
    whole sequence (each unit recurs on itself only), h_{t-1} in registers; step t runs its first ``sizes[t]`` rows
    at packed row ``offsets[t]``."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    js = tl.program_id(1) * BJ + tl.arange(0, BJ)
    jv = js < H
    w = tl.load(w_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    hp = tl.load(h0_ptr + rows[:, None] * H + js[None, :], mask=(rows < B0)[:, None] & jv[None, :], other=0.0)
    hp = hp.to(ACC)
    for t in range(T):
        b = tl.load(sizes_ptr + t)
        off = tl.load(offsets_ptr + t)
        m = (rows < b)[:, None] & jv[None, :]
        p = (off + rows)[:, None] * H + js[None, :]
        h = tl.maximum(tl.load(u_ptr + p, mask=m, other=0.0).to(ACC) + w * hp, 0.0)
        tl.store(h_ptr + p, h.to(h_ptr.dtype.element_ty), mask=m)
        hp = tl.where(m, h, hp)


@triton.jit
def indrnn_backward(
    dout_ptr, dhn_ptr, h_ptr, w_ptr, du_ptr, dh0_ptr, sizes_ptr, offsets_ptr, T, B0, H,
    HAS_DOUT: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """The backward of `indrnn_forward` in one launch, latest step first, the carried gradient in registers: writes
    the gradient of u ``du`` and that of h_0 ``dh0``."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    js = tl.program_id(1) * BJ + tl.arange(0, BJ)
    jv = js < H
    first = (rows < B0)[:, None] & jv[None, :]
    w = tl.load(w_ptr + js, mask=jv, other=0.0).to(ACC)[None, :]
    carry = tl.load(dhn_ptr + rows[:, None] * H + js[None, :], mask=first, other=0.0).to(ACC)
    for k in range(T):
        t = T - 1 - k
        b = tl.load(sizes_ptr + t)
        off = tl.load(offsets_ptr + t)
        m = (rows < b)[:, None] & jv[None, :]
        p = (off + rows)[:, None] * H + js[None, :]
        dh = carry
        if HAS_DOUT:
            dh += tl.load(dout_ptr + p, mask=m, other=0.0).to(ACC)
        h = tl.load(h_ptr + p, mask=m, other=0.0).to(ACC)
        dpre = tl.where(h > 0, dh, 0.0)
        tl.store(du_ptr + p, dpre.to(du_ptr.dtype.element_ty), mask=m)
        carry = tl.where(m, dpre * w, carry)
    tl.store(dh0_ptr + rows[:, None] * H + js[None, :], carry.to(dh0_ptr.dtype.element_ty), mask=first)
