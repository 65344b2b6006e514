// What the LSTM and GRU loops over steps share: step offsets, the rows-parallel decision, row shares.
#pragma once

#include "norms.h"

namespace {

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

}  // namespace
