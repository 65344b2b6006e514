// Shared by every part of the extension: the norm configuration passed from Python, aligned buffers, the
// vectorizable exp and sigmoid, the per-thread sums and the split of rows among threads.
#pragma once

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

// The element-wise helpers below are inlined into the loops that call them, however deep those are nested (lambdas
// included): a call would keep a loop from vectorizing.
#define ZOO_INLINE inline __attribute__((always_inline))
#define ZOO_LAMBDA __attribute__((always_inline))

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
ZOO_INLINE float exp_approx(float x) {
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

ZOO_INLINE float exp_of(float x) { return exp_approx(x); }
ZOO_INLINE double exp_of(double x) { return std::exp(x); }

template <typename T>
ZOO_INLINE T sigm(T x) {
  return T(1) / (T(1) + exp_of(-x));
}

// The sum of f(j) over j < n in 4 vectors' worth of independent partial sums: a single vector accumulator (what
// `omp simd reduction` gives) waits for the add's latency at every step, which made the norms' row statistics
// latency-bound (a micro-benchmark on rows of 2048 ran 2.4x faster with AVX2 and 1.15x with AVX-512 this way).
// Every loop has a fixed trip count, so that the partial sums stay in registers (a loop of variable length into them
// keeps them in memory, where the vector loads that fold them wait on its scalar stores), and they are folded by vector
// adds, half onto half, not by one dependent scalar add each (~250 cycles a call, at every row statistic).
template <typename T, typename Fn>
inline T lane_sum(int64_t n, Fn f) {
  constexpr int64_t kVec = 64 / sizeof(T), kAcc = 4 * kVec;  // four AVX-512 vectors, eight AVX2 ones
  T acc[kAcc] = {};
  int64_t j = 0;
  for (; j + kAcc <= n; j += kAcc) {
#pragma omp simd
    for (int64_t k = 0; k < kAcc; ++k) acc[k] += f(j + k);
  }
  for (; j + kVec <= n; j += kVec) {  // what is left, a vector at a time
#pragma omp simd
    for (int64_t k = 0; k < kVec; ++k) acc[k] += f(j + k);
  }
#pragma omp simd
  for (int64_t k = 0; k < 2 * kVec; ++k) acc[k] += acc[k + 2 * kVec];  // the partial sums pairwise, half onto half
#pragma omp simd
  for (int64_t k = 0; k < kVec; ++k) acc[k] += acc[k + kVec];
  T s = 0;
  for (int64_t k = 0; k < kVec; ++k) s += acc[k];
  for (; j < n; ++j) s += f(j);  // (fewer than a vector's worth)
  return s;
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


}  // namespace
