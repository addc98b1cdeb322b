// Shape, dtype and device checks shared by the CPU and CUDA registrations: the argument checks of
// the public ops live here, so a Python call with validate=False costs little more than the raw op.
// They never read tensor contents (that would synchronize a GPU); the Python boundary validates
// index contents when asked (validate=True).
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

// Dispatches on the four value dtypes; `scalar_t` is the c10 type inside the body.
#define ROSA_DISPATCH_VALUES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)
// The same, raising Python's ValueError / TypeError: bad arguments of the ops are reported as the
// public Python functions promise (shapes, lengths, devices, sizes: ValueError; dtypes and
// missing tensors: TypeError), with the argument's name, what was expected and what came.
#define ROSA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::rosa::detail::message(__VA_ARGS__))
#define ROSA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::rosa::detail::message(__VA_ARGS__))

constexpr int64_t kInt32Max = (int64_t(1) << 31) - 1;

// The names Python prints, so a message reads the same whichever layer raised it.
inline std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// A shape as a Python tuple: (5, 3), (6,), ().
inline std::string shape_of(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + (t.dim() == 1 ? ",)" : ")");
}

// A schema `Tensor` argument accepts None as an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name) {
  ROSA_CHECK_TYPE(t.defined(), name, " must be a torch.Tensor, got None");
}

inline void check_size(int64_t size, const char* name) {
  ROSA_CHECK_VALUE(size >= 0, name, " must be >= 0, got ", size);
  ROSA_CHECK_VALUE(size < kInt32Max, name, " must be below 2^31 - 1, got ", size);
}

// A floating tensor of `dim` dimensions (values, dense operands).
inline void check_floating(const at::Tensor& t, const char* name, int64_t dim) {
  check_defined(t, name);
  const auto dtype = t.scalar_type();
  ROSA_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                      dtype == at::kBFloat16,
                  name, " must have a floating dtype (float32, float64, float16 or bfloat16), got ",
                  dtype_name(dtype));
  ROSA_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", shape_of(t));
}

inline void check_same_dtype(const at::Tensor& reference, const char* reference_name,
                             const at::Tensor& t, const char* name) {
  ROSA_CHECK_TYPE(t.scalar_type() == reference.scalar_type(), name, " must have the dtype of ",
                  reference_name, " (", dtype_name(reference.scalar_type()), "), got ",
                  dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& reference, const char* reference_name,
                              const at::Tensor& t, const char* name) {
  ROSA_CHECK_VALUE(t.device() == reference.device(), name, " must be on the same device as ",
                   reference_name, " (", reference.device(), "), got ", t.device());
}

// An index tensor: 1-D, int16/int32/int64, on the reference's device, of `length` entries unless
// length < 0 (`length_name` says where the length comes from: "m + 1"). Returned as contiguous
// int32; int64 entries that do not fit wrap, which makes them invalid contents (undefined
// behaviour unless validated: the Python boundary checks the range with validate=True).
inline at::Tensor index_tensor(const at::Tensor& t, const char* name, int64_t length,
                               const char* length_name, const at::Tensor& reference,
                               const char* reference_name) {
  check_defined(t, name);
  const auto dtype = t.scalar_type();
  ROSA_CHECK_TYPE(dtype == at::kInt || dtype == at::kLong || dtype == at::kShort, name,
                  " must be an integer tensor (int32; int16/int64 are converted), got ",
                  dtype_name(dtype));
  ROSA_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", shape_of(t));
  ROSA_CHECK_VALUE(length < 0 || t.size(0) == length, name, " must have length ", length_name,
                   " = ", length, ", got ", t.size(0));
  check_same_device(reference, reference_name, t, name);
  return dtype == at::kInt ? t.contiguous() : t.to(at::kInt).contiguous();
}

// The int32 index tensors an op's kernel reads (row_indices undefined where the op has none).
struct Csr {
  at::Tensor row_offsets, row_indices, col_indices;
};

// The argument checks of each op, shared by the CPU and CUDA implementations. Length names say
// where an expected length comes from, as the Python functions name their arguments.
inline Csr check_spmm(const at::Tensor& values, const at::Tensor& row_offsets,
                      const at::Tensor& row_indices, const at::Tensor& col_indices,
                      const at::Tensor& dense, int64_t m) {
  check_floating(values, "values", 1);
  check_floating(dense, "dense", 2);
  check_size(m, "m");
  check_same_dtype(values, "values", dense, "dense");
  check_same_device(values, "values", dense, "dense");
  ROSA_CHECK_VALUE(dense.size(0) < kInt32Max && dense.size(1) < kInt32Max,
                   "dense dimensions must be below 2^31 - 1, got shape ", shape_of(dense));
  return {index_tensor(row_offsets, "row_offsets", m + 1, "m + 1", values, "values"),
          index_tensor(row_indices, "row_indices", m, "m", values, "values"),
          index_tensor(col_indices, "col_indices", values.size(0), "values.shape[0]", values,
                       "values")};
}

inline Csr check_sddmm(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                       const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  check_floating(a, "a", 2);
  check_floating(bt, "bt", 2);
  check_same_dtype(a, "a", bt, "bt");
  check_same_device(a, "a", bt, "bt");
  ROSA_CHECK_VALUE(bt.size(1) == a.size(1), "bt must have a.shape[1] = ", a.size(1),
                   " columns, got shape ", shape_of(bt));
  ROSA_CHECK_VALUE(a.size(0) < kInt32Max && bt.size(0) < kInt32Max && a.size(1) < kInt32Max,
                   "a and bt dimensions must be below 2^31 - 1, got shapes ", shape_of(a), " and ",
                   shape_of(bt));
  return {index_tensor(row_offsets, "row_offsets", a.size(0) + 1, "a.shape[0] + 1", a, "a"),
          index_tensor(row_indices, "row_indices", a.size(0), "a.shape[0]", a, "a"),
          index_tensor(col_indices, "col_indices", -1, "", a, "a")};
}

inline Csr check_csr_transpose(const at::Tensor& values, const at::Tensor& row_offsets,
                               const at::Tensor& col_indices, int64_t m, int64_t n) {
  check_floating(values, "values", 1);
  check_size(m, "m");
  check_size(n, "n");
  return {index_tensor(row_offsets, "row_offsets", m + 1, "m + 1", values, "values"),
          at::Tensor(),
          index_tensor(col_indices, "col_indices", values.size(0), "values.shape[0]", values,
                       "values")};
}

inline Csr check_csr_add(const at::Tensor& values, const at::Tensor& row_offsets,
                         const at::Tensor& row_indices, const at::Tensor& col_indices,
                         const at::Tensor& dense) {
  check_floating(values, "values", 1);
  check_floating(dense, "dense", 2);
  check_same_dtype(values, "values", dense, "dense");
  check_same_device(values, "values", dense, "dense");
  const int64_t m = dense.size(0);
  ROSA_CHECK_VALUE(m < kInt32Max && dense.size(1) < kInt32Max,
                   "dense dimensions must be below 2^31 - 1, got shape ", shape_of(dense));
  return {index_tensor(row_offsets, "row_offsets", m + 1, "dense.shape[0] + 1", values, "values"),
          index_tensor(row_indices, "row_indices", m, "dense.shape[0]", values, "values"),
          index_tensor(col_indices, "col_indices", values.size(0), "values.shape[0]", values,
                       "values")};
}

// csr_add_ writes into `dense` itself, so its rows must already be contiguous.
inline Csr check_csr_add_inplace(const at::Tensor& values, const at::Tensor& row_offsets,
                                 const at::Tensor& row_indices, const at::Tensor& col_indices,
                                 const at::Tensor& dense) {
  Csr csr = check_csr_add(values, row_offsets, row_indices, col_indices, dense);
  ROSA_CHECK_VALUE(dense.stride(1) == 1 || dense.size(1) <= 1,
                   "dense must have contiguous rows for an in-place csr_add, got strides (",
                   dense.stride(0), ", ", dense.stride(1), ")");
  return csr;
}

// Dense operands are read row by row with a row stride: make the rows contiguous.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.stride(1) == 1 || t.size(1) <= 1) return t;
  return t.contiguous();
}

}  // namespace rosa
