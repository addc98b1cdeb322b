// Checks shared by the CPU and CUDA registrations of the LoRA dropout ops.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "dropout_keep.h"

namespace rosa {

// The dropout key of a one-element int64 seed tensor and a drop probability p in [0, 1), for inputs
// on `device`: a CPU seed is read here; a seed on the (CUDA) input's device is read by the kernel.
DropoutKey check_dropout_key(const at::Tensor& seed, double p, const at::Device& device);

// dx (2-D, floating, unit column stride) and g of the same shape, dtype and device.
void check_dropout_add(const at::Tensor& dx, const at::Tensor& g);

// The operands of lora_dropout_project: x (T x N) and lora_A (R x N), floating, one dtype and device.
void check_dropout_project(const at::Tensor& x, const at::Tensor& lora_A);

// The operands of lora_dropout_addmm_: dx (T x N, unit column stride), g (T x R), lora_A (R x N).
void check_dropout_addmm(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A);

// The operands of lora_dropout_grad_A: x (T x N) and g (T x R), floating, one dtype and device.
void check_dropout_grad_A(const at::Tensor& x, const at::Tensor& g);

// A dropout seed for an eager call on a CUDA device, drawn on the host (no kernel): set by the CUDA
// build (lora_dropout_ops_cuda.cpp); it returns nothing while the device's
// current stream is being captured into a CUDA graph, where the seed must be drawn on the device so
// that each replay draws a new one.
using CudaHostSeed = std::optional<int64_t> (*)(c10::DeviceIndex device);
void set_cuda_host_seed(CudaHostSeed draw);
CudaHostSeed cuda_host_seed();

}  // namespace rosa
