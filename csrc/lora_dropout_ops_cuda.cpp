// CUDA implementations of the LoRA dropout ops (schemas and checks: lora_dropout_ops.cpp).
// Device guard, current stream; no synchronization (the seed is read on the host from a CPU tensor,
// or by the kernel from a device tensor).
#include <cstdlib>
#include <mutex>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
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

// The tensor-core kernels take 16-bit values, a rank up to 64 and compute capability 8.0+; they are
// the default there (measured on an H100, 2026-12-07, bench/report.py --profile-dropout: 0.80-0.98x
// the unfused time per call on 12 of 15 shapes, 1.06-1.08x on the others; docs/cuda.md).
// ROSA_KERNELS_FUSED_DROPOUT=0 in the environment (read at each call, so a test can switch it)
// turns them off: the ops then run the elementwise kernel plus cuBLAS.
bool use_mma(const at::Tensor& t, int64_t rank) {
  const char* value = std::getenv("ROSA_KERNELS_FUSED_DROPOUT");
  const bool disabled = value != nullptr && value[0] == '0' && value[1] == '\0';
  const auto dtype = t.scalar_type();
  return !disabled && (dtype == at::kBFloat16 || dtype == at::kHalf) && cuda::lora_dropout_mma_supported(rank);
}

at::Tensor lora_dropout_project_cuda(const at::Tensor& x, const at::Tensor& seed, double p, const at::Tensor& lora_A) {
  check_dropout_project(x, lora_A);
  const DropoutKey key = check_dropout_key(seed, p, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rank = lora_A.size(0);
  if (!use_mma(x, rank)) return at::mm(lora_dropout_apply_cuda(x, seed, p), lora_A.t());
  const auto x_rows = rows_contiguous(x);
  const auto a = lora_A.contiguous();
  auto h = at::empty({x.size(0), rank}, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "lora_dropout_project", [&] {
    cuda::lora_dropout_project<typename CudaValue<scalar_t>::type>(cuda_ptr<scalar_t>(x_rows), x_rows.stride(0),
                                                                   cuda_ptr<scalar_t>(a), cuda_mutable_ptr<scalar_t>(h),
                                                                   x.size(0), x.size(1), rank, key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

void lora_dropout_addmm_cuda(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A,
                             const at::Tensor& seed, double p, double alpha) {
  check_dropout_addmm(dx, g, lora_A);
  const DropoutKey key = check_dropout_key(seed, p, dx.device());
  const c10::cuda::CUDAGuard guard(dx.device());
  const int64_t rank = lora_A.size(0);
  if (!use_mma(dx, rank)) {
    if (dx.numel()) lora_dropout_add_cuda(dx, at::mm(g, lora_A), seed, p, alpha);
    return;
  }
  const auto g_rows = rows_contiguous(g);
  const auto a = lora_A.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dx.scalar_type(), "lora_dropout_addmm_", [&] {
    cuda::lora_dropout_addmm<typename CudaValue<scalar_t>::type>(cuda_mutable_ptr<scalar_t>(dx), dx.stride(0),
                                                                 cuda_ptr<scalar_t>(g_rows), g_rows.stride(0),
                                                                 cuda_ptr<scalar_t>(a), dx.size(0), dx.size(1), rank,
                                                                 alpha, key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lora_dropout_grad_A_cuda(const at::Tensor& x, const at::Tensor& seed, double p, const at::Tensor& g,
                                    double alpha) {
  check_dropout_grad_A(x, g);
  const DropoutKey key = check_dropout_key(seed, p, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), n = x.size(1), rank = g.size(1);
  if (!use_mma(x, rank)) {
    // beta = 0: addmm reads only the shape of its first operand; alpha scales the product.
    return at::addmm(at::empty({rank, n}, x.options()), g.t(), lora_dropout_apply_cuda(x, seed, p), 0.0, alpha);
  }
  auto out = at::empty({rank, n}, x.options());
  if (rank == 0 || n == 0) return out;
  const auto x_rows = rows_contiguous(x);
  const auto g_rows = rows_contiguous(g);
  const int64_t splits = cuda::lora_dropout_grad_A_splits(tokens, n);
  auto partial = at::empty({splits, rank, n}, x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "lora_dropout_grad_A", [&] {
    cuda::lora_dropout_grad_A<typename CudaValue<scalar_t>::type>(
        cuda_ptr<scalar_t>(x_rows), x_rows.stride(0), cuda_ptr<scalar_t>(g_rows), g_rows.stride(0),
        cuda_mutable_ptr<scalar_t>(out), partial.mutable_data_ptr<float>(), splits, tokens, n, rank, alpha, key, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// An eager call's dropout seed, drawn on the host from the device's default CUDA generator: its
// Philox seed and an offset advanced per draw (as torch's dropout takes them), mixed into 64 bits
// by splitmix64's finalizer. Nothing while the device's current stream is capturing a CUDA graph:
// a host value would be frozen into the graph, so the caller draws on the device then.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::optional<int64_t> eager_host_seed(c10::DeviceIndex device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device).stream(), &status));
  if (status != cudaStreamCaptureStatusNone) return std::nullopt;
  auto generator = at::cuda::detail::getDefaultCUDAGenerator(device);
  std::pair<uint64_t, uint64_t> philox;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    philox = at::check_generator<at::CUDAGeneratorImpl>(generator)->philox_engine_inputs(4);
  }
  return static_cast<int64_t>(mix64(philox.first ^ mix64(philox.second + 0x9E3779B97F4A7C15ull)));
}

[[maybe_unused]] const bool eager_host_seed_registered = (set_cuda_host_seed(&eager_host_seed), true);

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) {
  m.impl("lora_dropout_apply", &lora_dropout_apply_cuda);
  m.impl("lora_dropout_add_", &lora_dropout_add_cuda);
  m.impl("lora_dropout_project", &lora_dropout_project_cuda);
  m.impl("lora_dropout_addmm_", &lora_dropout_addmm_cuda);
  m.impl("lora_dropout_grad_A", &lora_dropout_grad_A_cuda);
}

}  // namespace rosa
