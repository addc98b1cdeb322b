// A selected mask's structures from its flat indices, in one op: what RosaLinear keeps per mask.
//
//     mask_structure(flat_indices, m, n)
//       -> (row_offsets, row_indices, col_indices,                       the row-sorted CSR
//           row_offsets_t, row_indices_t, col_indices_t, permutation,    its transpose
//           flat_indices, column_counts)
//
// `flat_indices` are the distinct row-major positions i * n + j of the mask's nonzeros in any
// order (a top-k's indices), int32 or int64. The outputs are the CSR (row_offsets (m + 1,),
// row_indices (m,) = rosa_kernels.row_order(row_offsets), col_indices (nnz,)), the n x m
// transpose as csr_transpose(..., return_permutation=True) gives it (row_offsets_t (n + 1,),
// col_indices_t (nnz,), permutation (nnz,) with values_t = values[permutation]) with
// row_indices_t = row_order(row_offsets_t), all int32; the flat indices in ascending (CSR) order,
// int64; and the nonzeros per column (n,), int32.
//
// Mask selection builds these once per layer: as ~60 small torch calls from Python (each tens of
// microseconds of host time on a GPU machine) they were most of the collection step's time. Here
// they are ~17 ATen calls and one csr_transpose, on the indices' device, with every output size
// known from the shapes: nothing synchronizes with the host. One implementation for every device
// (CompositeExplicitAutograd; no gradients: every output is an index).
//
// Contents: on the CPU the flat indices are checked (in [0, m * n), distinct: one pass over the
// sorted copy; ValueError otherwise). On a GPU that would cost a synchronization, so they are the
// caller's promise (python/rosa_kernels/masks.py: mask_structure(validate=True) checks them with
// one); out-of-range ones are clamped into range, so that no kernel indexes out of bounds.
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace rosa {
namespace {

using Structure = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_csr_transpose(
    const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices, int64_t m,
    int64_t n) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rosa_kernels::csr_transpose", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(values, row_offsets, col_indices, m, n);
}

// rosa_kernels.row_order: rows by nonincreasing count, ties in ascending row order (a stable sort
// gives exactly one answer, whatever the counts' integer type), as int32.
at::Tensor row_order_of(const at::Tensor& row_offsets) {
  const int64_t rows = row_offsets.size(0) - 1;
  const auto counts = row_offsets.narrow(0, 1, rows) - row_offsets.narrow(0, 0, rows);
  return at::argsort(counts, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
}

// Sorted flat indices on the CPU: each in [0, size) and none repeated.
void check_sorted_positions(const at::Tensor& sorted, int64_t size) {
  const int64_t nnz = sorted.size(0);
  if (nnz == 0) return;
  const int64_t* p = sorted.const_data_ptr<int64_t>();
  ROSA_CHECK_VALUE(p[0] >= 0, "flat_indices must lie in [0, m * n = ", size, "), got ", p[0]);
  ROSA_CHECK_VALUE(p[nnz - 1] < size, "flat_indices must lie in [0, m * n = ", size, "), got ", p[nnz - 1]);
  for (int64_t q = 1; q < nnz; ++q) {
    ROSA_CHECK_VALUE(p[q] != p[q - 1], "flat_indices must be distinct, got ", p[q], " twice");
  }
}

Structure mask_structure(const at::Tensor& flat_indices, int64_t m, int64_t n) {
  check_defined(flat_indices, "flat_indices");
  const auto dtype = flat_indices.scalar_type();
  ROSA_CHECK_TYPE(dtype == at::kLong || dtype == at::kInt, "flat_indices must be an int64 or int32 tensor, got ",
                  dtype_name(dtype));
  ROSA_CHECK_VALUE(flat_indices.dim() == 1, "flat_indices must be 1-D, got shape ", shape_of(flat_indices));
  check_size(m, "m");
  check_size(n, "n");
  const int64_t nnz = flat_indices.size(0);
  const int64_t size = m * n;  // < 2^62
  ROSA_CHECK_VALUE(nnz <= size, "flat_indices must hold at most m * n = ", size,
                   " distinct positions, got ", nnz);
  ROSA_CHECK_VALUE(nnz < kInt32Max, "flat_indices must hold fewer than 2^31 - 1 positions, got ", nnz);

  // Row-major order is CSR order: the sorted positions are the nonzeros in CSR order.
  auto sorted = std::get<0>(at::sort(flat_indices.to(at::kLong)));
  if (sorted.is_cpu()) {
    check_sorted_positions(sorted, size);
  } else if (nnz > 0) {
    sorted.clamp_(0, size - 1);
  }
  const auto long_options = sorted.options();
  // row_offsets[i] = the nonzeros before row i = the positions below i * n (a binary search each).
  const auto row_starts = n > 0 ? at::arange(0, (m + 1) * n, n, long_options) : at::zeros({m + 1}, long_options);
  const auto row_offsets = at::searchsorted(sorted, row_starts, /*out_int32=*/true);
  auto col_indices = at::empty({nnz}, long_options.dtype(at::kInt));
  if (n > 0) at::remainder_out(col_indices, sorted, n);
  // The transpose's structure and permutation are csr_transpose's (one implementation of it per
  // device); its values are not used, so they are left uninitialized.
  const auto placeholder = at::empty({nnz}, long_options.dtype(at::kFloat));
  auto [unused_values, row_offsets_t, col_indices_t, permutation] =
      call_csr_transpose(placeholder, row_offsets, col_indices, m, n);
  const auto column_counts = row_offsets_t.narrow(0, 1, n) - row_offsets_t.narrow(0, 0, n);
  const auto row_indices_t = at::argsort(column_counts, /*stable=*/true, /*dim=*/0, /*descending=*/true)
                                 .to(at::kInt);
  return {row_offsets, row_order_of(row_offsets), col_indices, row_offsets_t, row_indices_t, col_indices_t,
          permutation, sorted, column_counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosa_kernels, m) {
  m.def("mask_structure(Tensor flat_indices, int m, int n) -> (Tensor row_offsets, Tensor row_indices, "
        "Tensor col_indices, Tensor row_offsets_t, Tensor row_indices_t, Tensor col_indices_t, Tensor permutation, "
        "Tensor flat_indices, Tensor column_counts)");
}

TORCH_LIBRARY_IMPL(rosa_kernels, CompositeExplicitAutograd, m) { m.impl("mask_structure", &mask_structure); }

}  // namespace rosa
