// CUDA implementations of the LoRA dropout ops (schemas and checks: lora_dropout_ops.cpp).
// Device guard, current stream; no synchronization (the seed is a CPU tensor).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "checks.h"
#include "cuda/lora_dropout.h"
#include "lora_dropout_ops.h"

namespace rosa {
namespace {

#define ROSA_DISPATCH_VALUES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

template <typename S>
struct CudaValue { using type = S; };
template <>
struct CudaValue<c10::Half> { using type = __half; };
template <>
struct CudaValue<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename S>
const typename CudaValue<S>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaValue<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
typename CudaValue<S>::type* mptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaValue<S>::type*>(t.mutable_data_ptr<S>());
}

at::Tensor lora_dropout_apply_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  check_floating(x, "x", 2);
  const DropoutKey key = check_dropout_key(seed, p);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_rows = rows_contiguous(x);
  auto out = at::empty(x.sizes(), x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_apply", [&] {
    using T = typename CudaValue<scalar_t>::type;
    cuda::lora_dropout_apply<T>(cptr<scalar_t>(x_rows), x_rows.stride(0), mptr<scalar_t>(out), out.size(1),
                                x.size(0), x.size(1), key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void lora_dropout_add_cuda(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& seed, double p,
                           double alpha) {
  check_dropout_add(dx, g);
  const DropoutKey key = check_dropout_key(seed, p);
  const c10::cuda::CUDAGuard guard(dx.device());
  const auto g_rows = rows_contiguous(g);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(dx.scalar_type(), "lora_dropout_add_", [&] {
    using T = typename CudaValue<scalar_t>::type;
    cuda::lora_dropout_add<T>(mptr<scalar_t>(dx), dx.stride(0), cptr<scalar_t>(g_rows), g_rows.stride(0),
                              dx.size(0), dx.size(1), alpha, key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) {
  m.impl("lora_dropout_apply", &lora_dropout_apply_cuda);
  m.impl("lora_dropout_add_", &lora_dropout_add_cuda);
}

}  // namespace rosa
