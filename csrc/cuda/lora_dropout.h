// Launchers of the CUDA kernels of RosaLinear's fused LoRA dropout (torch-free; see
// cuda/lora_dropout.cu for the math and the work split). T is float, double, __half or
// __nv_bfloat16. X and dX have unit column stride and row stride ld*; A (R x N) and G (T x R) are
// contiguous.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dropout_keep.h"

namespace rosa::cuda {

template <typename T>
void lora_dropout_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t tokens, int64_t n,
                          int64_t rank, DropoutKey key, cudaStream_t stream);

// Bytes of float32 (float64 for double) workspace that lora_dropout_grad_A needs; 0 if none.
template <typename T>
size_t lora_dropout_grad_A_workspace_bytes(int64_t tokens, int64_t n, int64_t rank);

template <typename T>
void lora_dropout_grad_A(const T* g, const T* x, int64_t ldx, T* grad_A, int64_t tokens, int64_t n,
                         int64_t rank, double alpha, DropoutKey key, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

template <typename T>
void lora_dropout_grad_x(T* dx, int64_t lddx, const T* g, const T* lora_A, int64_t tokens, int64_t n,
                         int64_t rank, double alpha, DropoutKey key, cudaStream_t stream);

}  // namespace rosa::cuda
