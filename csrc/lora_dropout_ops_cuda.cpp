// CUDA implementations of the LoRA dropout ops (schemas and checks: lora_dropout_ops.cpp).
// Device guard, current stream; no synchronization (the seed is read on the host from a CPU tensor,
// or by the kernel from a device tensor).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_values.h"
#include "cuda/lora_dropout.h"
#include "lora_dropout_ops.h"

namespace rosa {
namespace {

at::Tensor lora_dropout_apply_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  check_floating(x, "x", 2);
  const DropoutKey key = check_dropout_key(seed, p, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_rows = rows_contiguous(x);
  auto out = at::empty(x.sizes(), x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_apply", [&] {
    using T = typename CudaValue<scalar_t>::type;
    cuda::lora_dropout_apply<T>(cuda_ptr<scalar_t>(x_rows), x_rows.stride(0), cuda_mutable_ptr<scalar_t>(out),
                                out.size(1), x.size(0), x.size(1), key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void lora_dropout_add_cuda(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& seed, double p,
                           double alpha) {
  check_dropout_add(dx, g);
  const DropoutKey key = check_dropout_key(seed, p, dx.device());
  const c10::cuda::CUDAGuard guard(dx.device());
  const auto g_rows = rows_contiguous(g);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(dx.scalar_type(), "lora_dropout_add_", [&] {
    using T = typename CudaValue<scalar_t>::type;
    cuda::lora_dropout_add<T>(cuda_mutable_ptr<scalar_t>(dx), dx.stride(0), cuda_ptr<scalar_t>(g_rows),
                              g_rows.stride(0), dx.size(0), dx.size(1), alpha, key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) {
  m.impl("lora_dropout_apply", &lora_dropout_apply_cuda);
  m.impl("lora_dropout_add_", &lora_dropout_add_cuda);
}

}  // namespace rosa
