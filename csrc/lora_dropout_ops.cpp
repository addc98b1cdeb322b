// RosaLinear's LoRA dropout ops: schemas and CPU implementations (CUDA: lora_dropout_ops_cuda.cpp).
//
// With keep(t, j) the counter-based dropout mask of dropout_keep.h, drawn from a 64-bit seed held
// in a one-element int64 tensor: on the CPU (read on the host), or, for CUDA inputs, on x's device
// (read by the kernel: no synchronization, and a captured CUDA graph reads each replay's new seed):
//
//     lora_dropout_apply(x, seed, p)              -> X ∘ keep                 (T x N, a new tensor)
//     lora_dropout_add_(dx, g, seed, p, alpha)    :  dX += alpha * keep ∘ G   in place
//     lora_dropout_project(x, seed, p, lora_A)    -> (X ∘ keep) A^T           (T x R, a new tensor)
//     lora_dropout_addmm_(dx, g, lora_A, seed, p, alpha) : dX += alpha * keep ∘ (G A)   in place
//     lora_dropout_grad_A(x, seed, p, g, alpha)   -> alpha * G^T (X ∘ keep)   (R x N, a new tensor)
//
// The last three fuse the dropout into the LoRA products that read or write a T x N tensor: on a
// GPU with tensor cores (cuda/lora_dropout_mma.cu, 16-bit values) one pass over it instead of
// three, each product summed in float32 and rounded once; elsewhere the elementwise kernel plus a
// GEMM, in one op call.
//
// Internal building blocks of RosaLinear's autograd function (python/rosa_kernels/linear.py), which
// regenerates the mask in backward instead of saving it; python/rosa_kernels/dropout.py registers
// their fake kernels. No 1 / (1 - p) factor: the caller folds it into its scale.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/lora_dropout.h"
#include "lora_dropout_ops.h"

namespace rosa {

DropoutKey check_dropout_key(const at::Tensor& seed, double p, const at::Device& device) {
  check_defined(seed, "seed");
  ROSA_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                  "seed must be a one-element int64 tensor, got ", dtype_name(seed.scalar_type()), " with ",
                  seed.numel(), " elements");
  ROSA_CHECK_VALUE(seed.device().is_cpu() || (device.is_cuda() && seed.device() == device),
                   "seed must be a CPU tensor or on the input's device ", device, ", got ", seed.device());
  ROSA_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must lie in [0, 1)");
  if (!seed.device().is_cpu()) return dropout_device_key(seed.const_data_ptr<int64_t>(), p);
  // Read in place (a CPU tensor): item() would be one more dispatcher call, three per layer step.
  return dropout_key(*seed.const_data_ptr<int64_t>(), p);
}

void check_dropout_add(const at::Tensor& dx, const at::Tensor& g) {
  check_floating(dx, "dx", 2);
  check_floating(g, "g", 2);
  check_same_dtype(dx, "dx", g, "g");
  check_same_device(dx, "dx", g, "g");
  ROSA_CHECK_VALUE(g.sizes() == dx.sizes(), "g must have the shape of dx ", shape_of(dx), ", got ", shape_of(g));
  ROSA_CHECK_VALUE(dx.stride(1) == 1 || dx.size(1) <= 1, "dx must have unit column stride");
}

void check_dropout_project(const at::Tensor& x, const at::Tensor& lora_A) {
  check_floating(x, "x", 2);
  check_floating(lora_A, "lora_A", 2);
  check_same_dtype(x, "x", lora_A, "lora_A");
  check_same_device(x, "x", lora_A, "lora_A");
  ROSA_CHECK_VALUE(lora_A.size(1) == x.size(1), "lora_A must have x's ", x.size(1), " columns, got shape ",
                   shape_of(lora_A));
}

void check_dropout_addmm(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A) {
  check_floating(dx, "dx", 2);
  check_floating(g, "g", 2);
  check_floating(lora_A, "lora_A", 2);
  check_same_dtype(dx, "dx", g, "g");
  check_same_dtype(dx, "dx", lora_A, "lora_A");
  check_same_device(dx, "dx", g, "g");
  check_same_device(dx, "dx", lora_A, "lora_A");
  ROSA_CHECK_VALUE(g.size(0) == dx.size(0) && lora_A.size(1) == dx.size(1) && g.size(1) == lora_A.size(0),
                   "g must be (dx.shape[0] x rank) and lora_A (rank x dx.shape[1]) for dx of shape ", shape_of(dx),
                   ", got ", shape_of(g), " and ", shape_of(lora_A));
  ROSA_CHECK_VALUE(dx.stride(1) == 1 || dx.size(1) <= 1, "dx must have unit column stride");
}

void check_dropout_grad_A(const at::Tensor& x, const at::Tensor& g) {
  check_floating(x, "x", 2);
  check_floating(g, "g", 2);
  check_same_dtype(x, "x", g, "g");
  check_same_device(x, "x", g, "g");
  ROSA_CHECK_VALUE(g.size(0) == x.size(0), "g must have x's ", x.size(0), " rows, got shape ", shape_of(g));
}

namespace {
CudaHostSeed registered_cuda_host_seed = nullptr;
}  // namespace

void set_cuda_host_seed(CudaHostSeed draw) { registered_cuda_host_seed = draw; }
CudaHostSeed cuda_host_seed() { return registered_cuda_host_seed; }

namespace {

// X ∘ keep as a new row-major tensor.
at::Tensor kept_cpu(const at::Tensor& x, const DropoutKey& key) {
  const auto x_rows = rows_contiguous(x);
  auto kept = at::empty(x.sizes(), x.options());
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_apply", [&] {
    cpu::lora_dropout_apply<scalar_t>(x_rows.const_data_ptr<scalar_t>(), x_rows.stride(0),
                                      kept.mutable_data_ptr<scalar_t>(), kept.size(1), x.size(0), x.size(1), key,
                                      at::get_num_threads());
  });
  return kept;
}

// CPU: the elementwise kernel into a buffer, then one GEMM (a vectorized GEMM beats a fused
// scalar loop on a CPU; both calls skip the dispatcher's way back into this library).
at::Tensor lora_dropout_project_cpu(const at::Tensor& x, const at::Tensor& seed, double p, const at::Tensor& lora_A) {
  check_dropout_project(x, lora_A);
  return at::mm(kept_cpu(x, check_dropout_key(seed, p, x.device())), lora_A.t());
}

// dX += alpha * keep ∘ G for a row-major G (unit column stride).
void add_kept_cpu(const at::Tensor& dx, const at::Tensor& g_rows, const DropoutKey& key, double alpha) {
  ROSA_DISPATCH_VALUES(dx.scalar_type(), "lora_dropout_add_", [&] {
    cpu::lora_dropout_add<scalar_t>(dx.mutable_data_ptr<scalar_t>(), dx.stride(0), g_rows.const_data_ptr<scalar_t>(),
                                    g_rows.stride(0), dx.size(0), dx.size(1), alpha, key, at::get_num_threads());
  });
}

void lora_dropout_addmm_cpu(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A,
                            const at::Tensor& seed, double p, double alpha) {
  check_dropout_addmm(dx, g, lora_A);
  const DropoutKey key = check_dropout_key(seed, p, dx.device());
  add_kept_cpu(dx, at::mm(g, lora_A), key, alpha);  // the product is contiguous
}

at::Tensor lora_dropout_grad_A_cpu(const at::Tensor& x, const at::Tensor& seed, double p, const at::Tensor& g,
                                   double alpha) {
  check_dropout_grad_A(x, g);
  const auto kept = kept_cpu(x, check_dropout_key(seed, p, x.device()));
  // beta = 0: addmm reads only the shape of its first operand; alpha scales the product.
  return at::addmm(at::empty({g.size(1), x.size(1)}, x.options()), g.t(), kept, 0.0, alpha);
}

at::Tensor lora_dropout_apply_cpu(const at::Tensor& x, const at::Tensor& seed, double p) {
  check_floating(x, "x", 2);
  return kept_cpu(x, check_dropout_key(seed, p, x.device()));
}

void lora_dropout_add_cpu(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& seed, double p,
                          double alpha) {
  check_dropout_add(dx, g);
  const DropoutKey key = check_dropout_key(seed, p, dx.device());
  add_kept_cpu(dx, rows_contiguous(g), key, alpha);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosa_kernels, m) {
  m.def("lora_dropout_apply(Tensor x, Tensor seed, float p) -> Tensor");
  m.def("lora_dropout_add_(Tensor(a!) dx, Tensor g, Tensor seed, float p, float alpha) -> ()");
  m.def("lora_dropout_project(Tensor x, Tensor seed, float p, Tensor lora_A) -> Tensor");
  m.def("lora_dropout_addmm_(Tensor(a!) dx, Tensor g, Tensor lora_A, Tensor seed, float p, float alpha) -> ()");
  m.def("lora_dropout_grad_A(Tensor x, Tensor seed, float p, Tensor g, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(rosa_kernels, CPU, m) {
  m.impl("lora_dropout_apply", &lora_dropout_apply_cpu);
  m.impl("lora_dropout_add_", &lora_dropout_add_cpu);
  m.impl("lora_dropout_project", &lora_dropout_project_cpu);
  m.impl("lora_dropout_addmm_", &lora_dropout_addmm_cpu);
  m.impl("lora_dropout_grad_A", &lora_dropout_grad_A_cpu);
}

}  // namespace rosa
