// The GEMMs of the recurrence and of the input term: brgemm over packed blocks of W.
#pragma once

#include "common.h"

namespace {

// ---- The recurrent GEMM C = A · W.T for float32: oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the
// one PyTorch's CPU attention uses), which picks its instruction set when it runs (AVX2, AVX-512, ...), over W packed
// once per sequence. A call of oneDNN's linear through the dispatcher costs ~25 µs on top of its arithmetic, and a
// step's GEMM is small (rows = the batch). Measured on 2 cores of an AVX-512 Xeon at benchmarks/speed.py's shapes:
// 230–300 GFLOP/s against 100–150 for the AVX2 register-blocked kernel this replaced, and equal to it with oneDNN
// held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2); at::mm (MKL) reaches 125–200.
// Packing: blocks of kBlock output features, block p = W[kBlock·p : kBlock·(p + 1), :] transposed, a (K, kBlock)
// row-major matrix (zeros past N), one after the other.
// Output features per block, the micro-kernel's N: 64 with AVX-512's 32 vector registers, 32 in the builds below it,
// where oneDNN's AVX2 kernel ran 10-30% faster at 1000 units and 2-4% at 256-512 with blocks of 32 than of 64 (one
// core of an AMD EPYC Zen 4 held to AVX2; with AVX-512 the two were within noise).
#if defined(__AVX512F__)
constexpr int64_t kBlock = 64;
#else
constexpr int64_t kBlock = 32;
#endif
inline int64_t blocks(int64_t N) { return (N + kBlock - 1) / kBlock; }

// Under torch.autocast("cpu", dtype=torch.bfloat16), where oneDNN packs bfloat16 for its matrix unit (AMX:
// at::native::cpublas::could_pack), the blocks are bfloat16 in oneDNN's VNNI layout (pairs of depth rows interleaved,
// the depth rounded up to even with a zero row) and each call converts its rows of A to bfloat16: the products run
// in bfloat16 and accumulate in float32, the result is float32 (the norms, gates and cell state stay float32).
// On 2 cores of an AMX Xeon: 400–1100 GFLOP/s at the benchmark's shapes, against 150–300 in float32.
inline bool bf16_blocks_supported() { return ZOO_BRGEMM && at::native::cpublas::could_pack(at::kBFloat16); }

// W's blocks as pack_panels returns them, for a GEMM of depth K into N features.
struct Blocks {
  const void* data = nullptr;
  bool bf16 = false;
  int64_t K = 0, Kp = 0;  // the depth; the depth as packed (bfloat16: even)
};

inline Blocks blocks_of(const Tensor& panels, int64_t K, int64_t N) {
  const bool bf16 = panels.scalar_type() == at::kBFloat16;
  const int64_t Kp = bf16 ? K + (K & 1) : K;
  TORCH_CHECK((bf16 || panels.scalar_type() == at::kFloat) && panels.numel() == Kp * blocks(N) * kBlock,
              "lstm_step: the packed blocks of a (", N, ", ", K, ") weight, not ", panels.numel(), " values of ",
              panels.scalar_type());
  return {panels.data_ptr(), bf16, K, Kp};
}

// The first `full` blocks of W (rows ld apart, contiguous within) into out (blocks Kp apart), the threads sharing
// tiles of a block's kBlock rows by kTile of depth, each transposed 16 rows at a time in L1. A strided at::copy_ of
// the transposed view took 2.5-5x as long at 256 and 512 units on an AMD EPYC (W_h: 1 MB in 150 us, 4 MB in 1 ms).
inline void pack_rows(const float* w, int64_t ld, int64_t K, int64_t full, int64_t Kp, float* out) {
  constexpr int64_t kTile = 64, kRows = 16;  // (four cache lines of each row)
  const int64_t tiles = (K + kTile - 1) / kTile;
  at::parallel_for(0, full * tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p = b / tiles, k0 = (b % tiles) * kTile, k1 = std::min(K, k0 + kTile);
      const float* src = w + p * kBlock * ld;
      float* dst = out + p * Kp * kBlock;
      for (int64_t n0 = 0; n0 < kBlock; n0 += kRows)  // (16 rows at a time: 64 rows a power of two apart shared
        for (int64_t k = k0; k < k1; ++k)              // few cache sets and evicted each other)
          for (int64_t n = n0; n < n0 + kRows; ++n) dst[k * kBlock + n] = src[n * ld + k];
    }
  });
}

// W (N, K), any strides, float32 -> its blocks (K · kBlock · ceil(N / kBlock) values, in the order above), float32
// or (`bf16`) bfloat16 in the VNNI layout.
Tensor pack_panels(const Tensor& w, bool bf16) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), "pack_panels: a 2-d float32 CPU "
              "weight, not ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(!bf16 || bf16_blocks_supported(), "pack_panels: bfloat16 blocks need oneDNN's packing (AMX)");
  const int64_t N = w.size(0), K = w.size(1), P = blocks(N), Kp = bf16 ? K + (K & 1) : K;
  Tensor packed = at::empty({P, Kp, kBlock}, w.options());
  if (Kp > K) packed.narrow(1, K, Kp - K).zero_();
  const int64_t full = N / kBlock;
  if (full > 0 && w.stride(1) == 1) {  // W's rows contiguous: a transposing copy, tile by tile
    pack_rows(w.data_ptr<float>(), w.stride(0), K, full, Kp, packed.data_ptr<float>());
  } else if (full > 0) {  // (W.T's rows contiguous: a block's depth rows are runs of W; one strided copy is fast)
    const Tensor blocks_t = w.narrow(0, 0, full * kBlock).unflatten(0, {full, kBlock}).transpose(1, 2);
    packed.narrow(0, 0, full).narrow(1, 0, K).copy_(blocks_t);
  }
  if (full < P) {
    Tensor last = packed[full];
    last.zero_();
    last.narrow(0, 0, K).narrow(1, 0, N - full * kBlock).copy_(w.narrow(0, full * kBlock, N - full * kBlock).t());
  }
  Tensor out = bf16 ? packed.to(at::kBFloat16) : packed;
#if ZOO_BRGEMM
  if (bf16) {
    Tensor vnni = at::empty_like(out);
    for (int64_t p = 0; p < P; ++p)
      at::native::cpublas::pack(Kp, kBlock, kBlock, kBlock, at::kBFloat16, at::kBFloat16, out[p].data_ptr(),
                                vnni[p].data_ptr());
    out = vnni;
  }
#endif
  return out.view({-1});
}

#if ZOO_BRGEMM
// The depth of one brgemm call: at most kDepth, in equal even chunks. The kernel re-reads a block's slice of W
// (depth · kBlock values) for each group of a few rows of A, so that slice should stay in L2: at depth 4000 (the
// backward GEMM of 1000 units) one call per block ran at 100 GFLOP/s on one core of an AVX-512 Xeon, chunks of 1000
// at 125 (32 rows; 64 rows: 113 -> 145).
constexpr int64_t kDepth = 1024;
inline int64_t depth_chunk(int64_t K) {
  const int64_t n = (K + kDepth - 1) / kDepth, d = (K + n - 1) / n;
  return d + (d & 1);  // (even: bfloat16 blocks interleave pairs of depth rows)
}

// One thread's part of C (M, N) = A (M, K) · W.T (plus C where `add`): the blocks [p0, p1) of W (packed by
// pack_panels), the rows of A and C at strides lda and ldc.
void panels_block(const float* a, int64_t lda, int64_t M, const Blocks& w, int64_t N, float* c, int64_t ldc, bool add,
                  int64_t p0, int64_t p1) {
  const int64_t kc = depth_chunk(w.K);
  if (!w.bf16) {
    const float* b = static_cast<const float*>(w.data);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k0 = 0; k0 < w.K; k0 += kc)
        at::native::cpublas::brgemm(M, std::min(kBlock, N - p * kBlock), std::min(kc, w.K - k0), lda, kBlock, ldc,
                                    add || k0 > 0, a + k0, b + (p * w.K + k0) * kBlock, c + p * kBlock, false);
    at::native::cpublas::brgemm_release(false);
    return;
  }
  thread_local std::vector<at::BFloat16> rows;  // A's rows in bfloat16, Kp apart (a zero past K)
  rows.assign(M * w.Kp, at::BFloat16(0.0f));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < w.K; ++k) rows[i * w.Kp + k] = at::BFloat16(a[i * lda + k]);
  const at::BFloat16* b = static_cast<const at::BFloat16*>(w.data);
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t k0 = 0; k0 < w.Kp; k0 += kc)
      at::native::cpublas::brgemm(M, std::min(kBlock, N - p * kBlock), std::min(kc, w.Kp - k0), w.Kp, kBlock, ldc,
                                  add || k0 > 0, rows.data() + k0, b + (p * w.Kp + k0) * kBlock, c + p * kBlock, true);
  at::native::cpublas::brgemm_release(true);
}

// C (M, N) = A (M, K) · W.T, plus C where `add`: A and C contiguous rows; the threads share the blocks.
// Called inside a parallel region, one thread does all the blocks (a nested region would have one thread).
void panels_gemm(const float* a, int64_t M, const Blocks& w, int64_t N, float* c, bool add) {
  const int64_t P = blocks(N);
  const int64_t nth = at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P));
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    const auto [p0, p1] = share(P, omp_get_num_threads(), omp_get_thread_num());  // (the team's actual size)
    panels_block(a, w.K, M, w, N, c, N, add, p0, p1);
  }
}
#endif  // ZOO_BRGEMM

// out = x @ W.T (+ out where `add`), the recurrence's and the input term's: brgemm where W's blocks are given
// (float32 x), else at::mm. x and out: contiguous rows.
void gemm_rows(const Tensor& x, const Tensor& weight, const OptT& panels, const Tensor& out, bool add) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.size(0) == out.size(0) && x.size(1) == weight.size(1) &&
                  out.size(1) == weight.size(0),
              "lstm_step: GEMM of ", x.sizes(), " by ", weight.sizes(), " into ", out.sizes());
  if (panels.has_value() && panels->defined()) {
    TORCH_CHECK(ZOO_BRGEMM, "lstm_step: built without brgemm (an x86-64 build has it)");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "lstm_step: packed blocks for float32 only");
    const Blocks w = blocks_of(*panels, x.size(1), out.size(1));
#if ZOO_BRGEMM
    panels_gemm(x.data_ptr<float>(), x.size(0), w, out.size(1), out.data_ptr<float>(), add);
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
  gemm_rows(x.contiguous(), weight, panels, out, false);
  return out;
}

}  // namespace
