// Shape, dtype and device checks shared by the CPU and CUDA registrations. They never read tensor
// contents (that would synchronize a GPU); the Python boundary validates index contents.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace rosa {

inline void check_index(const at::Tensor& t, const char* name, int64_t length) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
  TORCH_CHECK(length < 0 || t.size(0) == length, name, " must have length ", length, ", got ",
              t.size(0));
}

inline void check_value_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == reference.device(), name, " must be on ", reference.device(),
              ", got ", t.device());
}

// Checks the CSR structure of an m-row matrix whose nonzeros are `nnz`. row_indices may be
// undefined where the op does not take it.
inline void check_csr(const at::Tensor& device_reference, const at::Tensor& row_offsets,
                      const at::Tensor& row_indices, const at::Tensor& col_indices, int64_t m,
                      int64_t nnz) {
  TORCH_CHECK(m >= 0, "m must be >= 0, got ", m);
  TORCH_CHECK(m < (int64_t(1) << 31) - 1, "m must be below 2^31 - 1, got ", m);
  check_index(row_offsets, "row_offsets", m + 1);
  check_index(col_indices, "col_indices", nnz);
  check_same_device(device_reference, row_offsets, "row_offsets");
  check_same_device(device_reference, col_indices, "col_indices");
  if (row_indices.defined()) {
    check_index(row_indices, "row_indices", m);
    check_same_device(device_reference, row_indices, "row_indices");
  }
}

inline void check_values(const at::Tensor& values) {
  check_value_dtype(values, "values");
  TORCH_CHECK(values.dim() == 1, "values must be 1-D, got ", values.dim(), " dimensions");
}

inline void check_dense(const at::Tensor& reference, const at::Tensor& dense, const char* name,
                        int64_t rows) {
  check_value_dtype(dense, name);
  TORCH_CHECK(dense.dim() == 2, name, " must be 2-D, got ", dense.dim(), " dimensions");
  TORCH_CHECK(rows < 0 || dense.size(0) == rows, name, " must have ", rows, " rows, got ",
              dense.size(0));
  TORCH_CHECK(dense.scalar_type() == reference.scalar_type(), name, " must have dtype ",
              reference.scalar_type(), ", got ", dense.scalar_type());
  check_same_device(reference, dense, name);
}

// Dense operands are read row by row with a row stride: make the rows contiguous.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.stride(1) == 1 || t.size(1) <= 1) return t;
  return t.contiguous();
}

}  // namespace rosa
