// Launchers of the CUDA kernels of RosaLinear's LoRA dropout (torch-free; see cuda/lora_dropout.cu).
// T is float, double, __half or __nv_bfloat16; rows have unit column stride and row stride ld*.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dropout_keep.h"

namespace rosa::cuda {

// out = X ∘ keep
template <typename T>
void lora_dropout_apply(const T* x, int64_t ldx, T* out, int64_t ldo, int64_t tokens, int64_t n, DropoutKey key,
                        cudaStream_t stream);

// dX += alpha * keep ∘ G
template <typename T>
void lora_dropout_add(T* dx, int64_t lddx, const T* g, int64_t ldg, int64_t tokens, int64_t n, double alpha,
                      DropoutKey key, cudaStream_t stream);

// Fused with the rank-sized products on tensor cores (cuda/lora_dropout_mma.cu): T is __half or
// __nv_bfloat16, lora_A (rank x n) contiguous, g (tokens x rank) with row stride ldg and unit
// column stride. Launch only where lora_dropout_mma_supported(rank) holds for the current device.
bool lora_dropout_mma_supported(int64_t rank);

// h (tokens x rank, contiguous) = (X ∘ keep) A^T
template <typename T>
void lora_dropout_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t tokens, int64_t n, int64_t rank,
                          DropoutKey key, cudaStream_t stream);

// dX += alpha * keep ∘ (G A)
template <typename T>
void lora_dropout_addmm(T* dx, int64_t lddx, const T* g, int64_t ldg, const T* lora_A, int64_t tokens, int64_t n,
                        int64_t rank, double alpha, DropoutKey key, cudaStream_t stream);

// dA (rank x n, contiguous) = alpha * G^T (X ∘ keep), G (tokens x rank): the token range cut into
// `splits` (lora_dropout_grad_A_splits) whose float32 partials go to `partial` (splits x rank x n),
// then added in order. tokens may be 0 (dA = 0).
int64_t lora_dropout_grad_A_splits(int64_t tokens, int64_t n);
template <typename T>
void lora_dropout_grad_A(const T* x, int64_t ldx, const T* g, int64_t ldg, T* out, float* partial, int64_t splits,
                         int64_t tokens, int64_t n, int64_t rank, double alpha, DropoutKey key, cudaStream_t stream);

}  // namespace rosa::cuda
