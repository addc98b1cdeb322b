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

}  // namespace rosa::cuda
