#pragma once

#include "loops.h"

namespace {

// ---- The GRU (zoo.nn.fused.FusedGRU), with row-local norms N_rz, N_n of a = W_h h_{t-1} (b_hn in N_n's shift):
//   r, z = σ(u_rz + N_rz(a_rz));  n = tanh(u_n + r ⊙ N_n(a_n));  h = n + z ⊙ (h_{t-1} − n)
// tanh(x) = 2σ(2x) − 1. Forward: rz (σ(r), σ(z)) and n at save_off (every row in training, a scratch of the first rows
// in inference), a saved in a_save (training); the norms' statistics at save_off.
void gru_forward_loop(Norm& nrz, Norm& nn, const Tensor& weight, OptT panels, const Tensor& h0, const Tensor& u,
                      const Tensor& rz, const Tensor& n, const Tensor& h, OptT a_save,
                      const std::vector<int64_t>& batch_sizes, bool train) {
  const int64_t H = h.size(1), G = 3 * H;
  check_all(u, {&h0, &rz, &n, &h});
  const bool save = a_save.has_value() && a_save->defined();
  if (save) check(*a_save, u, "a_save");
  const auto off = offsets_of(batch_sizes);
  const Tensor scratch = save ? Tensor() : at::empty({batch_sizes.empty() ? 0 : batch_sizes[0], G}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "gru_forward_loop", [&] {
    using T = scalar_t;
    for (size_t t = 0; t < batch_sizes.size(); ++t) {
      const int64_t bs = batch_sizes[t], so = train ? off[t] : 0;
      const T* hprev = t ? h.data_ptr<T>() + off[t - 1] * H : h0.data_ptr<T>();
      const Tensor at = save ? a_save->narrow(0, off[t], bs) : scratch.narrow(0, 0, bs);  // a, kept in training
      gemm_rows(t ? h.narrow(0, off[t - 1], bs) : h0, weight, panels, at, false);
      const T* ap = at.data_ptr<T>();
      const T* up = u.data_ptr<T>() + off[t] * G;
      T* rzp = rz.data_ptr<T>() + so * 2 * H;
      T* np = n.data_ptr<T>() + so * H;
      T* hp = h.data_ptr<T>() + off[t] * H;
      Buffer<T> ones_rz, ones_n;
      const RowNorm<T> rr = row_norm<T>(nrz, t, so, 2 * H, ones_rz);
      const RowNorm<T> rn = row_norm<T>(nn, t, so, H, ones_n);
      at::parallel_for(0, bs, row_grain(G), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* __restrict a = ap + r * G;
          const T* __restrict ur = up + r * G;
          T* __restrict rzr = rzp + r * 2 * H;
          T* __restrict nr = np + r * H;
          const T* __restrict hpr = hprev + r * H;
          T* __restrict hr = hp + r * H;
          row_forward<T>(rr, a, rzr, 2 * H, r);
          for (int64_t j = 0; j < 2 * H; ++j) rzr[j] = sigm(rzr[j] + ur[j]);
          row_forward<T>(rn, a + 2 * H, nr, H, r);  // N_n(a_n), then n in place
          for (int64_t j = 0; j < H; ++j) {
            const T v = T(2) * sigm(T(2) * (ur[2 * H + j] + rzr[j] * nr[j])) - T(1);
            nr[j] = v;
            hr[j] = v + rzr[H + j] * (hpr[j] - v);
          }
        }
      });
    }
  });
}

// The GRU's backward steps t_hi − 1 down to t_lo: du's rows (dr, dz, dn); da_t (the gradient of a = W_h h_{t-1}) into
// da_buf's rows from offset(t) − offset(t_lo) (a chunk for the W_h gradient); dh_{t-1} = da_t W_h + dh ⊙ z into
// dh_carry; the gradient of b_hn (Σ r ⊙ dn) added to dbhn if given, the norms' gain and shift gradients to theirs.
// work: (batch_sizes[0], H).
void gru_backward_loop(Norm& nrz, Norm& nn, const Tensor& weight_t, OptT panels_t, const Tensor& h0,
                       const Tensor& h, const Tensor& rz, const Tensor& n, const Tensor& a, OptT dout,
                       const Tensor& dh_carry, const Tensor& du, const Tensor& da_buf, OptT dbhn,
                       const Tensor& work, const std::vector<int64_t>& batch_sizes, int64_t t_lo, int64_t t_hi) {
  const int64_t H = h.size(1), G = 3 * H;
  check_all(h, {&h0, &rz, &n, &a, &dh_carry, &du, &da_buf, &work});
  const bool dsum = dbhn.has_value() && dbhn->defined();
  const bool dgiven = dout.has_value() && dout->defined();
  if (dgiven) check(*dout, h, "dout");
  const auto off = offsets_of(batch_sizes);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gru_backward_loop", [&] {
    using T = scalar_t;
    for (int64_t t = t_hi - 1; t >= t_lo; --t) {
      const int64_t bs = batch_sizes[t], o = off[t];
      const T* hprev = t ? h.data_ptr<T>() + off[t - 1] * H : h0.data_ptr<T>();
      const T* rzp = rz.data_ptr<T>() + o * 2 * H;
      const T* np = n.data_ptr<T>() + o * H;
      const T* ap = a.data_ptr<T>() + o * G;
      const T* dop = dgiven ? dout->data_ptr<T>() + o * H : nullptr;
      T* dhp = dh_carry.data_ptr<T>();
      T* dup = du.data_ptr<T>() + o * G;
      T* dap = da_buf.data_ptr<T>() + (o - off[t_lo]) * G;
      T* wk = work.data_ptr<T>();
      Buffer<T> ones_rz, ones_n;
      const RowNorm<T> rr = row_norm<T>(nrz, t, o, 2 * H, ones_rz);
      const RowNorm<T> rn = row_norm<T>(nn, t, o, H, ones_n);
      Partials<T> prz(nrz, 2 * H), pn(nn, H);
      ThreadSums<T> pbhn(dsum ? H : 0);
      at::parallel_for(0, bs, row_grain(G), [&](int64_t r0, int64_t r1) {
        const int64_t tid = prz.thread();
        T* pb = dsum ? pbhn.at(tid) : nullptr;
        for (int64_t r = r0; r < r1; ++r) {
          const T* __restrict rr_ = rzp + r * 2 * H;
          const T* __restrict nr = np + r * H;
          const T* __restrict hpr = hprev + r * H;
          const T* __restrict ar = ap + r * G;
          T* __restrict dh = dhp + r * H;
          T* __restrict dr = dup + r * G;
          T* __restrict yn = wk + r * H;
          if (dop) {
            const T* __restrict d = dop + r * H;
            for (int64_t j = 0; j < H; ++j) dh[j] += d[j];
          }
          row_output<T>(rn, ar + 2 * H, yn, H, r);  // N_n(a_n) + b_hn, then the gradient of N_n's output
          for (int64_t j = 0; j < H; ++j) {
            const T rv = rr_[j], zv = rr_[H + j], nv = nr[j];
            const T dn = dh[j] * (T(1) - zv) * (T(1) - nv * nv);
            dr[j] = dn * yn[j] * (rv - rv * rv);
            dr[H + j] = dh[j] * (hpr[j] - nv) * (zv - zv * zv);
            dr[2 * H + j] = dn;
            yn[j] = dn * rv;
            dh[j] *= zv;  // the direct path to h_{t-1}; W_h's is added after the GEMM
          }
          if (pb)
            for (int64_t j = 0; j < H; ++j) pb[j] += yn[j];
          row_backward<T>(rr, dr, ar, dap + r * G, 2 * H, r, prz.pw(tid), prz.pb(tid));
          row_backward<T>(rn, yn, ar + 2 * H, dap + r * G + 2 * H, H, r, pn.pw(tid), pn.pb(tid));
        }
      });
      prz.finish();
      pn.finish();
      if (dsum) pbhn.add_to(dbhn->data_ptr<T>());
      gemm_rows(da_buf.narrow(0, o - off[t_lo], bs), weight_t, panels_t, dh_carry.narrow(0, 0, bs), true);
    }
  });
}

}  // namespace
