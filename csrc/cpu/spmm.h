// SpMM on the CPU: out (m x k) = A (m x n, CSR) @ dense (n x k).
//
// Work split: rows of A go to OpenMP threads dynamically, in `row_indices` order (heaviest
// first). For one row and one tile of kTile output columns the accumulators stay in vector
// registers while the row's nonzeros stream in: acc += values[p] * dense[col_indices[p], tile].
// float/double `dense` is read in place; 16-bit `dense` is first converted to float once per call,
// only the rows some nonzero uses (for RoSA masks most rows are unused), into a per-thread
// workspace, instead of once per use. The inner loops are compiled twice (generic SSE2 and
// AVX2+FMA) and the CPU picks. Assumes validated CSR (offsets nondecreasing, columns in [0, n)),
// `dense` rows contiguous with row stride `dense_stride`, `out` contiguous (row stride k).
// Measurements and the designs that lost (L2 panels, packing float rows): docs/benchmarks.md; the history in git at c550a82.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/common.h"

namespace rosa::cpu {
namespace spmm_detail {

template <typename T>
struct Problem {
  using Acc = accumulator_t<T>;
  const T* values;
  const int32_t* row_offsets;
  const int32_t* cols;  // rows of `dense` read by each nonzero
  const Acc* dense;     // float/double rows, row stride dense_stride
  int64_t dense_stride;
  T* out;
  int64_t k;
};

// Eight vectors of accumulators (64 float or 32 double columns): enough independent chains to
// hide the latency of the fused multiply-adds, few enough to stay in the 16 vector registers.
constexpr int64_t kTileVectors = 8;
template <typename T>
constexpr int64_t kTile = kTileVectors * Vec<accumulator_t<T>>::lanes;

// out[row, c0 : c0 + kTile].
template <typename T>
ROSA_ALWAYS_INLINE void full_tile(const Problem<T>& p, int64_t begin, int64_t end, int64_t row,
                                  int64_t c0) {
  using Acc = accumulator_t<T>;
  using V = typename Vec<Acc>::type;
  constexpr int64_t L = Vec<Acc>::lanes;
  V acc[kTileVectors];
  for (int64_t j = 0; j < kTileVectors; ++j) acc[j] = V{};
  for (int64_t q = begin; q < end; ++q) {
    const V v = V{} + to_acc(p.values[q]);
    const Acc* dense_row = p.dense + static_cast<int64_t>(p.cols[q]) * p.dense_stride + c0;
#pragma GCC unroll 8
    for (int64_t j = 0; j < kTileVectors; ++j) acc[j] += v * load_vec(dense_row + j * L);
  }
  T* out_row = p.out + row * p.k + c0;
  for (int64_t j = 0; j < kTileVectors; ++j) {
    for (int64_t l = 0; l < L; ++l) out_row[j * L + l] = static_cast<T>(acc[j][l]);
  }
}

// The ragged last tile (width < kTile): a plain loop.
template <typename T>
ROSA_ALWAYS_INLINE void partial_tile(const Problem<T>& p, int64_t begin, int64_t end, int64_t row,
                                     int64_t c0, int64_t width) {
  using Acc = accumulator_t<T>;
  Acc acc[kTile<T>];
  for (int64_t c = 0; c < width; ++c) acc[c] = Acc(0);
  for (int64_t q = begin; q < end; ++q) {
    const Acc v = to_acc(p.values[q]);
    const Acc* dense_row = p.dense + static_cast<int64_t>(p.cols[q]) * p.dense_stride + c0;
    for (int64_t c = 0; c < width; ++c) acc[c] += v * dense_row[c];
  }
  T* out_row = p.out + row * p.k + c0;
  for (int64_t c = 0; c < width; ++c) out_row[c] = static_cast<T>(acc[c]);
}

template <typename T>
ROSA_ALWAYS_INLINE void row(const Problem<T>& p, int64_t i) {
  const int64_t begin = p.row_offsets[i], end = p.row_offsets[i + 1];
  int64_t c0 = 0;
  for (; c0 + kTile<T> <= p.k; c0 += kTile<T>) full_tile<T>(p, begin, end, i, c0);
  if (c0 < p.k) partial_tile<T>(p, begin, end, i, c0, p.k - c0);
}

template <typename T>
void row_generic(const Problem<T>& p, int64_t i) {
  row<T>(p, i);
}

template <typename T>
ROSA_TARGET_AVX2 void row_avx2(const Problem<T>& p, int64_t i) {
  row<T>(p, i);
}

}  // namespace spmm_detail

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_stride, T* out, int64_t m,
          int64_t n, int64_t k, int num_threads) {
  using namespace spmm_detail;
  using Acc = accumulator_t<T>;
  if (m == 0 || k == 0) return;
  const auto row_fn = cpu_has_avx2_fma() ? &row_avx2<T> : &row_generic<T>;
  num_threads = threads_for(row_offsets[m] * k, num_threads);
  auto run = [&](const Problem<T>& p) {
    parallel_for(m, num_threads, 4, [&](int64_t r) { row_fn(p, row_indices[r]); });
  };
  if constexpr (std::is_same_v<T, Acc>) {
    run(Problem<T>{values, row_offsets, col_indices, dense, dense_stride, out, k});
  } else {
    const UsedRows used = used_rows(col_indices, row_offsets[m], n);
    const int64_t used_count = static_cast<int64_t>(used.rows.size());
    const Workspace<Acc, 0> workspace(static_cast<size_t>(used_count * k));
    Acc* converted = workspace.data();
    parallel_for(used_count, num_threads, 16, [&](int64_t u) {
      const T* source = dense + static_cast<int64_t>(used.rows[u]) * dense_stride;
      for (int64_t c = 0; c < k; ++c) converted[u * k + c] = to_acc(source[c]);
    });
    run(Problem<T>{values, row_offsets, used.renumbered.data(), converted, k, out, k});
  }
}

}  // namespace rosa::cpu
