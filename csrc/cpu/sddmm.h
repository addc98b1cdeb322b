// SDDMM on the CPU: out[p] = <a[i, :], bt[j, :]> for every nonzero p = (i, j) of the CSR mask.
//
// Work split: rows of the mask go to OpenMP threads dynamically, in `row_indices` order
// (heaviest first). A row's dot products are computed four nonzeros at a time (then two, then
// one), so each loaded vector of a's row feeds four fused multiply-adds into independent
// accumulator chains. float/double operands whose k is a whole number of steps are read in
// place; otherwise the rows of `bt` some nonzero uses are converted to float once per call and
// zero-padded to whole steps (per-thread workspace), and each row of `a` is converted when its
// thread reaches it. The inner loops are compiled twice (generic SSE2 and AVX2+FMA) and the CPU
// picks. Assumes validated CSR and rows of `a`/`bt` contiguous with the given row strides.
// Measurements and the designs that lost (L2 panels, packing float rows): docs/benchmarks.md; the history in git at c550a82.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/common.h"

namespace rosa::cpu {
namespace sddmm_detail {

template <typename T>
struct Problem {
  using Acc = accumulator_t<T>;
  const int32_t* row_offsets;
  const int32_t* cols;  // rows of `bt` read by each nonzero
  const T* a;
  int64_t a_stride;
  const Acc* bt;        // float/double rows of width `width`, row stride bt_stride
  int64_t bt_stride;
  int64_t k;            // the true inner size
  int64_t width;        // k rounded up to whole steps (zero-padded when it differs)
  T* out;
};

// Two vectors per step of a dot product (16 floats / 8 doubles).
template <typename Acc>
constexpr int64_t kStep = 2 * Vec<Acc>::lanes;

template <typename Acc>
ROSA_ALWAYS_INLINE Acc horizontal_sum(const typename Vec<Acc>::type& x) {
  Acc sum = 0;
  for (int64_t l = 0; l < Vec<Acc>::lanes; ++l) sum += x[l];
  return sum;
}

// The dot products of one mask row with a's row `a_row` (float/double, p.width long).
template <typename T>
ROSA_ALWAYS_INLINE void dots(const Problem<T>& p, int64_t row, const accumulator_t<T>* a_row) {
  using Acc = accumulator_t<T>;
  using V = typename Vec<Acc>::type;
  constexpr int64_t L = Vec<Acc>::lanes;
  const int64_t begin = p.row_offsets[row], end = p.row_offsets[row + 1], width = p.width;
  auto bt_row = [&](int64_t q) { return p.bt + static_cast<int64_t>(p.cols[q]) * p.bt_stride; };
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
    p.out[q] = static_cast<T>(horizontal_sum<Acc>(s0 + t0));
    p.out[q + 1] = static_cast<T>(horizontal_sum<Acc>(s1 + t1));
    p.out[q + 2] = static_cast<T>(horizontal_sum<Acc>(s2 + t2));
    p.out[q + 3] = static_cast<T>(horizontal_sum<Acc>(s3 + t3));
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
    p.out[q] = static_cast<T>(horizontal_sum<Acc>(s0 + t0));
    p.out[q + 1] = static_cast<T>(horizontal_sum<Acc>(s1 + t1));
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
    p.out[q] = static_cast<T>(horizontal_sum<Acc>((s0 + s1) + (s2 + s3)));
  }
}

// One mask row: a's row in place when it already is float/double of whole steps, else
// converted and zero-padded into the thread's workspace.
template <typename T>
ROSA_ALWAYS_INLINE void row(const Problem<T>& p, int64_t i) {
  using Acc = accumulator_t<T>;
  if (p.row_offsets[i] == p.row_offsets[i + 1]) return;
  const T* source = p.a + i * p.a_stride;
  if constexpr (std::is_same_v<T, Acc>) {
    if (p.width == p.k) {
      dots<T>(p, i, source);
      return;
    }
  }
  const Workspace<Acc, 1> workspace(static_cast<size_t>(p.width));
  Acc* a_row = workspace.data();
  for (int64_t c = 0; c < p.k; ++c) a_row[c] = to_acc(source[c]);
  for (int64_t c = p.k; c < p.width; ++c) a_row[c] = Acc(0);
  dots<T>(p, i, a_row);
}

template <typename T>
void row_generic(const Problem<T>& p, int64_t i) {
  row<T>(p, i);
}

template <typename T>
ROSA_TARGET_AVX2 void row_avx2(const Problem<T>& p, int64_t i) {
  row<T>(p, i);
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
  num_threads = threads_for(nnz * k, num_threads);
  const int64_t width = (k + kStep<Acc> - 1) / kStep<Acc> * kStep<Acc>;
  Problem<T> p{row_offsets, col_indices, a, a_stride, nullptr, bt_stride, k, width, out};
  auto run = [&] { parallel_for(m, num_threads, 4, [&](int64_t r) { row_fn(p, row_indices[r]); }); };
  if constexpr (std::is_same_v<T, Acc>) {
    if (width == k) {
      p.bt = bt;
      run();
      return;
    }
  }
  const UsedRows used = used_rows(col_indices, nnz, n);
  const int64_t used_count = static_cast<int64_t>(used.rows.size());
  const Workspace<Acc, 0> workspace(static_cast<size_t>(used_count * width));
  Acc* converted = workspace.data();
  parallel_for(used_count, num_threads, 16, [&](int64_t u) {
    const T* source = bt + static_cast<int64_t>(used.rows[u]) * bt_stride;
    Acc* target = converted + u * width;
    for (int64_t c = 0; c < k; ++c) target[c] = to_acc(source[c]);
    for (int64_t c = k; c < width; ++c) target[c] = Acc(0);
  });
  p.cols = used.renumbered.data();
  p.bt = converted;
  p.bt_stride = width;
  run();
}

}  // namespace rosa::cpu
