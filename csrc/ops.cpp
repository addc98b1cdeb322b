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
// process: on the CPU the memory-safety part of the check is one cheap pass (cpu/structure.h).
// Takes the contiguous int32 index tensors the kernel will read; row_indices may be undefined.
void check_structure_is_safe(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                             const at::Tensor& col_indices, int64_t m, int64_t n) {
  const std::string problem = cpu::unsafe_structure(
      row_offsets.data_ptr<int32_t>(),
      row_indices.defined() ? row_indices.data_ptr<int32_t>() : nullptr,
      col_indices.data_ptr<int32_t>(), m, n, col_indices.size(0));
  ROSA_CHECK(problem.empty(), problem);
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
  check_values(values);
  check_csr(values, row_offsets, row_indices, col_indices, m, values.size(0));
  check_dense(values, dense, "dense", -1);
  const auto dense_rows = rows_contiguous(dense);
  const auto offsets = row_offsets.contiguous(), order = row_indices.contiguous(),
             cols = col_indices.contiguous(), vals = values.contiguous();
  check_structure_is_safe(offsets, order, cols, m, dense.size(0));
  auto out = at::empty({m, dense.size(1)}, dense.options());
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::spmm", [&] {
    cpu::spmm<scalar_t>(vals.data_ptr<scalar_t>(), offsets.data_ptr<int32_t>(),
                        order.data_ptr<int32_t>(), cols.data_ptr<int32_t>(),
                        dense_rows.data_ptr<scalar_t>(), dense_rows.stride(0),
                        out.data_ptr<scalar_t>(), m, dense.size(0), dense.size(1), threads());
  });
  return out;
}

at::Tensor sddmm_cpu(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                     const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  check_dense(a, a, "a", -1);
  check_dense(a, bt, "bt", -1);
  const int64_t m = a.size(0);
  ROSA_CHECK(bt.size(1) == a.size(1), "bt must have ", a.size(1), " columns (a's), got ",
              bt.size(1));
  check_csr(a, row_offsets, row_indices, col_indices, m, col_indices.size(0));
  const auto offsets = row_offsets.contiguous(), order = row_indices.contiguous(),
             cols = col_indices.contiguous();
  check_structure_is_safe(offsets, order, cols, m, bt.size(0));
  const auto a_rows = used_rows_contiguous(a, row_mask_of_rows(offsets, m));
  const auto bt_rows = used_rows_contiguous(bt, row_mask_of_columns(cols, bt.size(0)));
  auto out = at::empty({col_indices.size(0)}, a.options());
  ROSA_DISPATCH_VALUES(a.scalar_type(), "rosa_kernels::sddmm", [&] {
    cpu::sddmm<scalar_t>(offsets.data_ptr<int32_t>(), order.data_ptr<int32_t>(),
                         cols.data_ptr<int32_t>(), a_rows.data_ptr<scalar_t>(), a_rows.stride(0),
                         bt_rows.data_ptr<scalar_t>(), bt_rows.stride(0),
                         out.data_ptr<scalar_t>(), m, bt.size(0), a.size(1), threads());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(
    const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    int64_t m, int64_t n) {
  check_values(values);
  check_csr(values, row_offsets, at::Tensor(), col_indices, m, values.size(0));
  ROSA_CHECK(n >= 0 && n < (int64_t(1) << 31) - 1, "n must be in [0, 2^31 - 1), got ", n);
  const int64_t nnz = values.size(0);
  const auto offsets = row_offsets.contiguous(), cols = col_indices.contiguous(),
             vals = values.contiguous();
  check_structure_is_safe(offsets, at::Tensor(), cols, m, n);
  auto values_t = at::empty({nnz}, values.options());
  auto row_offsets_t = at::empty({n + 1}, row_offsets.options());
  auto col_indices_t = at::empty({nnz}, col_indices.options());
  auto permutation = at::empty({nnz}, col_indices.options());
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::csr_transpose", [&] {
    cpu::csr_transpose<scalar_t>(vals.data_ptr<scalar_t>(), offsets.data_ptr<int32_t>(),
                                 cols.data_ptr<int32_t>(), m, n, values_t.data_ptr<scalar_t>(),
                                 row_offsets_t.data_ptr<int32_t>(),
                                 col_indices_t.data_ptr<int32_t>(),
                                 permutation.data_ptr<int32_t>());
  });
  return {values_t, row_offsets_t, col_indices_t, permutation};
}

void csr_add_inplace_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                         const at::Tensor& row_indices, const at::Tensor& col_indices,
                         const at::Tensor& dense) {
  check_values(values);
  check_dense(values, dense, "dense", -1);
  check_csr(values, row_offsets, row_indices, col_indices, dense.size(0), values.size(0));
  ROSA_CHECK(dense.stride(1) == 1 || dense.size(1) <= 1,
              "dense must have contiguous rows for an in-place csr_add");
  const auto offsets = row_offsets.contiguous(), cols = col_indices.contiguous(),
             vals = values.contiguous();
  check_structure_is_safe(offsets, row_indices.contiguous(), cols, dense.size(0), dense.size(1));
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::csr_add_", [&] {
    cpu::csr_add<scalar_t>(vals.data_ptr<scalar_t>(), offsets.data_ptr<int32_t>(),
                           cols.data_ptr<int32_t>(), dense.data_ptr<scalar_t>(), dense.stride(0),
                           dense.size(0), threads());
  });
}

at::Tensor csr_add_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                       const at::Tensor& row_indices, const at::Tensor& col_indices,
                       const at::Tensor& dense) {
  check_values(values);
  check_dense(values, dense, "dense", -1);
  auto out = dense.clone(at::MemoryFormat::Contiguous);
  csr_add_inplace_cpu(values, row_offsets, row_indices, col_indices, out);
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
