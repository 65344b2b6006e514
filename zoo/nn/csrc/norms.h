// The normalizations of one step's rows (identity, affine, LayerNorm, RMSNorm, training batch norm), forward and
// backward, row-local or by a team of threads; and the input term's norm over all rows (norm_rows_*).
#pragma once

#include "common.h"
#include "gemm.h"

namespace {

// A row-local normalization (every kind but a training batch norm) at one step: its per-feature vectors and where
// its per-row statistics go.
template <typename T>
struct RowNorm {
  Kind kind = NONE;
  const T* fw = nullptr;     // forward gain / shift (row t of an evaluation batch norm's per-step maps)
  const T* fb = nullptr;
  const T* w = nullptr;      // backward gain (ones when absent)
  T eps = 0;
  T* mean = nullptr;         // LN: the rows' means; LN/RMS: their rstd (from row save_off)
  T* rstd = nullptr;
  const T* fmean = nullptr;  // evaluation batch norm: step t's per-feature statistics (for the gain gradient)
  const T* frstd = nullptr;
};

template <typename T>
RowNorm<T> row_norm(Norm& n, int64_t t, int64_t save_off, int64_t F, Buffer<T>& ones) {
  TORCH_CHECK(n.kind == NONE || n.kind == LN || n.kind == RMS || n.kind == AFFINE, "lstm_step: norm kind ", n.kind,
              " is not row-local");
  RowNorm<T> r;
  r.kind = n.kind;
  r.fw = feature_row<T>(n.fw, t, F);
  r.fb = feature_row<T>(n.fb, t, F);
  r.w = or_fill(ptr_or_null<T>(n.w), ones, F, T(1));
  r.eps = static_cast<T>(n.eps);
  if (n.kind == LN || n.kind == RMS) {
    r.mean = n.kind == LN ? n.mean->data_ptr<T>() + save_off : nullptr;
    r.rstd = n.rstd->data_ptr<T>() + save_off;
  } else if (n.kind == AFFINE && n.mean.has_value() && n.mean->defined()) {
    r.fmean = n.mean->data_ptr<T>() + t * F;
    r.frstd = n.rstd->data_ptr<T>() + t * F;
  }
  return r;
}

// Calls body(value) with value(j) = (x[j] − mu)·rs·fw[j] + fb[j] for one row (the parts that are absent left out),
// so that a loop over j may consume the normalized row without storing it first.
template <typename T, typename Body>
inline void with_row_value(const RowNorm<T>& n, const T* x, T mu, T rs, Body body) {
  const T* __restrict fw = n.fw;
  const T* __restrict fb = n.fb;
  if (fw && fb) body([=](int64_t j) ZOO_LAMBDA { return (x[j] - mu) * rs * fw[j] + fb[j]; });
  else if (fw) body([=](int64_t j) ZOO_LAMBDA { return (x[j] - mu) * rs * fw[j]; });
  else if (fb) body([=](int64_t j) ZOO_LAMBDA { return (x[j] - mu) * rs + fb[j]; });
  else body([=](int64_t j) ZOO_LAMBDA { return (x[j] - mu) * rs; });
}

// y = (x − mu)·rs·fw + fb for one row of F features (nothing where that is x itself).
template <typename T>
inline void row_apply(const RowNorm<T>& n, const T* x, T* y, int64_t F, T mu, T rs) {
  if (!n.fw && !n.fb && mu == T(0) && rs == T(1) && x == y) return;
  with_row_value(n, x, mu, rs, [&](auto value) ZOO_LAMBDA {
    for (int64_t j = 0; j < F; ++j) y[j] = value(j);
  });
}

// The statistics (mean, rstd) of row r of a step (F features) under N: LN/RMS compute them and save them in slot r;
// the other kinds have none (0, 1).
template <typename T>
inline std::pair<T, T> row_stats(const RowNorm<T>& n, const T* x, int64_t F, int64_t r) {
  if (n.kind != LN && n.kind != RMS) return {T(0), T(1)};
  const T mu = n.kind == LN ? lane_sum<T>(F, [x](int64_t j) { return x[j]; }) / F : T(0);
  const T var = lane_sum<T>(F, [x, mu](int64_t j) {
    const T d = x[j] - mu;
    return d * d;
  });
  const T rs = T(1) / std::sqrt(var / F + n.eps);
  if (n.mean) n.mean[r] = mu;
  n.rstd[r] = rs;
  return {mu, rs};
}

// y = N(x) for row r of a step (F features); LN/RMS save the row's statistics in slot r.
template <typename T>
inline void row_forward(const RowNorm<T>& n, const T* x, T* y, int64_t F, int64_t r) {
  const auto [mu, rs] = row_stats(n, x, F, r);
  row_apply(n, x, y, F, mu, rs);
}

// row_forward's y again, from the statistics it saved in slot r.
template <typename T>
inline void row_output(const RowNorm<T>& n, const T* x, T* y, int64_t F, int64_t r) {
  const bool stats = n.kind == LN || n.kind == RMS;
  row_apply(n, x, y, F, n.mean ? n.mean[r] : T(0), stats ? n.rstd[r] : T(1));
}

// dx = the gradient of x through N for row r (dx may be dy itself), given that of the unscaled output dy; the row's
// share of the gain and shift gradients is added to pw, pb (a thread's partial sums; null where not wanted).
template <typename T>
inline void row_backward(const RowNorm<T>& n, const T* dy, const T* x, T* dx, int64_t F, int64_t r, T* pw, T* pb) {
  const T* __restrict w = n.w;
  if (n.kind == LN || n.kind == RMS) {
    const T mu = n.mean ? n.mean[r] : T(0), rs = n.rstd[r];
    T a = 0, b = 0;
    auto sums = [&](auto with_w, auto with_b) {  // one pass: the row's two sums and its gain / shift gradients
#pragma omp simd reduction(+ : a, b)
      for (int64_t j = 0; j < F; ++j) {
        const T xh = (x[j] - mu) * rs, g = dy[j] * w[j];
        a += g;
        b += g * xh;
        if constexpr (decltype(with_w)::value) pw[j] += dy[j] * xh;
        if constexpr (decltype(with_b)::value) pb[j] += dy[j];
      }
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (pw && pb) sums(yes{}, yes{});
    else if (pw) sums(yes{}, no{});
    else if (pb) sums(no{}, yes{});
    else sums(no{}, no{});
    a = n.kind == LN ? a / F : T(0);
    b /= F;
    for (int64_t j = 0; j < F; ++j) {  // (each dy[j] is read before dx[j] is written)
      const T g = dy[j] * w[j];
      dx[j] = (g - a - (x[j] - mu) * rs * b) * rs;
    }
    return;
  }
  if (n.fmean) {  // evaluation batch norm: y = γ (x − mean) rstd + β per feature
    const T* __restrict fm = n.fmean;
    const T* __restrict fr = n.frstd;
    if (pw)
      for (int64_t j = 0; j < F; ++j) pw[j] += dy[j] * (x[j] - fm[j]) * fr[j];
    if (pb)
      for (int64_t j = 0; j < F; ++j) pb[j] += dy[j];
    for (int64_t j = 0; j < F; ++j) dx[j] = dy[j] * w[j] * fr[j];
    return;
  }
  if (dx != dy) std::copy(dy, dy + F, dx);  // none, or a fixed scale folded into the forward only
}

// A training batch norm's forward for one row of F features: y = (x − mean) · rstd · fw + fb.
template <typename T>
inline void bn_apply_row(const T* __restrict xr, T* __restrict yr, const T* __restrict mean,
                         const T* __restrict rstd, const T* __restrict fw, const T* __restrict fb, int64_t F) {
  for (int64_t j = 0; j < F; ++j) yr[j] = (xr[j] - mean[j]) * rstd[j] * fw[j] + fb[j];
}

// A training batch norm's backward for one row of F features: its share of the two sums over the step's rows,
// a += dy and c += dy · x̂ (x̂ = (x − mean) · rstd) ...
template <typename T>
inline void bn_sums_row(const T* __restrict dyr, const T* __restrict xr, const T* mean, const T* rstd, T* __restrict a,
                        T* __restrict c, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    a[j] += dyr[j];
    c[j] += dyr[j] * (xr[j] - mean[j]) * rstd[j];
  }
}

// ... and, from the sums a = Σ dy, b = Σ dy · x̂ over the bs rows, its dx = (dy − a/bs − x̂ · b/bs) · w · rstd (dx
// may be dy itself).
template <typename T>
inline void bn_dx_row(const T* dyr, const T* __restrict xr, T* dxr, const T* a, const T* b, const T* mean,
                      const T* rstd, const T* w, int64_t F, int64_t bs) {
  for (int64_t j = 0; j < F; ++j) {
    const T xh = (xr[j] - mean[j]) * rstd[j];
    dxr[j] = (dyr[j] - a[j] / bs - xh * b[j] / bs) * (w[j] * rstd[j]);
  }
}

// A norm's gain and shift gradients over a step's rows (per-thread partial sums), added to n.dw, n.db by `finish`.
template <typename T>
struct Partials {
  T* dw;
  T* db;
  ThreadSums<T> w, b;
  // (used false: no accumulators, for a norm whose gradients go elsewhere)
  Partials(Norm& n, int64_t F, bool used = true)
      : dw(used ? mptr_or_null<T>(n.dw) : nullptr), db(used ? mptr_or_null<T>(n.db) : nullptr), w(dw ? F : 0),
        b(db ? F : 0) {}
  int64_t thread() const { return w.thread(); }
  T* pw(int64_t tid) { return dw ? w.at(tid) : nullptr; }
  T* pb(int64_t tid) { return db ? b.at(tid) : nullptr; }
  void finish() {
    if (dw) w.add_to(dw);
    if (db) b.add_to(db);
  }
};

// Beyond this many elements a batch norm's rows no longer stay in cache between its passes over one block of features:
// its statistics are then summed row-parallel (contiguous rows, per-thread partial sums) instead of feature-parallel.
constexpr int64_t kCachedElements = 1 << 18;

// out[0 : k·F] = Σ over rows r < bs of what body(r, p) adds to the k·F accumulators p (row-parallel, per-thread
// partial sums added at the end).
template <typename T, typename Body>
void column_sums(int64_t bs, int64_t F, int64_t k, T* out, const Body& body) {
  ThreadSums<T> sums(k * F);
  at::parallel_for(0, bs, row_grain(F), [&](int64_t r0, int64_t r1) {
    T* p = sums.at(sums.thread());
    for (int64_t r = r0; r < r1; ++r) body(r, p);
  });
  std::fill(out, out + k * F, T(0));
  sums.add_to(out);
}

// y[r, :] = N(x[r, :]) for bs rows of F features; saves the statistics (rows at save_off, or row t for BN).
template <typename T>
void norm_forward(Norm& n, const T* x, T* y, int64_t bs, int64_t F, int64_t t, int64_t save_off) {
  if (n.kind != BN_TRAIN) {
    Buffer<T> ones;
    const RowNorm<T> rn = row_norm<T>(n, t, save_off, F, ones);
    at::parallel_for(0, bs, row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_forward<T>(rn, x + r * F, y + r * F, F, r);
    });
    return;
  }
  Buffer<T> ones, zeros;
  const T* fw = or_fill(feature_row<T>(n.fw, t, F), ones, F, T(1));
  const T* fb = or_fill(feature_row<T>(n.fb, t, F), zeros, F, T(0));
  const T eps = static_cast<T>(n.eps);
  T* mean_s = n.mean->data_ptr<T>() + t * F;
  T* rstd_s = n.rstd->data_ptr<T>() + t * F;
  const int64_t slot = n.per_step ? t : 0;
  const bool update = moves_running(n, bs, slot);
  T* rm = update ? n.rm->data_ptr<T>() + slot * F : nullptr;
  T* rv = update ? n.rv->data_ptr<T>() + slot * F : nullptr;
  const T mom = static_cast<T>(n.momentum);
  if (bs * F > kCachedElements) {  // three row-parallel passes: the sums, the squared deviations, the output
    column_sums<T>(bs, F, 1, mean_s, [&](int64_t r, T* __restrict p) {
      const T* __restrict xr = x + r * F;
      for (int64_t j = 0; j < F; ++j) p[j] += xr[j];
    });
    for (int64_t j = 0; j < F; ++j) mean_s[j] /= bs;
    column_sums<T>(bs, F, 1, rstd_s, [&](int64_t r, T* __restrict p) {
      const T* __restrict xr = x + r * F;
      const T* __restrict mu = mean_s;
      for (int64_t j = 0; j < F; ++j) {
        const T d = xr[j] - mu[j];
        p[j] += d * d;  // the sum of squares, for now
      }
    });
    for (int64_t j = 0; j < F; ++j) {
      if (update) {
        rm[j] = (T(1) - mom) * rm[j] + mom * mean_s[j];
        rv[j] = (T(1) - mom) * rv[j] + mom * rstd_s[j] / (bs - 1);
      }
      rstd_s[j] = T(1) / std::sqrt(rstd_s[j] / bs + eps);
    }
    at::parallel_for(0, bs, row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) bn_apply_row<T>(x + r * F, y + r * F, mean_s, rstd_s, fw, fb, F);
    });
    return;
  }
  at::parallel_for(0, F, kFeatureGrain, [&](int64_t j0, int64_t j1) {  // all passes over one block of features
    T* __restrict mu = mean_s;
    T* __restrict rs = rstd_s;
    for (int64_t j = j0; j < j1; ++j) mu[j] = 0;
    for (int64_t r = 0; r < bs; ++r) {
      const T* __restrict xr = x + r * F;
      for (int64_t j = j0; j < j1; ++j) mu[j] += xr[j];
    }
    for (int64_t j = j0; j < j1; ++j) mu[j] /= bs, rs[j] = 0;
    for (int64_t r = 0; r < bs; ++r) {
      const T* __restrict xr = x + r * F;
      for (int64_t j = j0; j < j1; ++j) {
        const T d = xr[j] - mu[j];
        rs[j] += d * d;  // the sum of squares, for now
      }
    }
    if (update) {
      for (int64_t j = j0; j < j1; ++j) {
        rm[j] = (T(1) - mom) * rm[j] + mom * mu[j];
        rv[j] = (T(1) - mom) * rv[j] + mom * rs[j] / (bs - 1);
      }
    }
    for (int64_t j = j0; j < j1; ++j) rs[j] = T(1) / std::sqrt(rs[j] / bs + eps);
    for (int64_t r = 0; r < bs; ++r) {
      const T* __restrict xr = x + r * F;
      T* __restrict yr = y + r * F;
      for (int64_t j = j0; j < j1; ++j) {
        const T a = (xr[j] - mu[j]) * rs[j];
        yr[j] = a * fw[j] + fb[j];
      }
    }
  });
}

// dx = the gradient of x through N given that of its (unscaled) output dy; may be dy itself (in place). The gain and
// shift gradients are added to n.dw, n.db.
template <typename T>
void norm_backward(Norm& n, const T* dy, const T* x, T* dx, int64_t bs, int64_t F, int64_t t, int64_t save_off) {
  Buffer<T> ones;
  if (n.kind != BN_TRAIN) {
    const RowNorm<T> rn = row_norm<T>(n, t, save_off, F, ones);
    Partials<T> part(n, F);
    at::parallel_for(0, bs, row_grain(F), [&](int64_t r0, int64_t r1) {
      const int64_t tid = part.thread();
      for (int64_t r = r0; r < r1; ++r)
        row_backward<T>(rn, dy + r * F, x + r * F, dx + r * F, F, r, part.pw(tid), part.pb(tid));
    });
    part.finish();
    return;
  }
  const T* w = or_fill(ptr_or_null<T>(n.w), ones, F, T(1));
  T* dw = mptr_or_null<T>(n.dw);
  T* db = mptr_or_null<T>(n.db);
  const T* mu = n.mean->data_ptr<T>() + t * F;
  const T* rs = n.rstd->data_ptr<T>() + t * F;
  if (bs * F > kCachedElements) {  // row-parallel: Σ dy and Σ dy·x̂, then dx
    Buffer<T> sums(2 * F);
    column_sums<T>(bs, F, 2, sums.data(), [&](int64_t r, T* __restrict p) {
      bn_sums_row<T>(dy + r * F, x + r * F, mu, rs, p, p + F, F);
    });
    const T* a = sums.data();
    const T* b = sums.data() + F;
    for (int64_t j = 0; j < F; ++j) {
      if (dw) dw[j] += b[j];
      if (db) db[j] += a[j];
    }
    at::parallel_for(0, bs, row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) bn_dx_row<T>(dy + r * F, x + r * F, dx + r * F, a, b, mu, rs, w, F, bs);
    });
    return;
  }
  at::parallel_for(0, F, kFeatureGrain, [&](int64_t j0, int64_t j1) {  // per-feature statistics: by features
    const int64_t m = j1 - j0;
    Buffer<T> sdy(m, T(0)), sdyx(m, T(0));
    T* __restrict a = sdy.data();
    T* __restrict b = sdyx.data();
    for (int64_t r = 0; r < bs; ++r) {
      const T* __restrict dyr = dy + r * F + j0;
      const T* __restrict xr = x + r * F + j0;
      for (int64_t k = 0; k < m; ++k) {
        a[k] += dyr[k];
        b[k] += dyr[k] * (xr[k] - mu[j0 + k]) * rs[j0 + k];
      }
    }
    if (dw)
      for (int64_t k = 0; k < m; ++k) dw[j0 + k] += b[k];
    if (db)
      for (int64_t k = 0; k < m; ++k) db[j0 + k] += a[k];
    for (int64_t r = 0; r < bs; ++r) {
      const T* dyr = dy + r * F + j0;
      const T* __restrict xr = x + r * F + j0;
      T* dxr = dx + r * F + j0;
      for (int64_t k = 0; k < m; ++k) {
        const T g = w[j0 + k] * rs[j0 + k];
        const T xh = (xr[k] - mu[j0 + k]) * rs[j0 + k];
        dxr[k] = (dyr[k] - a[k] / bs - xh * b[k] / bs) * g;
      }
    }
  });
}

// One norm of a step run by a team of threads inside one parallel region, each thread owning a block of rows. A
// training batch norm's statistics are each thread's partial statistics of its rows, combined at a barrier (mean and
// squared deviations by Chan et al.'s pairwise formula; the backward's two sums added), one slice of the features
// per thread; any other norm is row-local. forward and backward are called by every member of the team.
template <typename T>
struct TeamNorm {
  Norm& n;
  bool bn;
  int64_t F, bs, nth;
  RowNorm<T> row;                // a row-local norm
  Buffer<T> ones, ones_w, zeros;
  const T* fw = nullptr;         // batch norm: forward gain and shift, backward gain
  const T* fb = nullptr;
  const T* w = nullptr;
  T* mean = nullptr;             // the step's saved statistics (F,)
  T* rstd = nullptr;
  T* rm = nullptr;               // the running statistics' row, or null (no update)
  T* rv = nullptr;
  T mom = 0, eps = 0;
  Buffer<T> part, sums;          // nth × 2F partial statistics; the backward's combined sums (2F)
  Buffer<T> count;               // the rows of each member

  TeamNorm(Norm& n, int64_t t, int64_t save_off, int64_t F, int64_t bs, int64_t nth)
      : n(n), bn(n.kind == BN_TRAIN), F(F), bs(bs), nth(nth) {
    if (!bn) {
      row = row_norm<T>(n, t, save_off, F, ones);
      return;
    }
    fw = or_fill(feature_row<T>(n.fw, t, F), ones, F, T(1));
    fb = or_fill(feature_row<T>(n.fb, t, F), zeros, F, T(0));
    w = or_fill(ptr_or_null<T>(n.w), ones_w, F, T(1));
    mean = n.mean->data_ptr<T>() + t * F;
    rstd = n.rstd->data_ptr<T>() + t * F;
    const int64_t slot = n.per_step ? t : 0;
    if (moves_running(n, bs, slot)) {
      rm = n.rm->data_ptr<T>() + slot * F;
      rv = n.rv->data_ptr<T>() + slot * F;
    }
    mom = static_cast<T>(n.momentum);
    eps = static_cast<T>(n.eps);
    part.assign(nth * 2 * F, T(0));
    sums.assign(2 * F, T(0));
    for (int64_t q = 0; q < nth; ++q) count.push_back(share(bs, nth, q).second - share(bs, nth, q).first);
  }

  // y = N(x) for the rows [r0, r1) of member k (x, y: the step's first row).
  void forward(const T* x, T* y, int64_t k, int64_t r0, int64_t r1) {
    if (!bn) {
      for (int64_t r = r0; r < r1; ++r) row_forward<T>(row, x + r * F, y + r * F, F, r);
      return;
    }
    T* __restrict pm = part.data() + k * 2 * F;
    T* __restrict pv = pm + F;
    std::fill(pm, pm + 2 * F, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * F;
      for (int64_t j = 0; j < F; ++j) pm[j] += xr[j];
    }
    if (r1 > r0)
      for (int64_t j = 0; j < F; ++j) pm[j] /= (r1 - r0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * F;
      for (int64_t j = 0; j < F; ++j) {
        const T d = xr[j] - pm[j];
        pv[j] += d * d;
      }
    }
#pragma omp barrier
    const auto [j0, j1] = share(F, nth, k);
    for (int64_t j = j0; j < j1; ++j) {
      T mu = 0, m2 = 0;
      for (int64_t q = 0; q < nth; ++q) mu += count[q] * part[q * 2 * F + j];
      mu /= bs;
      for (int64_t q = 0; q < nth; ++q) {
        const T d = part[q * 2 * F + j] - mu;
        m2 += part[q * 2 * F + F + j] + count[q] * d * d;
      }
      if (rm) {
        rm[j] = (T(1) - mom) * rm[j] + mom * mu;
        rv[j] = (T(1) - mom) * rv[j] + mom * m2 / (bs - 1);
      }
      mean[j] = mu;
      rstd[j] = T(1) / std::sqrt(m2 / bs + eps);
    }
#pragma omp barrier
    for (int64_t r = r0; r < r1; ++r) bn_apply_row<T>(x + r * F, y + r * F, mean, rstd, fw, fb, F);
  }

  // dx = the gradient of x given that of the unscaled output dy (dx may be dy), rows [r0, r1) of member k; the gain
  // and shift gradients: a row-local norm's into the member's partial sums pw, pb, a batch norm's into n.dw, n.db.
  void backward(const T* dy, const T* x, T* dx, int64_t k, int64_t r0, int64_t r1, T* pw, T* pb) {
    if (!bn) {
      for (int64_t r = r0; r < r1; ++r) row_backward<T>(row, dy + r * F, x + r * F, dx + r * F, F, r, pw, pb);
      return;
    }
    T* __restrict pa = part.data() + k * 2 * F;
    T* __restrict pc = pa + F;
    std::fill(pa, pa + 2 * F, T(0));
    for (int64_t r = r0; r < r1; ++r) bn_sums_row<T>(dy + r * F, x + r * F, mean, rstd, pa, pc, F);
#pragma omp barrier
    const auto [j0, j1] = share(F, nth, k);
    T* dw = mptr_or_null<T>(n.dw);
    T* db = mptr_or_null<T>(n.db);
    for (int64_t j = j0; j < j1; ++j) {
      T a = 0, b = 0;
      for (int64_t q = 0; q < nth; ++q) a += part[q * 2 * F + j], b += part[q * 2 * F + F + j];
      sums[j] = a;
      sums[F + j] = b;
      if (dw) dw[j] += b;
      if (db) db[j] += a;
    }
#pragma omp barrier
    const T* __restrict a = sums.data();
    const T* __restrict b = sums.data() + F;
    for (int64_t r = r0; r < r1; ++r) bn_dx_row<T>(dy + r * F, x + r * F, dx + r * F, a, b, mean, rstd, w, F, bs);
  }
};


// The rows of each of the `groups` equal groups of consecutive rows of x (R, F).
int64_t rows_per_group(const Tensor& x, int64_t groups) {
  check(x, x, "x");
  TORCH_CHECK(x.dim() == 2 && groups >= 1 && x.size(0) % groups == 0, "norm_rows: ", x.sizes(),
              " does not split into ", groups, " groups of rows");
  return x.size(0) / groups;
}

// Calls f(norm, row, rows, t) for the groups of statistics among the rows [r0, r0 + nr): once, with t = 0, when all
// rows are one group (LayerNorm, RMSNorm, statistics shared by all rows; f's own kernels run in parallel), else once
// per group t (time step t) of `per` rows, the groups in parallel (each f serial). The gain and shift gradients of
// parallel groups go to a copy of n per thread whose dw, db are the thread's partial sums, added to n's in a fixed
// order at the end.
template <typename Fn>
void each_group(Norm& n, int64_t r0, int64_t nr, int64_t per, int64_t groups, const Fn& f) {
  if (groups == 1) return f(n, r0, nr, int64_t(0));
  const int64_t g0 = r0 / per, g1 = (r0 + nr) / per;
  const bool grads = (n.dw.has_value() && n.dw->defined()) || (n.db.has_value() && n.db->defined());
  std::vector<Norm> local(grads ? at::get_num_threads() : 0, n);
  for (Norm& m : local) {
    if (m.dw.has_value() && m.dw->defined()) m.dw = at::zeros_like(*n.dw);
    if (m.db.has_value() && m.db->defined()) m.db = at::zeros_like(*n.db);
  }
  at::parallel_for(g0, g1, 1, [&](int64_t a, int64_t b) {
    Norm& m = grads ? local.at(at::get_thread_num()) : n;
    for (int64_t g = a; g < b; ++g) f(m, g * per, per, g);
  });
  for (Norm& m : local) {
    if (m.dw.has_value() && m.dw->defined()) n.dw->add_(*m.dw);
    if (m.db.has_value() && m.db->defined()) n.db->add_(*m.db);
  }
}

// y = N(x) for x (R, F) split into `groups` equal groups of consecutive rows: a training batch norm takes the
// statistics of each group (group g is time step g: its row of the saved statistics and of the running statistics);
// LayerNorm and RMSNorm (groups = 1) normalize each row. The input term W_x x of all steps at once.
void norm_rows_forward(Norm& n, const Tensor& x, const Tensor& y, int64_t groups) {
  check(y, x, "y");
  const int64_t per = rows_per_group(x, groups), F = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_rows_forward", [&] {
    using T = scalar_t;
    each_group(n, 0, x.size(0), per, groups, [&](Norm& m, int64_t row, int64_t rows, int64_t t) {
      norm_forward<T>(m, x.data_ptr<T>() + row * F, y.data_ptr<T>() + row * F, rows, F, t, row);
    });
  });
}

// Blocks of rows of the projection x @ W.T (x (R, I), W (F, I), R = groups · per; `panels` W's blocks, else at::mm):
// whole groups of about `block` elements; body(r0, rows, p) gets each block's projection p (rows, F), computed while
// it is in cache, into `keep`'s rows where given. Not for a training batch norm whose statistics span all rows.
template <typename Body>
void project_blocks(const Norm& n, const Tensor& x, const Tensor& weight, const OptT& panels, int64_t F, int64_t per,
                    int64_t groups, int64_t block, const OptT& keep, const Body& body) {
  check(x, x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) == F,
              "lstm_step: projection of x ", x.sizes(), " by a weight ", weight.sizes(), " to ", F, " features");
  TORCH_CHECK(!(n.kind == BN_TRAIN && groups == 1 && x.size(0) > 0), "lstm_step: a batch norm's statistics over all ",
              "rows need the whole projection first");
  const bool kept = keep.has_value() && keep->defined();
  if (kept)
    TORCH_CHECK(keep->is_contiguous() && keep->size(0) == x.size(0) && keep->size(1) == F,
                "lstm_step: the kept projection ", keep->sizes(), " for ", x.size(0), " rows of ", F);
  const int64_t R = x.size(0), step = groups > 1 ? per : 1;  // the rows of a block are whole groups
  const int64_t rows = std::max<int64_t>(1, block / std::max<int64_t>(1, step * F)) * step;
  const Tensor scratch = kept ? Tensor() : at::empty({std::min(rows, R), F}, x.options());
  for (int64_t r0 = 0; r0 < R; r0 += rows) {
    const int64_t nr = std::min(rows, R - r0);
    const Tensor p = kept ? keep->narrow(0, r0, nr) : scratch.narrow(0, 0, nr);
    gemm_rows(x.narrow(0, r0, nr).contiguous(), weight, panels, p, false);
    body(r0, nr, p);
  }
}

// norm_rows_forward of the projection x @ W.T, a block at a time (`project_blocks`), so that the projection is
// normalized in cache instead of going to memory and back. `keep` (R, F), if given, receives the projection too.
void norm_rows_project(Norm& n, const Tensor& x, const Tensor& weight, OptT panels, const Tensor& y, int64_t groups,
                       OptT keep, int64_t block) {
  check(y, x, "y");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0), "norm_rows_project: y ", y.sizes(), " for x ", x.sizes());
  if (keep.has_value() && keep->defined()) check(*keep, y, "keep");
  const int64_t per = rows_per_group(y, groups), F = y.size(1);
  project_blocks(n, x, weight, panels, F, per, groups, block, keep, [&](int64_t r0, int64_t nr, const Tensor& p) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "norm_rows_project", [&] {
      using T = scalar_t;
      each_group(n, r0, nr, per, groups, [&](Norm& m, int64_t row, int64_t rows, int64_t t) {
        norm_forward<T>(m, p.data_ptr<T>() + (row - r0) * F, y.data_ptr<T>() + row * F, rows, F, t, row);
      });
    });
  });
}

// norm_rows_backward of the projection x @ W.T recomputed a block at a time (`project_blocks`): dp from dy.
void norm_rows_project_backward(Norm& n, const Tensor& dy, const Tensor& x, const Tensor& weight, OptT panels,
                                const Tensor& dp, int64_t groups, int64_t block) {
  check(dy, x, "dy");
  check(dp, x, "dp");
  TORCH_CHECK(dy.dim() == 2 && dy.sizes() == dp.sizes() && dy.size(0) == x.size(0), "norm_rows_project_backward: dy ",
              dy.sizes(), ", dp ", dp.sizes(), " for x ", x.sizes());
  const int64_t per = rows_per_group(dy, groups), F = dy.size(1);
  project_blocks(n, x, weight, panels, F, per, groups, block, std::nullopt, [&](int64_t r0, int64_t nr, const Tensor& p) {
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "norm_rows_project_backward", [&] {
      using T = scalar_t;
      each_group(n, r0, nr, per, groups, [&](Norm& m, int64_t row, int64_t rows, int64_t t) {
        norm_backward<T>(m, dy.data_ptr<T>() + row * F, p.data_ptr<T>() + (row - r0) * F, dp.data_ptr<T>() + row * F,
                         rows, F, t, row);
      });
    });
  });
}

// The backward of norm_rows_forward: dx from dy; the gain and shift gradients are added to n.dw, n.db.
void norm_rows_backward(Norm& n, const Tensor& dy, const Tensor& x, const Tensor& dx, int64_t groups) {
  check(dy, x, "dy");
  check(dx, x, "dx");
  const int64_t per = rows_per_group(x, groups), F = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_rows_backward", [&] {
    using T = scalar_t;
    each_group(n, 0, x.size(0), per, groups, [&](Norm& m, int64_t row, int64_t rows, int64_t t) {
      norm_backward<T>(m, dy.data_ptr<T>() + row * F, x.data_ptr<T>() + row * F, dx.data_ptr<T>() + row * F, rows, F,
                       t, row);
    });
  });
}

}  // namespace
