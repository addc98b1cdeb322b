// RosaLinear's fused LoRA dropout ops: schemas and CPU implementations (CUDA: lora_dropout_ops_cuda.cpp).
//
// With keep(t, j) the counter-based dropout mask of dropout_keep.h, drawn from a 64-bit seed held
// in a one-element int64 CPU tensor (read on the host: no GPU synchronization):
//
//     lora_dropout_project(x, lora_A, seed, p)              -> (X ∘ keep) A^T            T x R
//     lora_dropout_grad_A(g, x, seed, p, alpha)             -> alpha * G^T (X ∘ keep)     R x N
//     lora_dropout_grad_x_(dx, g, lora_A, seed, p, alpha)   :  dX += alpha * keep ∘ (G A) in place
//
// Internal building blocks of RosaLinear's autograd function (python/rosa_kernels/linear.py), which
// regenerates the mask in backward instead of saving it; python/rosa_kernels/dropout.py registers
// their fake kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/lora_dropout.h"
#include "lora_dropout_ops.h"

namespace rosa {

DropoutKey check_dropout_key(const at::Tensor& seed, double p) {
  check_defined(seed, "seed");
  ROSA_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                  "seed must be a one-element int64 tensor, got ", dtype_name(seed.scalar_type()), " with ",
                  seed.numel(), " elements");
  ROSA_CHECK_VALUE(seed.device().is_cpu(), "seed must be a CPU tensor (read on the host), got ", seed.device());
  ROSA_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must lie in [0, 1)");
  return dropout_key(seed.item<int64_t>(), p);
}

void check_lora_operands(const at::Tensor& x, const char* x_name, const at::Tensor& other, const char* other_name,
                         int64_t other_columns_dim, int64_t other_columns) {
  check_floating(x, x_name, 2);
  check_floating(other, other_name, 2);
  check_same_dtype(x, x_name, other, other_name);
  check_same_device(x, x_name, other, other_name);
  ROSA_CHECK_VALUE(other.size(other_columns_dim) == other_columns, other_name, " must have size ", other_columns,
                   " in dimension ", other_columns_dim, ", got shape ", shape_of(other));
  ROSA_CHECK_VALUE(x.size(0) < kInt32Max && x.size(1) < kInt32Max && other.size(0) < kInt32Max,
                   "lora dropout sizes must be below 2^31 - 1");
}

namespace {

#define ROSA_DISPATCH_VALUES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

at::Tensor lora_dropout_project_cpu(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& seed,
                                    double p) {
  check_lora_operands(x, "x", lora_A, "lora_A", 1, x.size(1));
  const DropoutKey key = check_dropout_key(seed, p);
  const auto x_rows = rows_contiguous(x);
  const auto a = lora_A.contiguous();
  auto h = at::empty({x.size(0), a.size(0)}, x.options());
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_project", [&] {
    cpu::lora_dropout_project<scalar_t>(x_rows.const_data_ptr<scalar_t>(), x_rows.stride(0),
                                        a.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), x.size(0),
                                        x.size(1), a.size(0), key, at::get_num_threads());
  });
  return h;
}

at::Tensor lora_dropout_grad_A_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& seed, double p,
                                   double alpha) {
  check_lora_operands(x, "x", g, "g", 0, x.size(0));
  const DropoutKey key = check_dropout_key(seed, p);
  const auto x_rows = rows_contiguous(x);
  const auto g_c = g.contiguous();
  auto grad_A = at::empty({g.size(1), x.size(1)}, x.options());
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_grad_A", [&] {
    cpu::lora_dropout_grad_A<scalar_t>(g_c.const_data_ptr<scalar_t>(), x_rows.const_data_ptr<scalar_t>(),
                                       x_rows.stride(0), grad_A.mutable_data_ptr<scalar_t>(), x.size(0),
                                       x.size(1), g.size(1), alpha, key, at::get_num_threads());
  });
  return grad_A;
}

void lora_dropout_grad_x_cpu(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A,
                             const at::Tensor& seed, double p, double alpha) {
  check_lora_operands(dx, "dx", lora_A, "lora_A", 1, dx.size(1));
  check_lora_operands(dx, "dx", g, "g", 0, dx.size(0));
  ROSA_CHECK_VALUE(g.size(1) == lora_A.size(0), "g must have ", lora_A.size(0), " columns (the rank), got ",
                   g.size(1));
  ROSA_CHECK_VALUE(dx.stride(1) == 1 || dx.size(1) <= 1, "dx must have unit column stride");
  const DropoutKey key = check_dropout_key(seed, p);
  const auto g_c = g.contiguous();
  const auto a = lora_A.contiguous();
  ROSA_DISPATCH_VALUES(dx.scalar_type(), "lora_dropout_grad_x_", [&] {
    cpu::lora_dropout_grad_x<scalar_t>(dx.mutable_data_ptr<scalar_t>(), dx.stride(0), g_c.const_data_ptr<scalar_t>(),
                                       a.const_data_ptr<scalar_t>(), dx.size(0), dx.size(1), a.size(0), alpha, key,
                                       at::get_num_threads());
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosa_kernels, m) {
  m.def("lora_dropout_project(Tensor x, Tensor lora_A, Tensor seed, float p) -> Tensor");
  m.def("lora_dropout_grad_A(Tensor g, Tensor x, Tensor seed, float p, float alpha) -> Tensor");
  m.def("lora_dropout_grad_x_(Tensor(a!) dx, Tensor g, Tensor lora_A, Tensor seed, float p, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(rosa_kernels, CPU, m) {
  m.impl("lora_dropout_project", &lora_dropout_project_cpu);
  m.impl("lora_dropout_grad_A", &lora_dropout_grad_A_cpu);
  m.impl("lora_dropout_grad_x_", &lora_dropout_grad_x_cpu);
}

}  // namespace rosa
