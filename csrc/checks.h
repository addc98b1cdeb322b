// Shape, dtype and device checks shared by the CPU and CUDA registrations. They never read tensor
// contents (that would synchronize a GPU); the Python boundary validates index contents.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace rosa {

// ROSA_CHECK(cond, parts...) is TORCH_CHECK with the message built here, without std::ostream:
// torch's c10::str formats numbers through an ostream, and in a CUDA build of this extension on the
// GPU machine (g++ 13, torch 2.11) that formatting crashed the process (a segfault inside
// basic_ostream::_M_insert<long>, whose weak copy this library carries) instead of raising. A
// single std::string reaches TORCH_CHECK untouched, so the message is assembled with to_string.
namespace detail {
inline void append(std::string& out, const char* part) { out += part; }
inline void append(std::string& out, const std::string& part) { out += part; }
inline void append(std::string& out, c10::ScalarType part) { out += c10::toString(part); }
inline void append(std::string& out, const c10::Device& part) { out += part.str(); }
template <typename Integer, std::enable_if_t<std::is_integral_v<Integer>, int> = 0>
inline void append(std::string& out, Integer part) { out += std::to_string(part); }
inline void append(std::string& out, c10::IntArrayRef part) {
  out += "[";
  for (size_t i = 0; i < part.size(); ++i) out += (i ? ", " : "") + std::to_string(part[i]);
  out += "]";
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}
}  // namespace detail

#define ROSA_CHECK(cond, ...) TORCH_CHECK(cond, ::rosa::detail::message(__VA_ARGS__))

inline void check_index(const at::Tensor& t, const char* name, int64_t length) {
  ROSA_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  ROSA_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
  ROSA_CHECK(length < 0 || t.size(0) == length, name, " must have length ", length, ", got ",
              t.size(0));
}

inline void check_value_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  ROSA_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* name) {
  ROSA_CHECK(t.device() == reference.device(), name, " must be on ", reference.device(),
              ", got ", t.device());
}

// Checks the CSR structure of an m-row matrix whose nonzeros are `nnz`. row_indices may be
// undefined where the op does not take it.
inline void check_csr(const at::Tensor& device_reference, const at::Tensor& row_offsets,
                      const at::Tensor& row_indices, const at::Tensor& col_indices, int64_t m,
                      int64_t nnz) {
  ROSA_CHECK(m >= 0, "m must be >= 0, got ", m);
  ROSA_CHECK(m < (int64_t(1) << 31) - 1, "m must be below 2^31 - 1, got ", m);
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
  ROSA_CHECK(values.dim() == 1, "values must be 1-D, got ", values.dim(), " dimensions");
}

inline void check_dense(const at::Tensor& reference, const at::Tensor& dense, const char* name,
                        int64_t rows) {
  check_value_dtype(dense, name);
  ROSA_CHECK(dense.dim() == 2, name, " must be 2-D, got ", dense.dim(), " dimensions");
  ROSA_CHECK(rows < 0 || dense.size(0) == rows, name, " must have ", rows, " rows, got ",
              dense.size(0));
  ROSA_CHECK(dense.scalar_type() == reference.scalar_type(), name, " must have dtype ",
              reference.scalar_type(), ", got ", dense.scalar_type());
  check_same_device(reference, dense, name);
}

// Dense operands are read row by row with a row stride: make the rows contiguous.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.stride(1) == 1 || t.size(1) <= 1) return t;
  return t.contiguous();
}

}  // namespace rosa
