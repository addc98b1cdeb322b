// CUDA implementations of the fused LoRA dropout ops (schemas and checks: lora_dropout_ops.cpp).
// Device guard, current stream, workspace from torch's caching allocator; no synchronization (the
// seed is a CPU tensor).
#include <ATen/ATen.h>
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

at::Tensor lora_dropout_project_cuda(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& seed,
                                     double p) {
  check_lora_operands(x, "x", lora_A, "lora_A", 1, x.size(1));
  const DropoutKey key = check_dropout_key(seed, p);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_rows = rows_contiguous(x);
  const auto a = lora_A.contiguous();
  auto h = at::empty({x.size(0), a.size(0)}, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_project", [&] {
    using T = typename CudaValue<scalar_t>::type;
    cuda::lora_dropout_project<T>(cptr<scalar_t>(x_rows), x_rows.stride(0), cptr<scalar_t>(a), mptr<scalar_t>(h),
                                  x.size(0), x.size(1), a.size(0), key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

at::Tensor lora_dropout_grad_A_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& seed, double p,
                                    double alpha) {
  check_lora_operands(x, "x", g, "g", 0, x.size(0));
  const DropoutKey key = check_dropout_key(seed, p);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_rows = rows_contiguous(x);
  const auto g_c = g.contiguous();
  auto grad_A = at::empty({g.size(1), x.size(1)}, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(x.scalar_type(), "lora_dropout_grad_A", [&] {
    using T = typename CudaValue<scalar_t>::type;
    const size_t bytes = cuda::lora_dropout_grad_A_workspace_bytes<T>(x.size(0), x.size(1), g.size(1));
    at::Tensor workspace;
    if (bytes > 0) workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    cuda::lora_dropout_grad_A<T>(cptr<scalar_t>(g_c), cptr<scalar_t>(x_rows), x_rows.stride(0),
                                 mptr<scalar_t>(grad_A), x.size(0), x.size(1), g.size(1), alpha, key,
                                 bytes > 0 ? workspace.mutable_data_ptr() : nullptr, bytes, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_A;
}

void lora_dropout_grad_x_cuda(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A,
                              const at::Tensor& seed, double p, double alpha) {
  check_lora_operands(dx, "dx", lora_A, "lora_A", 1, dx.size(1));
  check_lora_operands(dx, "dx", g, "g", 0, dx.size(0));
  ROSA_CHECK_VALUE(g.size(1) == lora_A.size(0), "g must have ", lora_A.size(0), " columns (the rank), got ",
                   g.size(1));
  ROSA_CHECK_VALUE(dx.stride(1) == 1 || dx.size(1) <= 1, "dx must have unit column stride");
  const DropoutKey key = check_dropout_key(seed, p);
  const c10::cuda::CUDAGuard guard(dx.device());
  const auto g_c = g.contiguous();
  const auto a = lora_A.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ROSA_DISPATCH_VALUES(dx.scalar_type(), "lora_dropout_grad_x_", [&] {
    using T = typename CudaValue<scalar_t>::type;
    cuda::lora_dropout_grad_x<T>(mptr<scalar_t>(dx), dx.stride(0), cptr<scalar_t>(g_c), cptr<scalar_t>(a),
                                 dx.size(0), dx.size(1), a.size(0), alpha, key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) {
  m.impl("lora_dropout_project", &lora_dropout_project_cuda);
  m.impl("lora_dropout_grad_A", &lora_dropout_grad_A_cuda);
  m.impl("lora_dropout_grad_x_", &lora_dropout_grad_x_cuda);
}

}  // namespace rosa
