// The operator schemas of rosa_kernels and their CPU implementations.
//
// Each op is declared once here (namespace `rosa_kernels`); ops_cuda.cpp registers the CUDA
// implementations of the same schemas, and python/rosa_kernels/ops.py registers fake kernels and
// autograd. This layer checks shapes/dtypes/devices, dispatches on dtype and calls the torch-free
// kernels in cpu/.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/csr_add.h"
#include "cpu/csr_transpose.h"
#include "cpu/gather_rows.h"
#include "cpu/sddmm.h"
#include "cpu/spmm.h"
#include "cpu/structure.h"

namespace rosa {
namespace {

// Dispatches on the four value dtypes; `scalar_t` is the c10 type inside `body`.
#define ROSA_DISPATCH_VALUES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

int threads() { return at::get_num_threads(); }

// Index contents are the Python boundary's job, but a direct torch.ops call must not crash the
// process: on the CPU the memory-safety part of the check is one cheap pass (cpu/structure.h),
// raising ValueError like the Python check of the contents.
// Takes the contiguous int32 index tensors the kernel will read; row_indices may be undefined.
void check_structure_is_safe(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                             const at::Tensor& col_indices, int64_t m, int64_t n) {
  const std::string problem = cpu::unsafe_structure(
      row_offsets.data_ptr<int32_t>(),
      row_indices.defined() ? row_indices.data_ptr<int32_t>() : nullptr,
      col_indices.data_ptr<int32_t>(), m, n, col_indices.size(0));
  ROSA_CHECK_VALUE(problem.empty(), problem);
}

// Which rows of `a` the SDDMM reads (rows with nonzeros), and which rows of `bt` (the columns
// that occur in the mask), as byte masks.
std::vector<uint8_t> row_mask_of_rows(const at::Tensor& row_offsets, int64_t m) {
  const int32_t* offsets = row_offsets.data_ptr<int32_t>();
  std::vector<uint8_t> used(m);
  for (int64_t i = 0; i < m; ++i) used[i] = offsets[i + 1] > offsets[i];
  return used;
}

std::vector<uint8_t> row_mask_of_columns(const at::Tensor& col_indices, int64_t n) {
  const int32_t* cols = col_indices.data_ptr<int32_t>();
  std::vector<uint8_t> used(n, 0);
  for (int64_t p = 0; p < col_indices.size(0); ++p) used[cols[p]] = 1;
  return used;
}

// `t` itself when its rows are contiguous; else a row-contiguous buffer holding only the rows the
// kernel reads (cpu/gather_rows.h), the others left unwritten -- or, when most rows are read
// anyway, torch's whole copy, which was as fast as the tiled gather on the rows it copies.
at::Tensor used_rows_contiguous(const at::Tensor& t, const std::vector<uint8_t>& used) {
  if (t.stride(1) == 1 || t.size(1) <= 1) return t;
  const int64_t used_count = std::count(used.begin(), used.end(), uint8_t(1));
  if (2 * used_count > t.size(0)) return t.contiguous();
  auto rows = at::empty({t.size(0), t.size(1)}, t.options());
  ROSA_DISPATCH_VALUES(t.scalar_type(), "rosa_kernels::gather_rows", [&] {
    cpu::gather_rows<scalar_t>(t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), used.data(),
                               t.size(0), t.size(1), rows.data_ptr<scalar_t>(), threads());
  });
  return rows;
}

at::Tensor spmm_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                    const at::Tensor& row_indices, const at::Tensor& col_indices,
                    const at::Tensor& dense, int64_t m) {
  const Csr csr = check_spmm(values, row_offsets, row_indices, col_indices, dense, m);
  check_structure_is_safe(csr.row_offsets, csr.row_indices, csr.col_indices, m, dense.size(0));
  const auto dense_rows = rows_contiguous(dense);
  const auto vals = values.contiguous();
  auto out = at::empty({m, dense.size(1)}, dense.options());
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::spmm", [&] {
    cpu::spmm<scalar_t>(vals.data_ptr<scalar_t>(), csr.row_offsets.data_ptr<int32_t>(),
                        csr.row_indices.data_ptr<int32_t>(), csr.col_indices.data_ptr<int32_t>(),
                        dense_rows.data_ptr<scalar_t>(), dense_rows.stride(0),
                        out.data_ptr<scalar_t>(), m, dense.size(0), dense.size(1), threads());
  });
  return out;
}

at::Tensor sddmm_cpu(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                     const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  const Csr csr = check_sddmm(row_offsets, row_indices, col_indices, a, bt);
  const int64_t m = a.size(0);
  check_structure_is_safe(csr.row_offsets, csr.row_indices, csr.col_indices, m, bt.size(0));
  const auto a_rows = used_rows_contiguous(a, row_mask_of_rows(csr.row_offsets, m));
  const auto bt_rows = used_rows_contiguous(bt, row_mask_of_columns(csr.col_indices, bt.size(0)));
  auto out = at::empty({csr.col_indices.size(0)}, a.options());
  ROSA_DISPATCH_VALUES(a.scalar_type(), "rosa_kernels::sddmm", [&] {
    cpu::sddmm<scalar_t>(csr.row_offsets.data_ptr<int32_t>(), csr.row_indices.data_ptr<int32_t>(),
                         csr.col_indices.data_ptr<int32_t>(), a_rows.data_ptr<scalar_t>(),
                         a_rows.stride(0), bt_rows.data_ptr<scalar_t>(), bt_rows.stride(0),
                         out.data_ptr<scalar_t>(), m, bt.size(0), a.size(1), threads());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(
    const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    int64_t m, int64_t n) {
  const Csr csr = check_csr_transpose(values, row_offsets, col_indices, m, n);
  check_structure_is_safe(csr.row_offsets, at::Tensor(), csr.col_indices, m, n);
  const int64_t nnz = values.size(0);
  const auto vals = values.contiguous();
  const auto index_options = values.options().dtype(at::kInt);
  auto values_t = at::empty({nnz}, values.options());
  auto row_offsets_t = at::empty({n + 1}, index_options);
  auto col_indices_t = at::empty({nnz}, index_options);
  auto permutation = at::empty({nnz}, index_options);
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::csr_transpose", [&] {
    cpu::csr_transpose<scalar_t>(vals.data_ptr<scalar_t>(), csr.row_offsets.data_ptr<int32_t>(),
                                 csr.col_indices.data_ptr<int32_t>(), m, n,
                                 values_t.data_ptr<scalar_t>(), row_offsets_t.data_ptr<int32_t>(),
                                 col_indices_t.data_ptr<int32_t>(),
                                 permutation.data_ptr<int32_t>());
  });
  return {values_t, row_offsets_t, col_indices_t, permutation};
}

// dense += A for a dense whose rows are contiguous; `csr` holds the checked int32 indices.
void csr_add_into(const at::Tensor& values, const Csr& csr, const at::Tensor& dense) {
  check_structure_is_safe(csr.row_offsets, csr.row_indices, csr.col_indices, dense.size(0),
                          dense.size(1));
  const auto vals = values.contiguous();
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::csr_add", [&] {
    cpu::csr_add<scalar_t>(vals.data_ptr<scalar_t>(), csr.row_offsets.data_ptr<int32_t>(),
                           csr.col_indices.data_ptr<int32_t>(), dense.data_ptr<scalar_t>(),
                           dense.stride(0), dense.size(0), threads());
  });
}

void csr_add_inplace_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                         const at::Tensor& row_indices, const at::Tensor& col_indices,
                         const at::Tensor& dense) {
  const Csr csr = check_csr_add(values, row_offsets, row_indices, col_indices, dense);
  ROSA_CHECK_VALUE(dense.stride(1) == 1 || dense.size(1) <= 1,
                   "dense must have contiguous rows for an in-place csr_add, got strides (",
                   dense.stride(0), ", ", dense.stride(1), ")");
  csr_add_into(values, csr, dense);
}

at::Tensor csr_add_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                       const at::Tensor& row_indices, const at::Tensor& col_indices,
                       const at::Tensor& dense) {
  const Csr csr = check_csr_add(values, row_offsets, row_indices, col_indices, dense);
  auto out = dense.clone(at::MemoryFormat::Contiguous);
  csr_add_into(values, csr, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(rosa_kernels, m) {
  m.def("spmm(Tensor values, Tensor row_offsets, Tensor row_indices, Tensor col_indices, "
        "Tensor dense, int m) -> Tensor");
  m.def("sddmm(Tensor row_offsets, Tensor row_indices, Tensor col_indices, Tensor a, Tensor bt) "
        "-> Tensor");
  m.def("csr_transpose(Tensor values, Tensor row_offsets, Tensor col_indices, int m, int n) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("csr_add(Tensor values, Tensor row_offsets, Tensor row_indices, Tensor col_indices, "
        "Tensor dense) -> Tensor");
  m.def("csr_add_(Tensor values, Tensor row_offsets, Tensor row_indices, Tensor col_indices, "
        "Tensor(a!) dense) -> ()");
}

TORCH_LIBRARY_IMPL(rosa_kernels, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("sddmm", &sddmm_cpu);
  m.impl("csr_transpose", &csr_transpose_cpu);
  m.impl("csr_add", &csr_add_cpu);
  m.impl("csr_add_", &csr_add_inplace_cpu);
}

}  // namespace rosa
