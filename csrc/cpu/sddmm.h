// SDDMM on the CPU: out[p] = <a[i, :], bt[j, :]> for every nonzero p = (i, j) of the CSR mask.
//
// One thread per row (rows in `row_indices` order, heaviest first). The row of `a` is converted to
// the accumulator type once and reused for all nonzeros of the row; each nonzero is then one dot
// product with a row of `bt`. Assumes validated CSR and rows of `a`/`bt` contiguous with the given
// row strides.
#pragma once

#include <vector>

#include "cpu/common.h"

namespace rosa::cpu {

template <typename T>
void sddmm(const int32_t* row_offsets, const int32_t* row_indices, const int32_t* col_indices,
           const T* a, int64_t a_stride, const T* bt, int64_t bt_stride, T* out, int64_t m,
           int64_t k, int num_threads) {
  using Acc = accumulator_t<T>;
  if (m == 0) return;
  parallel_for(m, num_threads, 4, [&](int64_t r) {
    const int64_t row = row_indices[r];
    const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
    if (begin == end) return;
    thread_local std::vector<Acc> a_row;
    a_row.resize(k);
    const T* a_src = a + row * a_stride;
    for (int64_t c = 0; c < k; ++c) a_row[c] = to_acc(a_src[c]);
    for (int64_t p = begin; p < end; ++p) {
      const T* bt_row = bt + static_cast<int64_t>(col_indices[p]) * bt_stride;
      // Four partial sums break the dependency chain so the loop vectorizes.
      Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t c = 0;
      for (; c + 4 <= k; c += 4) {
        s0 += a_row[c] * to_acc(bt_row[c]);
        s1 += a_row[c + 1] * to_acc(bt_row[c + 1]);
        s2 += a_row[c + 2] * to_acc(bt_row[c + 2]);
        s3 += a_row[c + 3] * to_acc(bt_row[c + 3]);
      }
      for (; c < k; ++c) s0 += a_row[c] * to_acc(bt_row[c]);
      out[p] = static_cast<T>((s0 + s1) + (s2 + s3));
    }
  });
}

}  // namespace rosa::cpu
