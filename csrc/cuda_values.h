// The CUDA value type of a c10 scalar type (same size and bit layout), and typed data pointers of a
// tensor as that type: what the CUDA binding layers (ops_cuda.cpp, lora_dropout_ops_cuda.cpp) hand
// to the torch-free launchers in cuda/.
#pragma once

#include <ATen/ATen.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rosa {

template <typename S>
struct CudaValue { using type = S; };
template <>
struct CudaValue<c10::Half> { using type = __half; };
template <>
struct CudaValue<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename S>
const typename CudaValue<S>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaValue<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
typename CudaValue<S>::type* cuda_mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaValue<S>::type*>(t.mutable_data_ptr<S>());
}

}  // namespace rosa
