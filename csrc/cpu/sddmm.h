// SDDMM on the CPU: out[p] = <a[i, :], bt[j, :]> for every nonzero p = (i, j) of the CSR mask.
//
// Work split: the inner dimension k is cut into panels. The rows of `bt` that some nonzero uses
// are packed, converted to the accumulator type and zero-padded to a whole number of vectors,
// panel by panel into one buffer shared by the threads; one panel of them fits in L2/L3
// (panel_width in common.h). Then, panel after panel, rows of the mask go to OpenMP threads in
// `row_indices` order (heaviest first, cyclic chunks of 4: the same owner in every panel); a
// thread converts its row of `a` once per panel and computes the row's dot products four
// nonzeros at a time, so each loaded vector of `a` feeds four fused multiply-adds. Partial sums
// of several panels accumulate in `out` (float/double) or a float buffer (16-bit outputs).
// Packing avoids the cache-set conflicts of rows a power of two apart, converts 16-bit rows once
// per call instead of once per use, and skips the rows of `bt` no nonzero touches (most of them
// for RoSA masks). The inner loops are compiled twice (generic SSE2 and AVX2+FMA), the CPU picks.
// Assumes validated CSR and rows of `a`/`bt` contiguous with the given row strides.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace rosa::cpu {
namespace sddmm_detail {

template <typename T>
struct Problem {
  using Acc = accumulator_t<T>;
  const int32_t* row_offsets;
  const int32_t* packed_cols;  // col_indices renumbered to rows of `packed`
  const T* a;
  int64_t a_stride;
  const Acc* packed;  // the panel's used rows of bt (zero-padded) or bt itself, row stride `panel`
  int64_t panel;
  Acc* sums;          // one running sum per nonzero (16-bit outputs), or null
  T* out;
  bool first_panel, last_panel;
};

// Two vectors per dot product (16 floats / 8 doubles per step) and four dot products at once:
// eight independent accumulator chains.
template <typename Acc>
constexpr int64_t kStep = 2 * Vec<Acc>::lanes;

template <typename Acc>
ROSA_ALWAYS_INLINE Acc horizontal_sum(typename Vec<Acc>::type x) {
  Acc sum = 0;
  for (int64_t l = 0; l < Vec<Acc>::lanes; ++l) sum += x[l];
  return sum;
}

// Adds the panel's part of the dot products of one mask row; `a_row` is the converted,
// zero-padded panel of a's row and `width` a multiple of kStep.
template <typename T>
ROSA_ALWAYS_INLINE void row_panel(const Problem<T>& p, int64_t row, const accumulator_t<T>* a_row,
                                  int64_t width) {
  using Acc = accumulator_t<T>;
  using V = typename Vec<Acc>::type;
  constexpr int64_t L = Vec<Acc>::lanes;
  const int64_t begin = p.row_offsets[row], end = p.row_offsets[row + 1];
  auto bt_row = [&](int64_t q) { return p.packed + static_cast<int64_t>(p.packed_cols[q]) * p.panel; };
  // Running sums live in `out` for float/double and in `sums` for 16-bit outputs, which are
  // rounded once, after the last panel.
  auto store = [&](int64_t q, Acc value) {
    if constexpr (std::is_same_v<T, Acc>) {
      p.out[q] = p.first_panel ? value : p.out[q] + value;
    } else {
      const Acc sum = p.first_panel ? value : p.sums[q] + value;
      if (p.last_panel) {
        p.out[q] = static_cast<T>(sum);
      } else {
        p.sums[q] = sum;
      }
    }
  };
  int64_t q = begin;
  for (; q + 4 <= end; q += 4) {
    const Acc* b0 = bt_row(q);
    const Acc* b1 = bt_row(q + 1);
    const Acc* b2 = bt_row(q + 2);
    const Acc* b3 = bt_row(q + 3);
    V s0{}, s1{}, s2{}, s3{}, t0{}, t1{}, t2{}, t3{};
    for (int64_t c = 0; c < width; c += 2 * L) {
      const V x = load_vec(a_row + c), y = load_vec(a_row + c + L);
      s0 += x * load_vec(b0 + c);
      t0 += y * load_vec(b0 + c + L);
      s1 += x * load_vec(b1 + c);
      t1 += y * load_vec(b1 + c + L);
      s2 += x * load_vec(b2 + c);
      t2 += y * load_vec(b2 + c + L);
      s3 += x * load_vec(b3 + c);
      t3 += y * load_vec(b3 + c + L);
    }
    store(q, horizontal_sum<Acc>(s0 + t0));
    store(q + 1, horizontal_sum<Acc>(s1 + t1));
    store(q + 2, horizontal_sum<Acc>(s2 + t2));
    store(q + 3, horizontal_sum<Acc>(s3 + t3));
  }
  if (q + 2 <= end) {
    const Acc* b0 = bt_row(q);
    const Acc* b1 = bt_row(q + 1);
    V s0{}, s1{}, t0{}, t1{};
    for (int64_t c = 0; c < width; c += 2 * L) {
      const V x = load_vec(a_row + c), y = load_vec(a_row + c + L);
      s0 += x * load_vec(b0 + c);
      t0 += y * load_vec(b0 + c + L);
      s1 += x * load_vec(b1 + c);
      t1 += y * load_vec(b1 + c + L);
    }
    store(q, horizontal_sum<Acc>(s0 + t0));
    store(q + 1, horizontal_sum<Acc>(s1 + t1));
    q += 2;
  }
  if (q < end) {
    // One dot product: four chains where the width allows, to hide the FMA latency.
    const Acc* b = bt_row(q);
    V s0{}, s1{}, s2{}, s3{};
    int64_t c = 0;
    for (; c + 4 * L <= width; c += 4 * L) {
      s0 += load_vec(a_row + c) * load_vec(b + c);
      s1 += load_vec(a_row + c + L) * load_vec(b + c + L);
      s2 += load_vec(a_row + c + 2 * L) * load_vec(b + c + 2 * L);
      s3 += load_vec(a_row + c + 3 * L) * load_vec(b + c + 3 * L);
    }
    for (; c < width; c += 2 * L) {
      s0 += load_vec(a_row + c) * load_vec(b + c);
      s1 += load_vec(a_row + c + L) * load_vec(b + c + L);
    }
    store(q, horizontal_sum<Acc>((s0 + s1) + (s2 + s3)));
  }
}

// One mask row's part of a panel [c0, c0 + width): convert a's row, then the dot products.
template <typename T>
ROSA_ALWAYS_INLINE void row(const Problem<T>& p, int64_t i, int64_t c0, int64_t width,
                            accumulator_t<T>* a_row) {
  using Acc = accumulator_t<T>;
  if (p.row_offsets[i] == p.row_offsets[i + 1]) return;
  const int64_t padded = (width + kStep<Acc> - 1) / kStep<Acc> * kStep<Acc>;
  const T* source = p.a + i * p.a_stride + c0;
  if constexpr (std::is_same_v<T, Acc>) {
    if (padded == width) {
      row_panel<T>(p, i, source, width);  // already the right type and no padding needed
      return;
    }
  }
  for (int64_t c = 0; c < width; ++c) a_row[c] = to_acc(source[c]);
  for (int64_t c = width; c < padded; ++c) a_row[c] = Acc(0);
  row_panel<T>(p, i, a_row, padded);
}

template <typename T>
void row_generic(const Problem<T>& p, int64_t i, int64_t c0, int64_t width, accumulator_t<T>* a_row) {
  row<T>(p, i, c0, width, a_row);
}

template <typename T>
ROSA_TARGET_AVX2 void row_avx2(const Problem<T>& p, int64_t i, int64_t c0, int64_t width,
                               accumulator_t<T>* a_row) {
  row<T>(p, i, c0, width, a_row);
}

}  // namespace sddmm_detail

template <typename T>
void sddmm(const int32_t* row_offsets, const int32_t* row_indices, const int32_t* col_indices,
           const T* a, int64_t a_stride, const T* bt, int64_t bt_stride, T* out, int64_t m,
           int64_t n, int64_t k, int num_threads) {
  using namespace sddmm_detail;
  using Acc = accumulator_t<T>;
  const int64_t nnz = row_offsets[m];
  if (nnz == 0) return;
  const auto row_fn = cpu_has_avx2_fma() ? &row_avx2<T> : &row_generic<T>;
  const UsedRows used = used_rows(col_indices, nnz, n);
  const int64_t used_count = static_cast<int64_t>(used.rows.size());
  if constexpr (std::is_same_v<T, Acc>) {
    if (!worth_packing(nnz, used_count, false) && k % kStep<Acc> == 0) {
      // Few reads per row of `bt`: read whole rows in place, one panel.
      const Problem<T> p{row_offsets, col_indices, a, a_stride, bt, bt_stride, nullptr, out,
                         true, true};
      parallel_for(m, num_threads, 4, [&](int64_t r) {
        row_fn(p, row_indices[r], 0, k, workspace<Acc, 2>(static_cast<size_t>(k)));
      });
      return;
    }
  }
  // Wider panels than spmm's (1 MiB): every panel adds a horizontal sum and a read-modify-write
  // of each nonzero's running sum, which cost more than the extra L2 misses (measured).
  const int64_t panel =
      panel_width(used_count, std::max<int64_t>(k, 1), sizeof(Acc), kStep<Acc>, 1024 * 1024);
  // k == 0 still runs one (empty) panel, so every output is written (as 0).
  const int64_t panels = std::max<int64_t>(1, (k + panel - 1) / panel);
  // All panels are packed up front so the threads meet at one barrier, not two per panel.
  Acc* packed = workspace<Acc, 0>(static_cast<size_t>(panels * used_count * panel));
  Acc* sums = workspace<Acc, 1>(std::is_same_v<T, Acc> || panels == 1 ? 0 : static_cast<size_t>(nnz));
#ifdef ROSA_WITH_OPENMP
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && m > 1)
#endif
  {
#ifdef ROSA_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t u = 0; u < used_count; ++u) {
      const T* source = bt + static_cast<int64_t>(used.rows[u]) * bt_stride;
      for (int64_t t = 0; t < panels; ++t) {
        const int64_t c0 = t * panel, width = std::min(panel, k - c0);
        const int64_t padded = (width + kStep<Acc> - 1) / kStep<Acc> * kStep<Acc>;
        Acc* target = packed + (t * used_count + u) * panel;
        for (int64_t c = 0; c < width; ++c) target[c] = to_acc(source[c0 + c]);
        for (int64_t c = width; c < padded; ++c) target[c] = Acc(0);
      }
    }
    Acc* a_row = workspace<Acc, 2>(static_cast<size_t>(panel));
    // The same static schedule in every panel gives each row one owner, so the running sums
    // need no barrier between panels.
    for (int64_t t = 0; t < panels; ++t) {
      const int64_t c0 = t * panel, width = std::max<int64_t>(0, std::min(panel, k - c0));
      const Problem<T> p{row_offsets, used.renumbered.data(), a, a_stride,
                         packed + t * used_count * panel, panel, sums, out,
                         t == 0, t == panels - 1};
#ifdef ROSA_WITH_OPENMP
#pragma omp for schedule(static, 4) nowait
#endif
      for (int64_t r = 0; r < m; ++r) row_fn(p, row_indices[r], c0, width, a_row);
    }
  }
}

}  // namespace rosa::cpu
