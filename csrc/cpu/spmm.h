// SpMM on the CPU: out (m x k) = A (m x n, CSR) @ dense (n x k).
//
// Work split: the k columns are cut into panels. The rows of `dense` that some nonzero uses are
// first packed, converted to the accumulator type, panel by panel into one buffer the threads
// share; one panel of them is small enough for L2 (panel_width in common.h). Then, panel after
// panel, rows of A are handed
// out dynamically to OpenMP threads in `row_indices` order (heaviest first); for one row and one
// tile of kTile columns the accumulators stay in vector registers while the row's nonzeros
// stream in: acc += values[p] * packed[col_indices[p], tile].
// Why pack: rows of `dense` a power-of-two apart in memory (k = 512 floats is 2 KiB) fall into a
// few cache sets, so reading a panel straight from `dense` thrashes L1/L2 (measured 5x slower);
// packing also converts 16-bit rows once per call instead of once per use, and skips rows of
// `dense` that no nonzero touches (most of them for RoSA masks, whose nonzeros share columns).
// The inner loops are compiled twice (generic SSE2 and AVX2+FMA) and the CPU picks.
// Assumes validated CSR (offsets nondecreasing, columns in [0, n)), `dense` rows contiguous with
// row stride `dense_stride`, `out` contiguous (row stride k).
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace rosa::cpu {
namespace spmm_detail {

template <typename T>
struct Problem {
  using Acc = accumulator_t<T>;
  const T* values;
  const int32_t* row_offsets;
  const int32_t* packed_cols;  // col_indices renumbered to rows of `packed`
  const Acc* packed;           // the panel's used rows of dense (or dense itself), row stride `panel`
  int64_t panel;
  T* out;
  int64_t k;
};

// Eight vectors of accumulators (64 float or 32 double columns): enough independent chains to
// hide the latency of the fused multiply-adds, few enough to stay in the 16 vector registers.
constexpr int64_t kTileVectors = 8;
template <typename T>
constexpr int64_t kTile = kTileVectors * Vec<accumulator_t<T>>::lanes;

// out[row, c0 + offset : + kTile], `offset` counted inside the panel.
template <typename T>
ROSA_ALWAYS_INLINE void full_tile(const Problem<T>& p, int64_t begin, int64_t end, int64_t row,
                                  int64_t c0, int64_t offset) {
  using Acc = accumulator_t<T>;
  using V = typename Vec<Acc>::type;
  constexpr int64_t L = Vec<Acc>::lanes;
  V acc[kTileVectors];
  for (int64_t j = 0; j < kTileVectors; ++j) acc[j] = V{};
  for (int64_t q = begin; q < end; ++q) {
    const V v = V{} + to_acc(p.values[q]);
    const Acc* dense_row = p.packed + static_cast<int64_t>(p.packed_cols[q]) * p.panel + offset;
#pragma GCC unroll 8
    for (int64_t j = 0; j < kTileVectors; ++j) acc[j] += v * load_vec(dense_row + j * L);
  }
  T* out_row = p.out + row * p.k + c0 + offset;
  for (int64_t j = 0; j < kTileVectors; ++j) {
    for (int64_t l = 0; l < L; ++l) out_row[j * L + l] = static_cast<T>(acc[j][l]);
  }
}

// The ragged last tile (width < kTile): a plain loop, it is rare.
template <typename T>
ROSA_ALWAYS_INLINE void partial_tile(const Problem<T>& p, int64_t begin, int64_t end, int64_t row,
                                     int64_t c0, int64_t offset, int64_t width) {
  using Acc = accumulator_t<T>;
  Acc acc[kTile<T>];
  for (int64_t c = 0; c < width; ++c) acc[c] = Acc(0);
  for (int64_t q = begin; q < end; ++q) {
    const Acc v = to_acc(p.values[q]);
    const Acc* dense_row = p.packed + static_cast<int64_t>(p.packed_cols[q]) * p.panel + offset;
    for (int64_t c = 0; c < width; ++c) acc[c] += v * dense_row[c];
  }
  T* out_row = p.out + row * p.k + c0 + offset;
  for (int64_t c = 0; c < width; ++c) out_row[c] = static_cast<T>(acc[c]);
}

// Columns [c0, c0 + width) of one output row.
template <typename T>
ROSA_ALWAYS_INLINE void row_panel(const Problem<T>& p, int64_t row, int64_t c0, int64_t width) {
  constexpr int64_t W = kTile<T>;
  const int64_t begin = p.row_offsets[row], end = p.row_offsets[row + 1];
  int64_t offset = 0;
  for (; offset + W <= width; offset += W) full_tile<T>(p, begin, end, row, c0, offset);
  if (offset < width) partial_tile<T>(p, begin, end, row, c0, offset, width - offset);
}

template <typename T>
void row_panel_generic(const Problem<T>& p, int64_t row, int64_t c0, int64_t width) {
  row_panel<T>(p, row, c0, width);
}

template <typename T>
ROSA_TARGET_AVX2 void row_panel_avx2(const Problem<T>& p, int64_t row, int64_t c0, int64_t width) {
  row_panel<T>(p, row, c0, width);
}

}  // namespace spmm_detail

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_stride, T* out, int64_t m,
          int64_t n, int64_t k, int num_threads) {
  using namespace spmm_detail;
  using Acc = accumulator_t<T>;
  if (m == 0 || k == 0) return;
  const int64_t nnz = row_offsets[m];
  const auto row_panel_fn = cpu_has_avx2_fma() ? &row_panel_avx2<T> : &row_panel_generic<T>;
  const UsedRows used = used_rows(col_indices, nnz, n);
  const int64_t used_count = static_cast<int64_t>(used.rows.size());
  if constexpr (std::is_same_v<T, Acc>) {
    if (!worth_packing(nnz, used_count, false)) {
      // Few reads per row of `dense`: one panel of full rows, read in place (whole rows, so
      // no cache-set conflicts either).
      const Problem<T> p{values, row_offsets, col_indices, dense, dense_stride, out, k};
      parallel_for(m, num_threads, 4, [&](int64_t r) { row_panel_fn(p, row_indices[r], 0, k); });
      return;
    }
  }
  // 256 KiB panels: half of a current x86 core's L2 (measured on 2 EPYC cores, see
  // docs/perf-notes-cpu.md).
  const int64_t panel = panel_width(used_count, k, sizeof(Acc), kTile<T>, 256 * 1024);
  const int64_t panels = (k + panel - 1) / panel;
  // All panels are packed up front, panel after panel, so the threads meet at one barrier
  // instead of two per panel: on a busy machine a descheduled thread stalls every barrier.
  Acc* packed = workspace<Acc, 0>(static_cast<size_t>(panels * used_count * panel));
#ifdef ROSA_WITH_OPENMP
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && m > 1)
#endif
  {
#ifdef ROSA_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t u = 0; u < used_count; ++u) {
      const T* source = dense + static_cast<int64_t>(used.rows[u]) * dense_stride;
      for (int64_t t = 0; t < panels; ++t) {
        const int64_t c0 = t * panel, width = std::min(panel, k - c0);
        Acc* target = packed + (t * used_count + u) * panel;
        for (int64_t c = 0; c < width; ++c) target[c] = to_acc(source[c0 + c]);
      }
    }
    // Panels write disjoint columns of `out`: no barrier between them.
    for (int64_t t = 0; t < panels; ++t) {
      const int64_t c0 = t * panel, width = std::min(panel, k - c0);
      const Problem<T> p{values, row_offsets, used.renumbered.data(),
                         packed + t * used_count * panel, panel, out, k};
#ifdef ROSA_WITH_OPENMP
#pragma omp for schedule(dynamic, 4) nowait
#endif
      for (int64_t r = 0; r < m; ++r) row_panel_fn(p, row_indices[r], c0, width);
    }
  }
}

}  // namespace rosa::cpu
