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
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#if defined(__x86_64__)  // oneDNN's micro-kernels (x86 only; elsewhere at::native::cpublas::brgemm is a slow fallback)
#define ZOO_BRGEMM 1
#else
#define ZOO_BRGEMM 0
#endif
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

enum Kind : int64_t { NONE = 0, LN = 1, RMS = 2, BN_TRAIN = 3, AFFINE = 4 };  // (Python: ext.Kind.<name>)

// One normalization's configuration for a whole sequence (built once per FusedLSTM call).
struct Norm {
  Kind kind = NONE;      // forward kind; AFFINE covers "none with a scale" and evaluation-mode batch norm
  OptT fw, fb;           // forward gain / shift (scaled), (F,) or, for AFFINE, (steps, F): row t
  OptT w;                // the unscaled gain (backward)
  OptT mean, rstd;       // saved statistics: LN/RMS (rows,), BN (steps, F); AFFINE backward: (steps, F) or none
  OptT rm, rv;           // running statistics (slots, F) of a training batch norm
  bool per_step = false;  // BN: row t of rm/rv at step t (else row 0)
  double eps = 1e-5, momentum = 0.1;
  OptT dw, db;  // gradient accumulators (F,)
};

// A training batch norm moves running-statistics row `slot` only with at least kMinRows rows at the step (one row has
// no variance), and only where the row exists (past T_max the last is reused, not moved): zoo.nn.norm.MIN_ROWS.
constexpr int64_t kMinRows = 2;
inline bool moves_running(const Norm& n, int64_t rows, int64_t slot) {
  return rows >= kMinRows && n.rm.has_value() && slot < n.rm->size(0);
}

// std::vector storage aligned to 64 bytes, as every tensor's is. GCC peels a vectorized loop's first iterations until
// an access is aligned, and those run scalar code whose rounding may differ from the vector body's in the last bit
// (fused multiply-adds, a reduction's order): with malloc's varying alignment one call would then round differently
// from the next (training would not be bitwise reproducible). With aligned buffers the split is the same on every
// call.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, Aligned64<T>>;

// exp for float32 in plain arithmetic, so that loops calling it vectorize at whatever instruction set the file is
// built for, without -ffast-math (which glibc's vector expf needs): x = k ln2 + r with |r| <= ln2/2 (k rounded by the
// 1.5·2^23 trick, ln2 split in two so k·ln2 is exact), exp(r) by its degree-6 Taylor polynomial (relative error below
// 2e-7, about 2 ulp), times 2^k built in the exponent bits. x is clamped to [-87.3, 88.7], where 2^k stays normal:
// exp(-100) gives 1.2e-38 instead of 3.7e-44, which no sigmoid notices. A NaN stays NaN.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float exp_of(float x) { return exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

template <typename T>
inline T sigm(T x) {
  return T(1) / (T(1) + exp_of(-x));
}

template <typename T>
inline const T* ptr_or_null(const OptT& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
inline T* mptr_or_null(OptT& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// A row of a (F,) or (steps, F) per-feature tensor.
template <typename T>
inline const T* feature_row(const OptT& t, int64_t row, int64_t F) {
  if (!t.has_value() || !t->defined()) return nullptr;
  return t->dim() == 2 ? t->data_ptr<T>() + row * F : t->data_ptr<T>();
}

// A per-feature pointer, or (when absent) one to F copies of `fill`: the loops then need no branch on it, which would
// keep GCC from vectorizing them.
template <typename T>
inline const T* or_fill(const T* p, Buffer<T>& store, int64_t F, T fill) {
  if (p) return p;
  store.assign(F, fill);
  return store.data();
}

inline int64_t row_grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }
constexpr int64_t kFeatureGrain = 256;

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

// y = (x − mu)·rs·fw + fb for one row of F features (the parts that are absent are skipped).
template <typename T>
inline void row_apply(const RowNorm<T>& n, const T* x, T* y, int64_t F, T mu, T rs) {
  const T* __restrict fw = n.fw;
  const T* __restrict fb = n.fb;
  if (fw && fb) {
    for (int64_t j = 0; j < F; ++j) y[j] = (x[j] - mu) * rs * fw[j] + fb[j];
  } else if (fw) {
    for (int64_t j = 0; j < F; ++j) y[j] = (x[j] - mu) * rs * fw[j];
  } else if (fb) {
    for (int64_t j = 0; j < F; ++j) y[j] = (x[j] - mu) * rs + fb[j];
  } else if (mu != T(0) || rs != T(1) || x != y) {
    for (int64_t j = 0; j < F; ++j) y[j] = (x[j] - mu) * rs;
  }
}

// y = N(x) for row r of a step (F features); LN/RMS save the row's statistics in slot r.
template <typename T>
inline void row_forward(const RowNorm<T>& n, const T* x, T* y, int64_t F, int64_t r) {
  T mu = 0, rs = 1;
  if (n.kind == LN || n.kind == RMS) {
    if (n.kind == LN) {
#pragma omp simd reduction(+ : mu)
      for (int64_t j = 0; j < F; ++j) mu += x[j];
      mu /= F;
    }
    T var = 0;
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < F; ++j) {
      const T d = x[j] - mu;
      var += d * d;
    }
    rs = T(1) / std::sqrt(var / F + n.eps);
    if (n.mean) n.mean[r] = mu;
    n.rstd[r] = rs;
  }
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

// Per-thread partial sums of `width` accumulators (a reduction over rows run row-parallel): each thread adds into
// at(thread()), and add_to sums the threads' shares into out at the end, in a fixed order.
template <typename T>
struct ThreadSums {
  int64_t width, threads;
  Buffer<T> part;
  explicit ThreadSums(int64_t width) : width(width), threads(at::get_num_threads()), part(threads * width, T(0)) {}
  int64_t thread() const {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < threads, "lstm_step: thread ", tid, " of ", threads);
    return tid;
  }
  T* at(int64_t tid) { return part.data() + tid * width; }
  void add_to(T* out) const {
    for (int64_t k = 0; k < threads; ++k)
      for (int64_t j = 0; j < width; ++j) out[j] += part[k * width + j];
  }
};

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
      const T* __restrict mu = mean_s;
      const T* __restrict rs = rstd_s;
      for (int64_t r = r0; r < r1; ++r) {
        const T* __restrict xr = x + r * F;
        T* __restrict yr = y + r * F;
        for (int64_t j = 0; j < F; ++j) yr[j] = (xr[j] - mu[j]) * rs[j] * fw[j] + fb[j];
      }
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
      const T* __restrict dyr = dy + r * F;
      const T* __restrict xr = x + r * F;
      for (int64_t j = 0; j < F; ++j) {
        p[j] += dyr[j];
        p[F + j] += dyr[j] * (xr[j] - mu[j]) * rs[j];
      }
    });
    const T* a = sums.data();
    const T* b = sums.data() + F;
    for (int64_t j = 0; j < F; ++j) {
      if (dw) dw[j] += b[j];
      if (db) db[j] += a[j];
    }
    at::parallel_for(0, bs, row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* dyr = dy + r * F;
        const T* __restrict xr = x + r * F;
        T* dxr = dx + r * F;
        for (int64_t j = 0; j < F; ++j) {
          const T xh = (xr[j] - mu[j]) * rs[j];
          dxr[j] = (dyr[j] - a[j] / bs - xh * b[j] / bs) * (w[j] * rs[j]);
        }
      }
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

void check(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == like.scalar_type() && t.device().is_cpu(), "lstm_step: ",
              name, " must be a contiguous CPU tensor of the input's dtype");
}

// check() for each of `tensors` against `like` (and `like` itself).
void check_all(const Tensor& like, std::initializer_list<const Tensor*> tensors) {
  check(like, like, "the input");
  for (const Tensor* x : tensors) check(*x, like, "every tensor");
}

// Rows [r0, r1) of member k of a team of nth threads sharing n rows (or features) as evenly as possible.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t nth, int64_t k) {
  const int64_t q = n / nth, rem = n % nth, r0 = k * q + std::min(k, rem);
  return {r0, r0 + q + (k < rem ? 1 : 0)};
}

// The threads of one step's parallel region: enough rows of F features each (row_grain), at most ATen's threads.
inline int64_t team_size(int64_t bs, int64_t F) {
  const int64_t grain = row_grain(F);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (bs + grain - 1) / grain));
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
    const T* __restrict mu = mean;
    const T* __restrict rs = rstd;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * F;
      T* __restrict yr = y + r * F;
      for (int64_t j = 0; j < F; ++j) yr[j] = (xr[j] - mu[j]) * rs[j] * fw[j] + fb[j];
    }
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
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict dyr = dy + r * F;
      const T* __restrict xr = x + r * F;
      for (int64_t j = 0; j < F; ++j) {
        pa[j] += dyr[j];
        pc[j] += dyr[j] * (xr[j] - mean[j]) * rstd[j];
      }
    }
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
    for (int64_t r = r0; r < r1; ++r) {
      const T* dyr = dy + r * F;
      const T* __restrict xr = x + r * F;
      T* dxr = dx + r * F;
      for (int64_t j = 0; j < F; ++j) {
        const T xh = (xr[j] - mean[j]) * rstd[j];
        dxr[j] = (dyr[j] - a[j] / bs - xh * b[j] / bs) * (w[j] * rstd[j]);
      }
    }
  }
};

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

  LstmForwardRows(int64_t H, const T* z, T* z_save, T* s, T* sc, T* c, T* h, const T* u, const T* gscale,
                  const T* c0, int64_t off, int64_t prev_off, int64_t save_off)
      : H(H), G(4 * H), zp(z), zs(z_save ? z_save + save_off * G : nullptr), sp(s + save_off * G),
        scp(sc + save_off * H), cp(c + off * H), hp(h + off * H), up(u + off * G), gs(gscale),
        cprev(prev_off < 0 ? c0 : c + prev_off * H) {
    if (zs == zp) zs = nullptr;
  }

  void gates(int64_t r) const {  // s = σ(s + u·scale); c = f ⊙ c_{t-1} + i ⊙ (2σ(2g) − 1)
    T* __restrict sr = sp + r * G;
    const T* __restrict ur = up + r * G;
    for (int64_t j = 0; j < G; ++j) sr[j] = sigm(sr[j] + ur[j] * gs[j]);
    const T* __restrict i = sr;
    const T* __restrict f = sr + H;
    const T* __restrict g = sr + 2 * H;
    const T* __restrict cpr = cprev + r * H;
    T* __restrict cr = cp + r * H;
    for (int64_t j = 0; j < H; ++j) cr[j] = (i[j] * g[j] * T(2) - i[j]) + f[j] * cpr[j];
  }

  void output(int64_t r) const {  // sc = σ(2 N_c(c)); h = o ⊙ (2 sc − 1)
    const T* __restrict o = sp + r * G + 3 * H;
    T* __restrict scr = scp + r * H;
    T* __restrict hr = hp + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const T v = sigm(scr[j]);
      scr[j] = v;
      hr[j] = o[j] * v * T(2) - o[j];
    }
  }

  // All of row r with row-local norms, in one pass.
  void row(const RowNorm<T>& rh, const RowNorm<T>& rc, int64_t r) const {
    if (zs) std::copy(zp + r * G, zp + (r + 1) * G, zs + r * G);
    row_forward<T>(rh, zp + r * G, sp + r * G, G, r);  // N_h(z)·scale into s
    gates(r);
    row_forward<T>(rc, cp + r * H, scp + r * H, H, r);  // 2 N_c(c) into sc
    output(r);
  }
};

// The forward step t: rows [off, off + bs) of u, c, h; s, sc, z_save and the LN/RMS statistics at save_off (the same
// rows in training; a scratch of the first rows in inference); c_{t-1} from c0 (prev_off < 0) or c at prev_off.
// With row-local norms a row goes through all of it in one pass (one parallel region); a training batch norm, whose
// statistics span the rows, splits it into four.
void forward_step(Norm& nh, Norm& nc, const Tensor& z, const Tensor& u, const Tensor& gscale, const Tensor& c0,
                  const Tensor& s, const Tensor& c, const Tensor& sc, const Tensor& h, OptT z_save, int64_t t,
                  int64_t off, int64_t prev_off, int64_t bs, int64_t save_off) {
  const int64_t H = c.size(1), G = 4 * H;
  check_all(u, {&z, &gscale, &c0, &s, &c, &sc, &h});
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "lstm_forward_step", [&] {
    using T = scalar_t;
    const LstmForwardRows<T> f(H, z.data_ptr<T>(), mptr_or_null<T>(z_save), s.data_ptr<T>(), sc.data_ptr<T>(),
                               c.data_ptr<T>(), h.data_ptr<T>(), u.data_ptr<T>(), gscale.data_ptr<T>(),
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

  void head(int64_t r) const {  // dh; do = dh ⊙ tanh(N_c(c_t)); the gradient of 2 N_c(c_t) into work
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
      dor[j] = (scr[j] * T(2) - T(1)) * dh[j];                   // dh ⊙ tanh(N_c(c_t))
      dn[j] = (scr[j] - scr[j] * scr[j]) * o[j] * dh[j] * T(4);  // through tanh: 4σ'(2x)
    }
  }

  void gates(int64_t r) const {  // dc = work + dc_carry; the gate gradients; dc_carry = dc ⊙ f
    const T* __restrict sr = sp + r * G;
    T* __restrict dr = dup + r * G;
    const T* __restrict dnr = wk + r * H;
    T* __restrict dcr = dcp + r * H;
    const T* __restrict cpr = cprev + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const T i = sr[j], f = sr[H + j], g = sr[2 * H + j];
      const T dc = dnr[j] + dcr[j];
      dr[j] = dc * g * T(2) - dc;  // dc ⊙ tanh(g)
      dr[H + j] = dc * cpr[j];
      dr[2 * H + j] = dc * i * T(4);
      dcr[j] = dc * f;
    }
    for (int64_t j = 0; j < G; ++j) dr[j] *= sr[j] - sr[j] * sr[j];  // σ'; the candidate block: 4σ'(2g)
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

// ---- The recurrent GEMM C = A · W.T for float32: oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the
// one PyTorch's CPU attention uses), which picks its instruction set when it runs (AVX2, AVX-512, ...), over W packed
// once per sequence. A call of oneDNN's linear through the dispatcher costs ~25 µs on top of its arithmetic, and a
// step's GEMM is small (rows = the batch). Measured on 2 cores of an AVX-512 Xeon at benchmarks/speed.py's shapes:
// 230–300 GFLOP/s against 100–150 for the AVX2 register-blocked kernel this replaced, and equal to it with oneDNN
// held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2); at::mm (MKL) reaches 125–200.
// Packing: blocks of kBlock output features, block p = W[kBlock·p : kBlock·(p + 1), :] transposed, a (K, kBlock)
// row-major matrix (zeros past N), one after the other.
constexpr int64_t kBlock = 64;  // output features per block: the micro-kernel's N
inline int64_t blocks(int64_t N) { return (N + kBlock - 1) / kBlock; }

// `panels` is pack_panels' result for a float32 (N, K) weight.
inline void check_panels(const Tensor& panels, int64_t K, int64_t N) {
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.numel() == K * blocks(N) * kBlock, "lstm_step: float32 "
              "panels of a (", N, ", ", K, ") weight, not ", panels.numel(), " values of ", panels.scalar_type());
}

// W (N, K), any strides, float32 -> its blocks (K · kBlock · ceil(N / kBlock) floats, in the order above).
Tensor pack_panels(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), "pack_panels: a 2-d float32 CPU "
              "weight, not ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), P = blocks(N);
  Tensor out = at::zeros({P, K, kBlock}, w.options());
  for (int64_t p = 0; p < P; ++p) {
    const int64_t cols = std::min(kBlock, N - p * kBlock);
    out[p].narrow(1, 0, cols).copy_(w.narrow(0, p * kBlock, cols).t());
  }
  return out.view({-1});
}

#if ZOO_BRGEMM
// One thread's part of C (M, N) = A (M, K) · W.T (plus C where `add`): the blocks [p0, p1) of W (packed by
// pack_panels), the rows of A and C at strides lda and ldc.
void panels_block(const float* a, int64_t lda, int64_t M, int64_t K, const float* panels, int64_t N, float* c,
                  int64_t ldc, bool add, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min(kBlock, N - p * kBlock);
    at::native::cpublas::brgemm(M, cols, K, lda, kBlock, ldc, add, a, panels + p * K * kBlock, c + p * kBlock);
  }
  at::native::cpublas::brgemm_release(false);
}

// C (M, N) = A (M, K) · W.T, plus C where `add`: A and C contiguous rows; the threads share the blocks.
void panels_gemm(const float* a, int64_t M, int64_t K, const float* panels, int64_t N, float* c, bool add) {
  const int64_t P = blocks(N);
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P));
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    const auto [p0, p1] = share(P, nth, omp_get_thread_num());
    panels_block(a, K, M, K, panels, N, c, N, add, p0, p1);
  }
}
#endif  // ZOO_BRGEMM

// out = x @ W.T (+ out where `add`) for the recurrence: brgemm where W's blocks are given (float32), else
// at::mm. x and out: contiguous rows.
void recurrent_gemm(const Tensor& x, const Tensor& weight, const OptT& panels, const Tensor& out, bool add) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.size(0) == out.size(0) && x.size(1) == weight.size(1) &&
                  out.size(1) == weight.size(0),
              "lstm_step: recurrent GEMM of ", x.sizes(), " by ", weight.sizes(), " into ", out.sizes());
  if (panels.has_value() && panels->defined()) {
    TORCH_CHECK(ZOO_BRGEMM, "lstm_step: built without brgemm (an x86-64 build has it)");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "lstm_step: panels for float32 only");
    check_panels(*panels, x.size(1), out.size(1));
#if ZOO_BRGEMM
    panels_gemm(x.data_ptr<float>(), x.size(0), x.size(1), panels->data_ptr<float>(), out.size(1),
                out.data_ptr<float>(), add);
#endif
  } else if (add) {
    out.add_(at::mm(x, weight.t()));
  } else {
    at::mm_out(const_cast<Tensor&>(out), x, weight.t());
  }
}

// out = x @ W.T through the pybind interface (tests and benchmarks of the kernel).
Tensor panels_mm(const Tensor& x, const Tensor& weight, OptT panels) {
  Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  recurrent_gemm(x.contiguous(), weight, panels, out, false);
  return out;
}

// The input term's GEMM x @ W.T: oneDNN's linear with the weight prepacked by torch.ops.mkldnn._reorder_linear_weight
// (`packed`), else at::mm with the plain weight (out, in).
Tensor gemm(const Tensor& x, const Tensor& weight, const OptT& packed) {
  if (packed.has_value() && packed->defined()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                       c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
    return op.call(x, *packed, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  return at::mm(x, weight.t());
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& batch_sizes) {
  std::vector<int64_t> off(batch_sizes.size(), 0);
  for (size_t t = 1; t < batch_sizes.size(); ++t) off[t] = off[t - 1] + batch_sizes[t - 1];
  return off;
}

// With row-local norms each sequence's steps depend on its own rows only. Where the GEMM is brgemm, the
// loops therefore give each thread its rows (every nth row of the batch, interleaved so that the threads keep equal
// shares as sequences end) for all steps, its GEMMs included: no barrier between steps, where a shared step has two
// (after the GEMM, after the step), each waiting for the slowest thread.
inline bool rows_parallel(const Norm& nh, const Norm& nc, const OptT& panels, const Tensor& u) {
  return ZOO_BRGEMM && panels.has_value() && panels->defined() && u.scalar_type() == at::kFloat &&
         nh.kind != BN_TRAIN && nc.kind != BN_TRAIN;
}

// The threads of a rows-parallel loop over a batch of `rows`, and the rows of member k at a step of bs rows.
inline int64_t loop_threads(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
}
inline int64_t member_rows(int64_t bs, int64_t nth, int64_t k) { return bs > k ? (bs - k + nth - 1) / nth : 0; }

// Each step's row-local norms (built before a parallel region: nothing in it may throw).
std::vector<RowNorm<float>> step_norms(Norm& n, const std::vector<int64_t>& off, int64_t steps, bool saved_rows,
                                       int64_t F, Buffer<float>& ones) {
  std::vector<RowNorm<float>> out;
  for (int64_t t = 0; t < steps; ++t) out.push_back(row_norm<float>(n, t, saved_rows ? off[t] : 0, F, ones));
  return out;
}

// All forward steps: z_t = W_h h_{t-1} (the recurrent GEMM with W_h's panels), then forward_step. `train`: s, sc and
// the statistics are kept for every row (else s, sc are a scratch of batch_sizes[0] rows).
void forward_loop(Norm& nh, Norm& nc, const Tensor& weight, OptT panels, const Tensor& h0, const Tensor& u,
                  const Tensor& gscale, const Tensor& c0, const Tensor& s, const Tensor& c, const Tensor& sc,
                  const Tensor& h, OptT z_save, const std::vector<int64_t>& batch_sizes, bool train) {
  const auto off = offsets_of(batch_sizes);
  const int64_t steps = batch_sizes.size();
  // z goes where it is kept for backward, else to s's rows, where the step normalizes it in place
  const bool keep_z = train && z_save.has_value() && z_save->defined();
  if (!rows_parallel(nh, nc, panels, u)) {
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t bs = batch_sizes[t], prev = t ? off[t - 1] : -1, so = train ? off[t] : 0;
      const Tensor zt = keep_z ? z_save->narrow(0, off[t], bs) : s.narrow(0, so, bs);
      recurrent_gemm(t ? h.narrow(0, prev, bs) : h0, weight, panels, zt, false);
      forward_step(nh, nc, zt, u, gscale, c0, s, c, sc, h, z_save, t, off[t], prev, bs, so);
    }
    return;
  }
#if ZOO_BRGEMM
  const int64_t H = c.size(1), G = 4 * H, nth = loop_threads(batch_sizes[0]);
  check_all(u, {&h0, &gscale, &c0, &s, &c, &sc, &h});
  TORCH_CHECK(weight.size(0) == G && weight.size(1) == H, "lstm_step: W_h of ", weight.sizes(), " for ", H,
              " hidden features");
  check_panels(*panels, H, G);
  if (keep_z) check(*z_save, u, "z_save");
  Buffer<float> ones_h, ones_c;
  const auto rh = step_norms(nh, off, steps, train, G, ones_h), rc = step_norms(nc, off, steps, train, H, ones_c);
  const float* w = panels->data_ptr<float>();
  float* zk = keep_z ? z_save->data_ptr<float>() : nullptr;
  float *sp = s.data_ptr<float>(), *scp = sc.data_ptr<float>(), *cp = c.data_ptr<float>(), *hp = h.data_ptr<float>();
  const float *up = u.data_ptr<float>(), *gs = gscale.data_ptr<float>(), *h0p = h0.data_ptr<float>();
  const float* c0p = c0.data_ptr<float>();
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    const int64_t k = omp_get_thread_num();
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t bs = batch_sizes[t], m = member_rows(bs, nth, k);
      if (m == 0) break;  // (the batch only shrinks)
      const int64_t prev = t ? off[t - 1] : -1, so = train ? off[t] : 0;
      float* zt = keep_z ? zk + off[t] * G : sp + so * G;
      const float* hprev = t ? hp + prev * H : h0p;
      panels_block(hprev + k * H, nth * H, m, H, w, G, zt + k * G, nth * G, false, 0, blocks(G));
      const LstmForwardRows<float> f(H, zt, zk, sp, scp, cp, hp, up, gs, c0p, off[t], prev, so);
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
      recurrent_gemm(dzt, weight_t, panels_t, dh_carry.narrow(0, 0, bs), false);
    }
    return;
  }
#if ZOO_BRGEMM
  const int64_t H = c.size(1), G = 4 * H, nth = loop_threads(batch_sizes[0]);
  check_backward(s, sc, c, c0, z, dout, dh_carry, dc_carry, du, dz_buf, work);
  TORCH_CHECK(weight_t.size(0) == H && weight_t.size(1) == G, "lstm_step: W_h.T of ", weight_t.sizes(), " for ", H,
              " hidden features");
  check_panels(*panels_t, G, H);
  Buffer<float> ones_h, ones_c;
  const int64_t steps = batch_sizes.size();
  const auto rh = step_norms(nh, off, steps, true, G, ones_h), rc = step_norms(nc, off, steps, true, H, ones_c);
  Partials<float> ph(nh, G), pc(nc, H);
  const float* w = panels_t->data_ptr<float>();
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
      panels_block(a + k * G, nth * G, m, G, w, H, dhp + k * H, nth * H, false, 0, blocks(H));
    }
  }
  ph.finish();
  pc.finish();
#endif
}

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
      recurrent_gemm(t ? h.narrow(0, off[t - 1], bs) : h0, weight, panels, at, false);
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
      recurrent_gemm(da_buf.narrow(0, o - off[t_lo], bs), weight_t, panels_t, dh_carry.narrow(0, 0, bs), true);
    }
  });
}

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

// Blocks of rows of the projection x @ W.T (x (R, I), W (F, I), R = groups · per): whole groups of about `block`
// elements; body(r0, rows, p) gets each block's projection p (rows, F), computed while the last one is still in cache.
// Not for a training batch norm whose statistics span all rows.
template <typename Body>
void project_blocks(const Norm& n, const Tensor& x, const Tensor& weight, const OptT& packed, int64_t F, int64_t per,
                    int64_t groups, int64_t block, const Body& body) {
  check(x, x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) == F,
              "lstm_step: projection of x ", x.sizes(), " by a weight ", weight.sizes(), " to ", F, " features");
  TORCH_CHECK(!(n.kind == BN_TRAIN && groups == 1 && x.size(0) > 0), "lstm_step: a batch norm's statistics over all ",
              "rows need the whole projection first");
  const int64_t step = groups > 1 ? per : 1;  // the rows of a block are whole groups
  const int64_t rows = std::max<int64_t>(1, block / std::max<int64_t>(1, step * F)) * step;
  for (int64_t r0 = 0; r0 < x.size(0); r0 += rows) {
    const int64_t nr = std::min(rows, x.size(0) - r0);
    body(r0, nr, gemm(x.narrow(0, r0, nr), weight, packed).contiguous());
  }
}

// norm_rows_forward of the projection x @ W.T, a block at a time (`project_blocks`), so that the projection is
// normalized in cache instead of going to memory and back. `keep` (R, F), if given, receives the projection too.
void norm_rows_project(Norm& n, const Tensor& x, const Tensor& weight, OptT packed, const Tensor& y, int64_t groups,
                       OptT keep, int64_t block) {
  check(y, x, "y");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0), "norm_rows_project: y ", y.sizes(), " for x ", x.sizes());
  const bool kept = keep.has_value() && keep->defined();
  if (kept) check(*keep, y, "keep");
  const int64_t per = rows_per_group(y, groups), F = y.size(1);
  project_blocks(n, x, weight, packed, F, per, groups, block, [&](int64_t r0, int64_t nr, const Tensor& p) {
    if (kept) keep->narrow(0, r0, nr).copy_(p);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "norm_rows_project", [&] {
      using T = scalar_t;
      each_group(n, r0, nr, per, groups, [&](Norm& m, int64_t row, int64_t rows, int64_t t) {
        norm_forward<T>(m, p.data_ptr<T>() + (row - r0) * F, y.data_ptr<T>() + row * F, rows, F, t, row);
      });
    });
  });
}

// norm_rows_backward of the projection x @ W.T recomputed a block at a time (`project_blocks`): dp from dy.
void norm_rows_project_backward(Norm& n, const Tensor& dy, const Tensor& x, const Tensor& weight, OptT packed,
                                const Tensor& dp, int64_t groups, int64_t block) {
  check(dy, x, "dy");
  check(dp, x, "dp");
  TORCH_CHECK(dy.dim() == 2 && dy.sizes() == dp.sizes() && dy.size(0) == x.size(0), "norm_rows_project_backward: dy ",
              dy.sizes(), ", dp ", dp.sizes(), " for x ", x.sizes());
  const int64_t per = rows_per_group(dy, groups), F = dy.size(1);
  project_blocks(n, x, weight, packed, F, per, groups, block, [&](int64_t r0, int64_t nr, const Tensor& p) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zoo.nn.fused: one step of the fused LSTM recurrence between its GEMMs, and the input term's norm";
  py::enum_<Kind>(m, "Kind", py::module_local())
      .value("NONE", NONE)
      .value("LN", LN)
      .value("RMS", RMS)
      .value("BN_TRAIN", BN_TRAIN)
      .value("AFFINE", AFFINE);
  py::class_<Norm>(m, "Norm", py::module_local())  // (module-local: builds of two levels can load in one process)
      .def(py::init<>())
      .def_readwrite("kind", &Norm::kind)
      .def_readwrite("fw", &Norm::fw)
      .def_readwrite("fb", &Norm::fb)
      .def_readwrite("w", &Norm::w)
      .def_readwrite("mean", &Norm::mean)
      .def_readwrite("rstd", &Norm::rstd)
      .def_readwrite("rm", &Norm::rm)
      .def_readwrite("rv", &Norm::rv)
      .def_readwrite("per_step", &Norm::per_step)
      .def_readwrite("eps", &Norm::eps)
      .def_readwrite("momentum", &Norm::momentum)
      .def_readwrite("dw", &Norm::dw)
      .def_readwrite("db", &Norm::db);
  m.attr("MIN_ROWS") = kMinRows;  // (the tests hold it equal to zoo.nn.norm.MIN_ROWS)
  m.def("forward_loop", &forward_loop, "FusedLSTM forward: every step, GEMMs included");
  m.def("backward_loop", &backward_loop, "FusedLSTM backward: a range of steps, GEMMs included");
  m.def("gru_forward_loop", &gru_forward_loop, "FusedGRU forward: every step, GEMMs included");
  m.def("gru_backward_loop", &gru_backward_loop, "FusedGRU backward: a range of steps, GEMMs included");
  m.attr("brgemm") = py::bool_(ZOO_BRGEMM);  // the float32 recurrent GEMM through brgemm (x86-64)
  m.def("pack_panels", &pack_panels, "a float32 weight (out, in) packed for the recurrent GEMM kernel");
  m.def("panels_mm", &panels_mm, "x @ weight.T through the recurrent GEMM (the kernel where panels are given)");
  m.def("norm_rows_forward", &norm_rows_forward, "a normalization of all rows (the input term), forward");
  m.def("norm_rows_project", &norm_rows_project, "norm_rows_forward of a projection, a block of rows at a time");
  m.def("norm_rows_project_backward", &norm_rows_project_backward,
        "norm_rows_backward of a projection recomputed a block of rows at a time");
  m.def("norm_rows_backward", &norm_rows_backward, "a normalization of all rows (the input term), backward");
}
