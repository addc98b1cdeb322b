// A cheap guard against CSR structures that would make a CPU kernel read or write out of bounds.
//
// The Python boundary validates index contents (validate=True); torch.ops.rosa_kernels.* called
// directly skip that. On the CPU reading the indices costs no synchronization and one O(m + nnz)
// pass, small next to the O(nnz * k) work of spmm/sddmm and the O(m * n) copy of csr_add, so the
// CPU ops check just what memory safety needs: offsets start at 0, never decrease and end at nnz,
// every column lies in [0, n) and every row index in [0, m). Sortedness and row_indices being a
// permutation are not needed for safety and stay the caller's promise.
#pragma once

#include <cstdint>
#include <string>

namespace rosa::cpu {

// Returns "" for a structure that is safe to index, else a message naming the bad argument.
// row_indices may be null (ops that do not take it); n < 0 skips the column check.
inline std::string unsafe_structure(const int32_t* row_offsets, const int32_t* row_indices,
                                    const int32_t* col_indices, int64_t m, int64_t n,
                                    int64_t nnz) {
  if (row_offsets[0] != 0) {
    return "row_offsets[0] must be 0, got " + std::to_string(row_offsets[0]);
  }
  for (int64_t i = 0; i < m; ++i) {
    if (row_offsets[i + 1] < row_offsets[i]) {
      return "row_offsets must be nondecreasing, but row_offsets[" + std::to_string(i + 1) +
             "] = " + std::to_string(row_offsets[i + 1]) + " < row_offsets[" +
             std::to_string(i) + "] = " + std::to_string(row_offsets[i]);
    }
  }
  if (row_offsets[m] != nnz) {
    return "row_offsets[-1] must equal nnz = " + std::to_string(nnz) + ", got " +
           std::to_string(row_offsets[m]);
  }
  if (n >= 0) {
    for (int64_t p = 0; p < nnz; ++p) {
      // One unsigned comparison tests both ends of [0, n).
      if (static_cast<uint64_t>(static_cast<int64_t>(col_indices[p])) >=
          static_cast<uint64_t>(n)) {
        return "col_indices must lie in [0, n = " + std::to_string(n) + "), got col_indices[" +
               std::to_string(p) + "] = " + std::to_string(col_indices[p]);
      }
    }
  }
  if (row_indices != nullptr) {
    for (int64_t r = 0; r < m; ++r) {
      if (static_cast<uint64_t>(static_cast<int64_t>(row_indices[r])) >=
          static_cast<uint64_t>(m)) {
        return "row_indices must lie in [0, m = " + std::to_string(m) + "), got row_indices[" +
               std::to_string(r) + "] = " + std::to_string(row_indices[r]);
      }
    }
  }
  return "";
}

}  // namespace rosa::cpu
