// CSR add on the CPU: out (m x n, dense, contiguous) += A (CSR), in place. The caller copies
// `dense` into `out` first for the out-of-place op. Each row is owned by one thread; the sum is
// taken in the accumulator type and rounded once. Assumes validated CSR.
#pragma once

#include "cpu/common.h"

namespace rosa::cpu {

template <typename T>
void csr_add(const T* values, const int32_t* row_offsets, const int32_t* col_indices, T* out,
             int64_t out_stride, int64_t m, int num_threads) {
  parallel_for(m, num_threads, 64, [&](int64_t row) {
    T* out_row = out + row * out_stride;
    for (int64_t p = row_offsets[row]; p < row_offsets[row + 1]; ++p) {
      T& target = out_row[col_indices[p]];
      target = static_cast<T>(to_acc(target) + to_acc(values[p]));
    }
  });
}

}  // namespace rosa::cpu
