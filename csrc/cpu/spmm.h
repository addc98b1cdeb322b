// SpMM on the CPU: out (m x k) = A (m x n, CSR) @ dense (n x k).
//
// Rows are visited in `row_indices` order (heaviest first), each row by one thread: the row's
// nonzeros scale rows of `dense` into a float accumulator of length k, written once at the end.
// Assumes validated CSR (offsets nondecreasing, columns in [0, n)), `dense` rows contiguous with
// row stride `dense_stride`, `out` contiguous.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/common.h"

namespace rosa::cpu {

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_stride, T* out, int64_t m,
          int64_t k, int num_threads) {
  using Acc = accumulator_t<T>;
  if (m == 0 || k == 0) return;
  // Column blocks keep the accumulator in L1 when k is large.
  constexpr int64_t kBlock = 512;
  parallel_for(m, num_threads, 4, [&](int64_t r) {
    const int64_t row = row_indices[r];
    const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
    T* out_row = out + row * k;
    Acc acc[kBlock];
    for (int64_t c0 = 0; c0 < k; c0 += kBlock) {
      const int64_t width = std::min(kBlock, k - c0);
      std::fill(acc, acc + width, Acc(0));
      for (int64_t p = begin; p < end; ++p) {
        const Acc v = to_acc(values[p]);
        const T* dense_row = dense + static_cast<int64_t>(col_indices[p]) * dense_stride + c0;
        for (int64_t c = 0; c < width; ++c) acc[c] += v * to_acc(dense_row[c]);
      }
      for (int64_t c = 0; c < width; ++c) out_row[c0 + c] = static_cast<T>(acc[c]);
    }
  });
}

}  // namespace rosa::cpu
