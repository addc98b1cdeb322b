// CSR transpose on the CPU in O(nnz + m + n): count the nonzeros of each column, prefix-sum the
// counts into the new row offsets, then scatter the nonzeros row by row. Visiting the old rows in
// ascending order makes the new column indices ascend inside every new row, and the result is
// deterministic. `permutation[q]` is the old position of the value now at position q, so
// values_t = values[permutation]. Sequential: the scatter is bound by memory, not arithmetic.
#pragma once

#include <vector>

#include "cpu/common.h"

namespace rosa::cpu {

template <typename T>
void csr_transpose(const T* values, const int32_t* row_offsets, const int32_t* col_indices,
                   int64_t m, int64_t n, T* values_t, int32_t* row_offsets_t,
                   int32_t* col_indices_t, int32_t* permutation) {
  const int64_t nnz = row_offsets[m];
  std::vector<int64_t> cursor(n + 1, 0);
  for (int64_t p = 0; p < nnz; ++p) ++cursor[col_indices[p] + 1];
  for (int64_t j = 0; j < n; ++j) cursor[j + 1] += cursor[j];
  for (int64_t j = 0; j <= n; ++j) row_offsets_t[j] = static_cast<int32_t>(cursor[j]);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = row_offsets[i]; p < row_offsets[i + 1]; ++p) {
      const int64_t q = cursor[col_indices[p]]++;
      col_indices_t[q] = static_cast<int32_t>(i);
      values_t[q] = values[p];
      permutation[q] = static_cast<int32_t>(p);
    }
  }
}

}  // namespace rosa::cpu
