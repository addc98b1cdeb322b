// TEMP: minimal CUDA registration of `sddmm` only, for the SDDMM helper's GPU runs. The real
// csrc/ops_cuda.cpp (all ops) replaces this file at merge.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/sddmm.h"

namespace rosa {
namespace {

// Passes strides unchanged when the operand has a unit stride in one of its dims.
at::Tensor unit_stride_or_contiguous(const at::Tensor& t) {
  if (t.stride(0) == 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

template <typename T>
struct CudaType { using type = T; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

at::Tensor sddmm_cuda(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                      const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  check_index(row_offsets, "row_offsets", -1);
  TORCH_CHECK(row_offsets.size(0) >= 1, "row_offsets must have length >= 1");
  const int64_t m = row_offsets.size(0) - 1;
  check_dense(a, a, "a", m);
  check_dense(a, bt, "bt", -1);
  TORCH_CHECK(bt.size(1) == a.size(1), "bt must have ", a.size(1), " columns (a's), got ",
              bt.size(1));
  check_csr(a, row_offsets, row_indices, col_indices, m, col_indices.size(0));
  const c10::cuda::CUDAGuard guard(a.device());
  const auto a_view = unit_stride_or_contiguous(a), bt_view = unit_stride_or_contiguous(bt);
  const auto offsets = row_offsets.contiguous(), order = row_indices.contiguous(),
             cols = col_indices.contiguous();
  auto out = at::empty({col_indices.size(0)}, a.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "rosa_kernels::sddmm", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::sddmm<T>(offsets.data_ptr<int32_t>(), order.data_ptr<int32_t>(), cols.data_ptr<int32_t>(),
                   reinterpret_cast<const T*>(a_view.data_ptr<scalar_t>()), a_view.stride(0),
                   a_view.stride(1), reinterpret_cast<const T*>(bt_view.data_ptr<scalar_t>()),
                   bt_view.stride(0), bt_view.stride(1), reinterpret_cast<T*>(out.data_ptr<scalar_t>()),
                   m, bt.size(0), a.size(1), col_indices.size(0), stream.stream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace rosa
