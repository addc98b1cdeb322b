// The operator schemas of rosa_kernels, their CPU implementations and their autograd.
//
// Each op is declared once here (namespace `rosa_kernels`); ops_cuda.cpp registers the CUDA
// implementations of the same schemas, and python/rosa_kernels/ops.py registers the fake kernels.
// This layer checks shapes/dtypes/devices, dispatches on dtype and calls the torch-free kernels in
// cpu/. Autograd is registered here too, in C++ (the end of this file), because a Python autograd
// kernel cost about as much host time per call as the op itself, even when nothing needed a
// gradient.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
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
  const Csr csr = check_csr_add_inplace(values, row_offsets, row_indices, col_indices, dense);
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

// ----------------------------------------------------------------------------------------------
// Autograd. Gradients flow to the floating operands; index tensors and sizes get none. Backward
// calls the ops through the dispatcher, so it is itself differentiable, and traceable by
// torch.compile (sizes are read as SymInts and specialized, since the schemas take int sizes).
// ----------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_spmm(const at::Tensor& values, const at::Tensor& row_offsets,
                     const at::Tensor& row_indices, const at::Tensor& col_indices,
                     const at::Tensor& dense, int64_t m) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::spmm", "")
                             .typed<decltype(spmm_cpu)>();
  return op.call(values, row_offsets, row_indices, col_indices, dense, m);
}

at::Tensor call_sddmm(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                      const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::sddmm", "")
                             .typed<decltype(sddmm_cpu)>();
  return op.call(row_offsets, row_indices, col_indices, a, bt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_csr_transpose(
    const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    int64_t m, int64_t n) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::csr_transpose", "")
                             .typed<decltype(csr_transpose_cpu)>();
  return op.call(values, row_offsets, col_indices, m, n);
}

at::Tensor call_csr_add(const at::Tensor& values, const at::Tensor& row_offsets,
                        const at::Tensor& row_indices, const at::Tensor& col_indices,
                        const at::Tensor& dense) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::csr_add", "")
                             .typed<decltype(csr_add_cpu)>();
  return op.call(values, row_offsets, row_indices, col_indices, dense);
}

int64_t size_of(const at::Tensor& t, int64_t dim) {
  return t.sym_size(dim).guard_int(__FILE__, __LINE__);
}

bool needs_grad(const at::Tensor& a, const at::Tensor& b = at::Tensor()) {
  return at::GradMode::is_enabled() &&
         ((a.defined() && a.requires_grad()) || (b.defined() && b.requires_grad()));
}

// A^T of the m x n CSR matrix (values, row_offsets, col_indices), with its row order.
struct Transposed {
  at::Tensor values, row_offsets, row_indices, col_indices;
};

Transposed transposed(const at::Tensor& values, const at::Tensor& row_offsets,
                      const at::Tensor& col_indices, int64_t m, int64_t n) {
  auto [values_t, offsets_t, cols_t, permutation] =
      call_csr_transpose(values, row_offsets, col_indices, m, n);
  // Rows by nonincreasing nonzero count (rosa_kernels.row_order).
  const auto counts = offsets_t.slice(0, 1).to(at::kLong) - offsets_t.slice(0, 0, n).to(at::kLong);
  auto order_t = at::argsort(counts, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
  return {values_t, offsets_t, order_t, cols_t};
}

class SpmmFunction : public torch::autograd::Function<SpmmFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& values,
                            const at::Tensor& row_offsets, const at::Tensor& row_indices,
                            const at::Tensor& col_indices, const at::Tensor& dense, int64_t m) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["m"] = m;
    ctx->save_for_backward({values, row_offsets, row_indices, col_indices, dense});
    return call_spmm(values, row_offsets, row_indices, col_indices, dense, m);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &values = saved[0], &row_offsets = saved[1], &row_indices = saved[2],
               &col_indices = saved[3], &dense = saved[4];
    const auto grad = grads[0].contiguous();
    at::Tensor grad_values, grad_dense;
    if (ctx->needs_input_grad(0)) {
      // d values[p] = <grad[i, :], dense[j, :]>: an SDDMM at the nonzeros.
      grad_values = call_sddmm(row_offsets, row_indices, col_indices, grad, dense);
    }
    if (ctx->needs_input_grad(4)) {
      // d dense = A^T @ grad.
      const int64_t n = size_of(dense, 0);
      const auto t = transposed(values, row_offsets, col_indices, ctx->saved_data["m"].toInt(), n);
      grad_dense = call_spmm(t.values, t.row_offsets, t.row_indices, t.col_indices, grad, n);
    }
    return {grad_values, at::Tensor(), at::Tensor(), at::Tensor(), grad_dense, at::Tensor()};
  }
};

class SddmmFunction : public torch::autograd::Function<SddmmFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& row_offsets,
                            const at::Tensor& row_indices, const at::Tensor& col_indices,
                            const at::Tensor& a, const at::Tensor& bt) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({row_offsets, row_indices, col_indices, a, bt});
    return call_sddmm(row_offsets, row_indices, col_indices, a, bt);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &row_offsets = saved[0], &row_indices = saved[1], &col_indices = saved[2],
               &a = saved[3], &bt = saved[4];
    const auto grad = grads[0].contiguous();
    const int64_t m = size_of(a, 0), n = size_of(bt, 0);
    at::Tensor grad_a, grad_bt;
    if (ctx->needs_input_grad(3)) {
      // d a = G @ bt with G the CSR matrix of the incoming gradient.
      grad_a = call_spmm(grad, row_offsets, row_indices, col_indices, bt, m);
    }
    if (ctx->needs_input_grad(4)) {
      // d bt = G^T @ a.
      const auto t = transposed(grad, row_offsets, col_indices, m, n);
      grad_bt = call_spmm(t.values, t.row_offsets, t.row_indices, t.col_indices, a, n);
    }
    return {at::Tensor(), at::Tensor(), at::Tensor(), grad_a, grad_bt};
  }
};

class CsrTransposeFunction : public torch::autograd::Function<CsrTransposeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& values,
                               const at::Tensor& row_offsets, const at::Tensor& col_indices,
                               int64_t m, int64_t n) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [values_t, offsets_t, cols_t, permutation] =
        call_csr_transpose(values, row_offsets, col_indices, m, n);
    ctx->mark_non_differentiable({offsets_t, cols_t, permutation});
    ctx->save_for_backward({permutation});
    return {values_t, offsets_t, cols_t, permutation};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_values;
    const auto& grad_values_t = grads[0];
    if (grad_values_t.defined() && ctx->needs_input_grad(0)) {
      // values_t = values[permutation], and permutation is a bijection: scatter the gradient back.
      const auto permutation = ctx->get_saved_variables()[0];
      grad_values = at::empty_like(grad_values_t).index_copy_(0, permutation.to(at::kLong),
                                                               grad_values_t);
    }
    return {grad_values, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class CsrAddFunction : public torch::autograd::Function<CsrAddFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& values,
                            const at::Tensor& row_offsets, const at::Tensor& row_indices,
                            const at::Tensor& col_indices, const at::Tensor& dense) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["nnz"] = values.sym_size(0).guard_int(__FILE__, __LINE__);
    ctx->save_for_backward({row_offsets, col_indices});
    return call_csr_add(values, row_offsets, row_indices, col_indices, dense);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& grad = grads[0];
    at::Tensor grad_values;
    if (ctx->needs_input_grad(0)) {
      // d values[p] = grad[i, j] at each nonzero p = (i, j).
      const auto saved = ctx->get_saved_variables();
      const auto &row_offsets = saved[0], &col_indices = saved[1];
      const int64_t m = size_of(row_offsets, 0) - 1;
      const auto counts = row_offsets.slice(0, 1).to(at::kLong) -
                          row_offsets.slice(0, 0, m).to(at::kLong);
      // Row i repeated counts[i] times (the one-tensor overload: not `counts` repeated nnz times).
      const auto rows =
          at::repeat_interleave(counts, std::optional<int64_t>(ctx->saved_data["nnz"].toInt()));
      c10::List<std::optional<at::Tensor>> indices;
      indices.push_back(rows);
      indices.push_back(col_indices.to(at::kLong));
      grad_values = at::index(grad, indices);
    }
    return {grad_values, at::Tensor(), at::Tensor(), at::Tensor(),
            ctx->needs_input_grad(4) ? grad : at::Tensor()};
  }
};

// The Autograd kernels: without a gradient to track, straight to the backend kernel.
at::Tensor spmm_autograd(const at::Tensor& values, const at::Tensor& row_offsets,
                         const at::Tensor& row_indices, const at::Tensor& col_indices,
                         const at::Tensor& dense, int64_t m) {
  if (needs_grad(values, dense)) {
    return SpmmFunction::apply(values, row_offsets, row_indices, col_indices, dense, m);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_spmm(values, row_offsets, row_indices, col_indices, dense, m);
}

at::Tensor sddmm_autograd(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                          const at::Tensor& col_indices, const at::Tensor& a,
                          const at::Tensor& bt) {
  if (needs_grad(a, bt)) {
    return SddmmFunction::apply(row_offsets, row_indices, col_indices, a, bt);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_sddmm(row_offsets, row_indices, col_indices, a, bt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_transpose_autograd(
    const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    int64_t m, int64_t n) {
  if (needs_grad(values)) {
    const auto outputs = CsrTransposeFunction::apply(values, row_offsets, col_indices, m, n);
    return {outputs[0], outputs[1], outputs[2], outputs[3]};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_csr_transpose(values, row_offsets, col_indices, m, n);
}

at::Tensor csr_add_autograd(const at::Tensor& values, const at::Tensor& row_offsets,
                            const at::Tensor& row_indices, const at::Tensor& col_indices,
                            const at::Tensor& dense) {
  if (needs_grad(values, dense)) {
    return CsrAddFunction::apply(values, row_offsets, row_indices, col_indices, dense);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_csr_add(values, row_offsets, row_indices, col_indices, dense);
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

TORCH_LIBRARY_IMPL(rosa_kernels, Autograd, m) {
  m.impl("spmm", &spmm_autograd);
  m.impl("sddmm", &sddmm_autograd);
  m.impl("csr_transpose", &csr_transpose_autograd);
  m.impl("csr_add", &csr_add_autograd);
}

}  // namespace rosa
