// One step of zoo.nn.fused.FusedLSTM between its GEMMs, forward and backward, in a few passes over the step's rows.
//
// Forward, for the bs rows running at step t (z = W_h h_{t-1}, from the caller's GEMM):
//   s  = σ(N_h(z)·scale + u·scale)       scale: 2 on the candidate block, so that tanh(g) = 2σ(2g) − 1
//   c  = f ⊙ c_{t-1} + i ⊙ (2σ(2g) − 1)
//   sc = σ(2 N_c(c)),  h = o ⊙ (2 sc − 1)
// Backward: the gate gradient du_t, the gradient of z through N_h (dz_t, for the caller's GEMMs), the carry of dc,
// and the norms' gain and shift gradients accumulated in place. N is one of: identity / affine (x·w + b, per feature,
// also batch norm in evaluation with w = γ·rstd, b = β − mean·γ·rstd), LayerNorm, RMSNorm, batch norm in training
// (the statistics of the step's rows, running statistics moved as torch.native_batch_norm does).
// The formulas are those of aten's native_layer_norm(_backward), _fused_rms_norm and native_batch_norm(_backward).
#pragma once

#include "loops.h"

namespace {

// The forward step's rows, from pointers at the step's first row (see forward_step).
template <typename T>
struct LstmForwardRows {
  int64_t H, G;
  const T* zp;  // z = W_h h_{t-1}
  T* zs;        // where z is kept for backward (null: not kept, or the GEMM wrote it there)
  T* sp;
  T* scp;
  T* cp;
  T* hp;
  const T* up;
  const T* gs;
  const T* cprev;

  // (u: the step's first row of the input term)
  LstmForwardRows(int64_t H, const T* z, T* z_save, T* s, T* sc, T* c, T* h, const T* u, const T* gscale,
                  const T* c0, int64_t off, int64_t prev_off, int64_t save_off)
      : H(H), G(4 * H), zp(z), zs(z_save ? z_save + save_off * G : nullptr), sp(s + save_off * G),
        scp(sc + save_off * H), cp(c + off * H), hp(h + off * H), up(u), gs(gscale),
        cprev(prev_off < 0 ? c0 : c + prev_off * H) {
    if (zs == zp) zs = nullptr;
  }

  // s = σ(pre + u·scale) with pre(j) the scaled N_h(z) of row r; c = f ⊙ c_{t-1} + i ⊙ (2σ(2g) − 1). pre may read
  // s's row itself (in inference z lies in s): each element is read before it is written.
  template <typename Pre>
  ZOO_INLINE void gates(int64_t r, Pre pre) const {
    T* __restrict sr = sp + r * G;
    const T* __restrict ur = up + r * G;
    for (int64_t j = 0; j < G; ++j) sr[j] = sigm(pre(j) + ur[j] * gs[j]);
    const T* __restrict i = sr;
    const T* __restrict f = sr + H;
    const T* __restrict g = sr + 2 * H;
    const T* __restrict cpr = cprev + r * H;
    T* __restrict cr = cp + r * H;
    for (int64_t j = 0; j < H; ++j) cr[j] = (i[j] * g[j] * T(2) - i[j]) + f[j] * cpr[j];
  }
  void gates(int64_t r) const {  // (the scaled N_h(z) already in s)
    const T* sr = sp + r * G;
    gates(r, [sr](int64_t j) ZOO_LAMBDA { return sr[j]; });
  }

  // sc = σ(pre), pre(j) being 2 N_c(c) of row r; h = o ⊙ (2 sc − 1)
  template <typename Pre>
  ZOO_INLINE void output(int64_t r, Pre pre) const {
    const T* __restrict o = sp + r * G + 3 * H;
    T* __restrict scr = scp + r * H;
    T* __restrict hr = hp + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const T v = sigm(pre(j));
      scr[j] = v;
      hr[j] = o[j] * v * T(2) - o[j];
    }
  }
  void output(int64_t r) const {  // (2 N_c(c) already in sc)
    const T* sr = scp + r * H;
    output(r, [sr](int64_t j) ZOO_LAMBDA { return sr[j]; });
  }

  // All of row r with row-local norms, in one pass: each norm's statistics, then its output consumed as it is
  // computed, never stored.
  void row(const RowNorm<T>& rh, const RowNorm<T>& rc, int64_t r) const {
    const T* z = zp + r * G;
    if (zs) std::copy(z, z + G, zs + r * G);
    const auto [mh, rsh] = row_stats<T>(rh, z, G, r);
    with_row_value<T>(rh, z, mh, rsh, [&](auto pre) ZOO_LAMBDA { gates(r, pre); });
    const T* c = cp + r * H;
    const auto [mc, rsc] = row_stats<T>(rc, c, H, r);
    with_row_value<T>(rc, c, mc, rsc, [&](auto pre) ZOO_LAMBDA { output(r, pre); });
  }
};

// The forward step t: rows [off, off + bs) of c, h, and of u from u_off; s, sc, z_save and the LN/RMS statistics at
// save_off (the same rows in training; a scratch of the first rows in inference); c_{t-1} from c0 (prev_off < 0) or
// c at prev_off.
// With row-local norms a row goes through all of it in one pass (one parallel region); a training batch norm, whose
// statistics span the rows, splits it into four.
void forward_step(Norm& nh, Norm& nc, const Tensor& z, const Tensor& u, const Tensor& gscale, const Tensor& c0,
                  const Tensor& s, const Tensor& c, const Tensor& sc, const Tensor& h, OptT z_save, int64_t t,
                  int64_t off, int64_t prev_off, int64_t bs, int64_t save_off, int64_t u_off) {
  const int64_t H = c.size(1), G = 4 * H;
  check_all(u, {&z, &gscale, &c0, &s, &c, &sc, &h});
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "lstm_forward_step", [&] {
    using T = scalar_t;
    const LstmForwardRows<T> f(H, z.data_ptr<T>(), mptr_or_null<T>(z_save), s.data_ptr<T>(), sc.data_ptr<T>(),
                               c.data_ptr<T>(), h.data_ptr<T>(), u.data_ptr<T>() + u_off * G, gscale.data_ptr<T>(),
                               c0.data_ptr<T>(), off, prev_off, save_off);
    if (nh.kind != BN_TRAIN && nc.kind != BN_TRAIN) {
      Buffer<T> ones_h, ones_c;
      const RowNorm<T> rh = row_norm<T>(nh, t, save_off, G, ones_h);
      const RowNorm<T> rc = row_norm<T>(nc, t, save_off, H, ones_c);
      at::parallel_for(0, bs, row_grain(G), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) f.row(rh, rc, r);
      });
      return;
    }
    // A training batch norm: one parallel region, its statistics combined across the team at barriers.
    const int64_t nth = team_size(bs, G);
    TeamNorm<T> th(nh, t, save_off, G, bs, nth), tc(nc, t, save_off, H, bs, nth);
    _Pragma("omp parallel num_threads(nth) if (nth > 1)")
    {
      const int64_t k = omp_get_thread_num();
      const auto [r0, r1] = share(bs, nth, k);
      if (f.zs) std::copy(f.zp + r0 * G, f.zp + r1 * G, f.zs + r0 * G);
      th.forward(f.zp, f.sp, k, r0, r1);  // N_h(z)·scale into s
      for (int64_t r = r0; r < r1; ++r) f.gates(r);
      tc.forward(f.cp, f.scp, k, r0, r1);  // 2 N_c(c) into sc
      for (int64_t r = r0; r < r1; ++r) f.output(r);
    }
  });
}

// The backward step's rows, from pointers at the step's first row (see backward_step).
template <typename T>
struct LstmBackwardRows {
  int64_t H, G;
  const T* sp;
  const T* scp;
  const T* cp;
  const T* cprev;
  const T* dop;  // the outputs' gradient, or null
  const T* zp;   // z, or null (N_h none)
  T* dzp;        // where dz goes, or null (N_h none: du's rows are it)
  T* dhp;
  T* dcp;
  T* dup;
  T* wk;

  LstmBackwardRows(int64_t H, const T* s, const T* sc, const T* c, const T* c0, const T* dout, const T* z, T* dz,
                   T* dh_carry, T* dc_carry, T* du, T* work, int64_t off, int64_t prev_off)
      : H(H), G(4 * H), sp(s + off * G), scp(sc + off * H), cp(c + off * H),
        cprev(prev_off < 0 ? c0 : c + prev_off * H), dop(dout ? dout + off * H : nullptr),
        zp(z ? z + off * G : nullptr), dzp(dz), dhp(dh_carry), dcp(dc_carry), dup(du + off * G), wk(work) {}

  void head(int64_t r) const {  // dh; do = dh ⊙ tanh(N_c(c_t)) ⊙ σ'(o); the gradient of 2 N_c(c_t) into work
    T* __restrict dh = dhp + r * H;
    const T* __restrict scr = scp + r * H;
    const T* __restrict o = sp + r * G + 3 * H;
    T* __restrict dor = dup + r * G + 3 * H;
    T* __restrict dn = wk + r * H;
    if (dop) {
      const T* __restrict dor_in = dop + r * H;
      for (int64_t j = 0; j < H; ++j) dh[j] += dor_in[j];
    }
    for (int64_t j = 0; j < H; ++j) {
      dor[j] = (scr[j] * T(2) - T(1)) * dh[j] * (o[j] - o[j] * o[j]);  // dh ⊙ tanh(N_c(c_t)) ⊙ σ'(o)
      dn[j] = (scr[j] - scr[j] * scr[j]) * o[j] * dh[j] * T(4);         // through tanh: 4σ'(2x)
    }
  }

  // dc = work + dc_carry; the gate gradients, each times its σ' (the candidate block: 4σ'(2g)); dc_carry = dc ⊙ f
  void gates(int64_t r) const {
    const T* __restrict sr = sp + r * G;
    T* __restrict dr = dup + r * G;
    const T* __restrict dnr = wk + r * H;
    T* __restrict dcr = dcp + r * H;
    const T* __restrict cpr = cprev + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const T i = sr[j], f = sr[H + j], g = sr[2 * H + j];
      const T dc = dnr[j] + dcr[j];
      dr[j] = (dc * g * T(2) - dc) * (i - i * i);  // dc ⊙ tanh(g)
      dr[H + j] = dc * cpr[j] * (f - f * f);
      dr[2 * H + j] = dc * i * T(4) * (g - g * g);
      dcr[j] = dc * f;
    }
  }

  // All of row r with row-local norms, their gain and shift gradients into the partial sums given (or null).
  void row(const RowNorm<T>& rh, const RowNorm<T>& rc, int64_t r, T* pwh, T* pbh, T* pwc, T* pbc) const {
    head(r);
    row_backward<T>(rc, wk + r * H, cp + r * H, wk + r * H, H, r, pwc, pbc);  // through N_c, in place
    gates(r);
    if (dzp) row_backward<T>(rh, dup + r * G, zp + r * G, dzp + r * G, G, r, pwh, pbh);
  }
};

// The backward step's tensors: all against s; z and dz (the gradient of z, or its chunk buffer) with a normalized
// W_h h, dout when given.
void check_backward(const Tensor& s, const Tensor& sc, const Tensor& c, const Tensor& c0, const OptT& z,
                    const OptT& dout, const Tensor& dh_carry, const Tensor& dc_carry, const Tensor& du, const OptT& dz,
                    const Tensor& work) {
  check_all(s, {&sc, &c, &c0, &dh_carry, &dc_carry, &du, &work});
  if (dz.has_value() && dz->defined()) {
    TORCH_CHECK(z.has_value() && z->defined(), "lstm_step: a normalized W_h h needs z");
    check(*z, s, "z");
    check(*dz, s, "dz");
  }
  if (dout.has_value() && dout->defined()) check(*dout, s, "dout");
}

// The backward step t: dh = dh_carry (+ dout rows), written back into dh_carry; du rows; dz (the gradient of
// z = W_h h_{t-1}, through N_h) into dz_out unless N_h is none (then du's rows are it); dc_carry = dc ⊙ f. work: (bs, H).
// One pass per row with row-local norms (their gain gradients in per-thread partial sums), else four.
void backward_step(Norm& nh, Norm& nc, const Tensor& s, const Tensor& sc, const Tensor& c, const Tensor& c0,
                   OptT z, OptT dout, const Tensor& dh_carry, const Tensor& dc_carry, const Tensor& du, OptT dz_out,
                   const Tensor& work, int64_t t, int64_t off, int64_t prev_off, int64_t bs) {
  const int64_t H = c.size(1), G = 4 * H;
  check_backward(s, sc, c, c0, z, dout, dh_carry, dc_carry, du, dz_out, work);
  const bool dz = dz_out.has_value() && dz_out->defined();  // else N_h is none: du's rows are the gradient of z
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "lstm_backward_step", [&] {
    using T = scalar_t;
    const LstmBackwardRows<T> b(H, s.data_ptr<T>(), sc.data_ptr<T>(), c.data_ptr<T>(), c0.data_ptr<T>(),
                                ptr_or_null<T>(dout), dz ? z->data_ptr<T>() : nullptr,
                                dz ? dz_out->data_ptr<T>() : nullptr, dh_carry.data_ptr<T>(),
                                dc_carry.data_ptr<T>(), du.data_ptr<T>(), work.data_ptr<T>(), off, prev_off);
    if (nh.kind != BN_TRAIN && nc.kind != BN_TRAIN) {
      Buffer<T> ones_h, ones_c;
      const RowNorm<T> rh = row_norm<T>(nh, t, off, G, ones_h);
      const RowNorm<T> rc = row_norm<T>(nc, t, off, H, ones_c);
      Partials<T> ph(nh, G), pc(nc, H);
      at::parallel_for(0, bs, row_grain(G), [&](int64_t r0, int64_t r1) {
        const int64_t tid = ph.thread();
        for (int64_t r = r0; r < r1; ++r) b.row(rh, rc, r, ph.pw(tid), ph.pb(tid), pc.pw(tid), pc.pb(tid));
      });
      ph.finish();
      pc.finish();
      return;
    }
    // A training batch norm: one parallel region, as in forward_step.
    const int64_t nth = team_size(bs, G);
    TeamNorm<T> th(nh, t, off, G, bs, nth), tc(nc, t, off, H, bs, nth);
    Partials<T> ph(nh, G, !th.bn), pc(nc, H, !tc.bn);  // (a row-local norm's gain gradients)
    _Pragma("omp parallel num_threads(nth) if (nth > 1)")
    {
      const int64_t k = omp_get_thread_num();
      const auto [r0, r1] = share(bs, nth, k);
      for (int64_t r = r0; r < r1; ++r) b.head(r);
      tc.backward(b.wk, b.cp, b.wk, k, r0, r1, pc.pw(k), pc.pb(k));  // the gradient of c_t through N_c, in place
      for (int64_t r = r0; r < r1; ++r) b.gates(r);
      if (dz) th.backward(b.dup, b.zp, b.dzp, k, r0, r1, ph.pw(k), ph.pb(k));
    }
    ph.finish();
    pc.finish();
  });
}

// All forward steps: z_t = W_h h_{t-1} (the recurrent GEMM with W_h's panels), then forward_step. `train`: s, sc and
// the statistics are kept for every row (else s, sc are a scratch of batch_sizes[0] rows).
// The input term: u (N, 4H), all steps'; or, in inference, computed step by step from the packed input x (N, I),
// u_t = N_x(x_t W_x.T) with the row-local norm nx (its shift the bias), into u as a scratch of batch_sizes[0] rows,
// where the step reads it from cache: no (N, 4H) tensor written to memory and read back.
void forward_loop(Norm& nh, Norm& nc, const Tensor& weight, OptT panels, const Tensor& h0, const Tensor& u,
                  const Tensor& gscale, const Tensor& c0, const Tensor& s, const Tensor& c, const Tensor& sc,
                  const Tensor& h, OptT z_save, const std::vector<int64_t>& batch_sizes, bool train, Norm& nx,
                  OptT x, OptT wx, OptT x_panels) {
  const auto off = offsets_of(batch_sizes);
  const int64_t steps = batch_sizes.size();
  // z goes where it is kept for backward, else to s's rows, where the step normalizes it in place
  const bool keep_z = train && z_save.has_value() && z_save->defined();
  const bool from_x = x.has_value() && x->defined();
  if (from_x) {
    TORCH_CHECK(!train && wx.has_value() && wx->defined() && nx.kind != BN_TRAIN, "lstm_step: the input term from x ",
                "is for inference, with W_x and a row-local norm");
    check(*x, u, "x");
    TORCH_CHECK(u.size(0) == batch_sizes[0] && x->size(0) == off[steps - 1] + batch_sizes[steps - 1] &&
                    wx->size(0) == u.size(1) && wx->size(1) == x->size(1),
                "lstm_step: the input term of x ", x->sizes(), " by W_x ", wx->sizes(), " into ", u.sizes());
  }
  if (!rows_parallel(nh, nc, panels, u) || (from_x && !(x_panels.has_value() && x_panels->defined()))) {
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t bs = batch_sizes[t], prev = t ? off[t - 1] : -1, so = train ? off[t] : 0;
      if (from_x) {
        const Tensor ut = u.narrow(0, 0, bs);
        gemm_rows(x->narrow(0, off[t], bs), *wx, x_panels, ut, false);
        AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "lstm_input_term", [&] {
          norm_forward<scalar_t>(nx, ut.data_ptr<scalar_t>(), ut.data_ptr<scalar_t>(), bs, ut.size(1), t, 0);
        });
      }
      const Tensor zt = keep_z ? z_save->narrow(0, off[t], bs) : s.narrow(0, so, bs);
      gemm_rows(t ? h.narrow(0, prev, bs) : h0, weight, panels, zt, false);
      forward_step(nh, nc, zt, u, gscale, c0, s, c, sc, h, z_save, t, off[t], prev, bs, so, from_x ? 0 : off[t]);
    }
    return;
  }
#if ZOO_BRGEMM
  const int64_t H = c.size(1), G = 4 * H, nth = loop_threads(batch_sizes[0]);
  check_all(u, {&h0, &gscale, &c0, &s, &c, &sc, &h});
  TORCH_CHECK(weight.size(0) == G && weight.size(1) == H, "lstm_step: W_h of ", weight.sizes(), " for ", H,
              " hidden features");
  const Blocks w = blocks_of(*panels, H, G);
  if (keep_z) check(*z_save, u, "z_save");
  Buffer<float> ones_h, ones_c;
  const auto rh = step_norms(nh, off, steps, train, G, ones_h), rc = step_norms(nc, off, steps, train, H, ones_c);
  float* zk = keep_z ? z_save->data_ptr<float>() : nullptr;
  float *sp = s.data_ptr<float>(), *scp = sc.data_ptr<float>(), *cp = c.data_ptr<float>(), *hp = h.data_ptr<float>();
  const float *up = u.data_ptr<float>(), *gs = gscale.data_ptr<float>(), *h0p = h0.data_ptr<float>();
  const float* c0p = c0.data_ptr<float>();
  const int64_t I = from_x ? x->size(1) : 0;
  const Blocks wxb = from_x ? blocks_of(*x_panels, I, G) : Blocks{};
  Buffer<float> ones_x;
  const auto rx = from_x ? step_norms(nx, off, steps, false, G, ones_x) : std::vector<RowNorm<float>>{};
  const float* xp = from_x ? x->data_ptr<float>() : nullptr;
  float* ux = from_x ? u.data_ptr<float>() : nullptr;
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    const int64_t k = omp_get_thread_num();
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t bs = batch_sizes[t], m = member_rows(bs, nth, k);
      if (m == 0) break;  // (the batch only shrinks)
      const int64_t prev = t ? off[t - 1] : -1, so = train ? off[t] : 0;
      float* zt = keep_z ? zk + off[t] * G : sp + so * G;
      const float* hprev = t ? hp + prev * H : h0p;
      panels_block(hprev + k * H, nth * H, m, w, G, zt + k * G, nth * G, false, 0, blocks(G));
      if (from_x) {  // this thread's rows of u_t, after the GEMM that streams all of W_h through the caches, so that
                     // they are still there for the step (bn_lstm inference at 32,100,64,256: 2-5% faster, ln 1%)
        panels_block(xp + (off[t] + k) * I, nth * I, m, wxb, G, ux + k * G, nth * G, false, 0, blocks(G));
        for (int64_t r = k; r < bs; r += nth) row_forward<float>(rx[t], ux + r * G, ux + r * G, G, r);
      }
      const LstmForwardRows<float> f(H, zt, zk, sp, scp, cp, hp, from_x ? ux : up + off[t] * G, gs, c0p, off[t], prev,
                                     so);
      for (int64_t r = k; r < bs; r += nth) f.row(rh[t], rc[t], r);
    }
  }
#endif
}

// The backward steps t_hi - 1 down to t_lo: backward_step, then dh_{t-1} = dz_t W_h (the recurrent GEMM, W_h.T's
// panels). dz_t goes to dz_buf's rows from offset(t) - offset(t_lo) (a chunk for the W_h gradient), or, without
// dz_buf (N_h none), it is du's rows.
void backward_loop(Norm& nh, Norm& nc, const Tensor& weight_t, OptT panels_t, const Tensor& s, const Tensor& sc,
                   const Tensor& c, const Tensor& c0, OptT z, OptT dout, const Tensor& dh_carry,
                   const Tensor& dc_carry, const Tensor& du, OptT dz_buf, const Tensor& work,
                   const std::vector<int64_t>& batch_sizes, int64_t t_lo, int64_t t_hi) {
  const auto off = offsets_of(batch_sizes);
  const bool chunk = dz_buf.has_value() && dz_buf->defined();
  if (!rows_parallel(nh, nc, panels_t, s)) {
    for (int64_t t = t_hi - 1; t >= t_lo; --t) {
      const int64_t bs = batch_sizes[t];
      const Tensor dzt = chunk ? dz_buf->narrow(0, off[t] - off[t_lo], bs) : du.narrow(0, off[t], bs);
      backward_step(nh, nc, s, sc, c, c0, z, dout, dh_carry, dc_carry, du, chunk ? OptT(dzt) : OptT(), work, t,
                    off[t], t ? off[t - 1] : -1, bs);
      gemm_rows(dzt, weight_t, panels_t, dh_carry.narrow(0, 0, bs), false);
    }
    return;
  }
#if ZOO_BRGEMM
  const int64_t H = c.size(1), G = 4 * H, nth = loop_threads(batch_sizes[0]);
  check_backward(s, sc, c, c0, z, dout, dh_carry, dc_carry, du, dz_buf, work);
  TORCH_CHECK(weight_t.size(0) == H && weight_t.size(1) == G, "lstm_step: W_h.T of ", weight_t.sizes(), " for ", H,
              " hidden features");
  const Blocks w = blocks_of(*panels_t, G, H);
  Buffer<float> ones_h, ones_c;
  const int64_t steps = batch_sizes.size();
  const auto rh = step_norms(nh, off, steps, true, G, ones_h), rc = step_norms(nc, off, steps, true, H, ones_c);
  Partials<float> ph(nh, G), pc(nc, H);
  const float *sp = s.data_ptr<float>(), *scp = sc.data_ptr<float>(), *cp = c.data_ptr<float>();
  const float *c0p = c0.data_ptr<float>(), *dop = ptr_or_null<float>(dout);
  const float* zp = chunk ? z->data_ptr<float>() : nullptr;
  float *dzb = chunk ? dz_buf->data_ptr<float>() : nullptr, *dhp = dh_carry.data_ptr<float>();
  float *dcp = dc_carry.data_ptr<float>(), *dup = du.data_ptr<float>(), *wk = work.data_ptr<float>();
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    const int64_t k = omp_get_thread_num();
    for (int64_t t = t_hi - 1; t >= t_lo; --t) {
      const int64_t bs = batch_sizes[t], m = member_rows(bs, nth, k);
      if (m == 0) continue;  // (the batch grows as t falls)
      float* dzt = chunk ? dzb + (off[t] - off[t_lo]) * G : nullptr;
      const LstmBackwardRows<float> b(H, sp, scp, cp, c0p, dop, zp, dzt, dhp, dcp, dup, wk, off[t],
                                      t ? off[t - 1] : -1);
      for (int64_t r = k; r < bs; r += nth) b.row(rh[t], rc[t], r, ph.pw(k), ph.pb(k), pc.pw(k), pc.pb(k));
      const float* a = chunk ? dzt : dup + off[t] * G;
      panels_block(a + k * G, nth * G, m, w, H, dhp + k * H, nth * H, false, 0, blocks(H));
    }
  }
  ph.finish();
  pc.finish();
#endif
}

}  // namespace
