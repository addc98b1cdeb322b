// CUDA implementations of the rosa_kernels op schemas (declared in ops.cpp).
//
// The same argument checks as the CPU registration (checks.h: check_spmm, ...), then: a device
// guard for the operands' GPU, the current PyTorch stream, a dispatch of the value dtype onto the
// CUDA type (c10::Half -> __half, c10::BFloat16 -> __nv_bfloat16) and a call of the torch-free
// launcher in cuda/. Nothing here reads tensor contents or synchronizes: outputs are sized from
// shapes alone.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_values.h"
#include "cuda/csr_add.h"
#include "cuda/csr_transpose.h"
#include "cuda/sddmm.h"
#include "cuda/spmm.h"

namespace rosa {
namespace {

// The dispatcher picked this implementation because some operand is a CUDA tensor; the checks of
// checks.h then put every operand on the reference's device, so this one check covers them all.
void check_cuda(const at::Tensor& t, const char* name) {
  ROSA_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor like the other operands, got ",
                   t.device());
}

// ROSA_SPMM_KERNEL=rows|rows2|slab32|slab16|dense forces one SpMM kernel or the dense path (for
// measurements and tests); ROSA_SDDMM_KERNEL=sparse|dense forces one SDDMM path. Default: auto.
cuda::SpmmKernel spmm_kernel_choice() {
  const char* choice = std::getenv("ROSA_SPMM_KERNEL");
  if (choice == nullptr) return cuda::SpmmKernel::kAuto;
  if (std::strcmp(choice, "slab32") == 0) return cuda::SpmmKernel::kSlab32;
  if (std::strcmp(choice, "slab16") == 0) return cuda::SpmmKernel::kSlab16;
  if (std::strcmp(choice, "rows") == 0) return cuda::SpmmKernel::kRows;
  if (std::strcmp(choice, "rows2") == 0) return cuda::SpmmKernel::kRows2;
  return cuda::SpmmKernel::kAuto;
}

bool env_is(const char* name, const char* value) {
  const char* choice = std::getenv(name);
  return choice != nullptr && std::strcmp(choice, value) == 0;
}

// The dense paths run cuBLAS through at::mm, under torch's global matmul settings. By default
// those let cuBLAS add split-K partial sums in bf16 / fp16 (allow_bf16_reduced_precision_reduction),
// and a user may ask for fp16 accumulation: measured 13x the error of float32 accumulation on a
// 512 x 700 x 300 product. The ops promise float32 accumulation, so while this guard lives those
// settings are the strict ones; the previous ones come back after. A mutex keeps two threads'
// save / restore from interleaving (other threads' matmuls meanwhile only gain precision).
class StrictCublasReductions {
 public:
  StrictCublasReductions() : lock_(mutex()) {
    auto& context = at::globalContext();
    bf16_ = context.allowBF16ReductionCuBLAS();
    fp16_ = context.allowFP16ReductionCuBLAS();
    fp16_accumulation_ = context.allowFP16AccumulationCuBLAS();
    context.setAllowBF16ReductionCuBLAS(false, allows_split_k(bf16_));
    context.setAllowFP16ReductionCuBLAS(false, allows_split_k(fp16_));
    context.setAllowFP16AccumulationCuBLAS(false);
  }
  ~StrictCublasReductions() {
    auto& context = at::globalContext();
    context.setAllowBF16ReductionCuBLAS(allows_reduced(bf16_), allows_split_k(bf16_));
    context.setAllowFP16ReductionCuBLAS(allows_reduced(fp16_), allows_split_k(fp16_));
    context.setAllowFP16AccumulationCuBLAS(fp16_accumulation_);
  }
  StrictCublasReductions(const StrictCublasReductions&) = delete;
  StrictCublasReductions& operator=(const StrictCublasReductions&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex instance;
    return instance;
  }
  static bool allows_reduced(at::CuBLASReductionOption option) {
    return option == at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK;
  }
  static bool allows_split_k(at::CuBLASReductionOption option) {
    return option != at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK;
  }
  std::lock_guard<std::mutex> lock_;
  at::CuBLASReductionOption bf16_{}, fp16_{};
  bool fp16_accumulation_ = false;
};

// The dense paths bound their m x n temporary by working on row chunks of this many bytes.
constexpr int64_t kDenseChunkBytes = int64_t(256) << 20;

int64_t dense_chunk_rows(int64_t n, int64_t element_size) {
  return std::max<int64_t>(1, kDenseChunkBytes / std::max<int64_t>(1, n * element_size));
}

// out = A @ dense through one GEMM per row chunk: the chunk of A written densely (zeros, then
// csr_add), then cuBLAS. Chosen where the sparse kernels' L2 traffic costs more (d >~ 1.1% for
// bf16 at LLaMA shapes; spmm_dense_is_faster).
void spmm_dense_path(const at::Tensor& vals, const Csr& csr, const at::Tensor& dense,
                     at::Tensor& out) {
  const int64_t m = out.size(0), n = dense.size(0), nnz = vals.size(0);
  const int64_t chunk = dense_chunk_rows(n, vals.element_size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const StrictCublasReductions strict;
  for (int64_t first = 0; first < m; first += chunk) {
    const int64_t rows = std::min(chunk, m - first);
    auto a_rows = at::zeros({rows, n}, dense.options());
    ROSA_DISPATCH_VALUES(vals.scalar_type(), "rosa_kernels::spmm", [&] {
      cuda::csr_add(cuda_ptr<scalar_t>(vals), csr.row_offsets.const_data_ptr<int32_t>() + first,
                    csr.col_indices.const_data_ptr<int32_t>(), cuda_mutable_ptr<scalar_t>(a_rows),
                    n, rows, nnz, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto out_rows = out.narrow(0, first, rows);
    at::mm_out(out_rows, a_rows, dense);
  }
}

at::Tensor spmm_cuda(const at::Tensor& values, const at::Tensor& row_offsets,
                     const at::Tensor& row_indices, const at::Tensor& col_indices,
                     const at::Tensor& dense, int64_t m) {
  const Csr csr = check_spmm(values, row_offsets, row_indices, col_indices, dense, m);
  check_cuda(values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  const auto &offsets = csr.row_offsets, &order = csr.row_indices, &cols = csr.col_indices;
  const auto vals = values.contiguous();
  auto out = at::empty({m, dense.size(1)}, dense.options());
  if (out.numel() == 0) return out;
  const int64_t n = dense.size(0), k = dense.size(1), nnz = vals.size(0);
  const auto requested = spmm_kernel_choice();
  if (env_is("ROSA_SPMM_KERNEL", "dense") ||
      (requested == cuda::SpmmKernel::kAuto &&
       cuda::spmm_dense_is_faster(m, n, k, nnz, static_cast<int>(values.element_size())))) {
    spmm_dense_path(vals, csr, dense, out);  // cuBLAS takes `dense` with any strides
    return out;
  }
  const auto dense_rows = rows_contiguous(dense);
  const auto kernel = cuda::spmm_select(requested, m, n, k, nnz,
                                        static_cast<int>(values.element_size()));
  const size_t workspace_bytes =
      cuda::spmm_workspace_bytes(kernel, m, nnz, static_cast<int>(values.element_size()));
  auto workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, values.options().dtype(at::kByte));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::spmm", [&] {
    cuda::spmm(cuda_ptr<scalar_t>(vals), offsets.const_data_ptr<int32_t>(),
               order.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(),
               cuda_ptr<scalar_t>(dense_rows), dense_rows.stride(0), cuda_mutable_ptr<scalar_t>(out),
               m, n, k, nnz, kernel, workspace.mutable_data_ptr(), workspace_bytes, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The SDDMM launcher reads each operand through (row, column) element strides; an operand with no
// unit stride in either dimension is copied first.
at::Tensor strided_operand(const at::Tensor& t) {
  if (t.stride(0) == 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

// out[p] = (a @ bt^T)[i, j] through one cuBLAS GEMM per row chunk, then a gather. Chosen at
// d >= 0.5% for bf16 / fp16 (sddmm_dense_is_faster), where the sparse kernel is slower.
void sddmm_dense_path(const Csr& csr, const at::Tensor& a, const at::Tensor& bt, at::Tensor& out) {
  const int64_t m = a.size(0), n = bt.size(0);
  const int64_t chunk = dense_chunk_rows(n, a.element_size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const StrictCublasReductions strict;
  for (int64_t first = 0; first < m; first += chunk) {
    const int64_t rows = std::min(chunk, m - first);
    const auto product = at::mm(a.narrow(0, first, rows), bt.t());
    ROSA_DISPATCH_VALUES(a.scalar_type(), "rosa_kernels::sddmm", [&] {
      cuda::sddmm_gather(cuda_ptr<scalar_t>(product), product.stride(0),
                         csr.row_offsets.const_data_ptr<int32_t>() + first,
                         csr.col_indices.const_data_ptr<int32_t>(),
                         cuda_mutable_ptr<scalar_t>(out), rows, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor sddmm_cuda(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                      const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  const Csr csr = check_sddmm(row_offsets, row_indices, col_indices, a, bt);
  check_cuda(a, "a");
  const int64_t m = a.size(0);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto &offsets = csr.row_offsets, &order = csr.row_indices, &cols = csr.col_indices;
  const int64_t nnz = cols.size(0);
  auto out = at::empty({nnz}, a.options());
  if (nnz == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = bt.size(0), k = a.size(1);
  const bool dense_path =
      env_is("ROSA_SDDMM_KERNEL", "dense") ||
      (!env_is("ROSA_SDDMM_KERNEL", "sparse") &&
       cuda::sddmm_dense_is_faster(m, n, k, nnz, static_cast<int>(a.element_size())));
  if (dense_path) {
    sddmm_dense_path(csr, a, bt, out);  // cuBLAS takes `a` and `bt` with any strides
    return out;
  }
  const auto a_op = strided_operand(a), bt_op = strided_operand(bt);
  ROSA_DISPATCH_VALUES(a.scalar_type(), "rosa_kernels::sddmm", [&] {
    using cuda_t = typename CudaValue<scalar_t>::type;
    // The split-token partial sums come from torch's caching allocator (no cudaMalloc per call).
    const size_t workspace_bytes =
        cuda::sddmm_workspace_bytes<cuda_t>(m, bt.size(0), a.size(1), nnz);
    at::Tensor workspace;
    if (workspace_bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, a.options().dtype(at::kByte));
    }
    cuda::sddmm(offsets.const_data_ptr<int32_t>(), order.const_data_ptr<int32_t>(),
                cols.const_data_ptr<int32_t>(), cuda_ptr<scalar_t>(a_op), a_op.stride(0),
                a_op.stride(1), cuda_ptr<scalar_t>(bt_op), bt_op.stride(0), bt_op.stride(1),
                cuda_mutable_ptr<scalar_t>(out), m, bt.size(0), a.size(1), nnz,
                workspace_bytes > 0 ? workspace.data_ptr() : nullptr, workspace_bytes, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_transpose_cuda(
    const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    int64_t m, int64_t n) {
  const Csr csr = check_csr_transpose(values, row_offsets, col_indices, m, n);
  check_cuda(values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t nnz = values.size(0);
  const auto &offsets = csr.row_offsets, &cols = csr.col_indices;
  const auto vals = values.contiguous();
  auto values_t = at::empty({nnz}, values.options());
  auto row_offsets_t = at::empty({n + 1}, offsets.options());
  auto col_indices_t = at::empty({nnz}, cols.options());
  auto permutation = at::empty({nnz}, cols.options());
  const size_t workspace_bytes = cuda::csr_transpose_workspace_bytes(nnz, n);
  auto workspace = at::empty({static_cast<int64_t>(workspace_bytes)},
                             values.options().dtype(at::kByte));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::csr_transpose", [&] {
    cuda::csr_transpose(cuda_ptr<scalar_t>(vals), offsets.const_data_ptr<int32_t>(),
                        cols.const_data_ptr<int32_t>(), m, n, nnz,
                        cuda_mutable_ptr<scalar_t>(values_t),
                        row_offsets_t.mutable_data_ptr<int32_t>(),
                        col_indices_t.mutable_data_ptr<int32_t>(),
                        permutation.mutable_data_ptr<int32_t>(), workspace.mutable_data_ptr(),
                        workspace_bytes, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values_t, row_offsets_t, col_indices_t, permutation};
}

// dense += A for a dense whose rows are contiguous; `csr` holds the checked int32 indices.
void csr_add_into(const at::Tensor& values, const Csr& csr, const at::Tensor& dense) {
  const c10::cuda::CUDAGuard guard(values.device());
  const auto &offsets = csr.row_offsets, &cols = csr.col_indices;
  const auto vals = values.contiguous();
  if (dense.numel() == 0 || vals.size(0) == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ROSA_DISPATCH_VALUES(values.scalar_type(), "rosa_kernels::csr_add_", [&] {
    cuda::csr_add(cuda_ptr<scalar_t>(vals), offsets.const_data_ptr<int32_t>(),
                  cols.const_data_ptr<int32_t>(), cuda_mutable_ptr<scalar_t>(dense),
                  dense.stride(0), dense.size(0), vals.size(0), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void csr_add_inplace_cuda(const at::Tensor& values, const at::Tensor& row_offsets,
                          const at::Tensor& row_indices, const at::Tensor& col_indices,
                          const at::Tensor& dense) {
  const Csr csr = check_csr_add_inplace(values, row_offsets, row_indices, col_indices, dense);
  check_cuda(values, "values");
  csr_add_into(values, csr, dense);
}

at::Tensor csr_add_cuda(const at::Tensor& values, const at::Tensor& row_offsets,
                        const at::Tensor& row_indices, const at::Tensor& col_indices,
                        const at::Tensor& dense) {
  const Csr csr = check_csr_add(values, row_offsets, row_indices, col_indices, dense);
  check_cuda(values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty(dense.sizes(), dense.options());  // contiguous
  out.copy_(dense);
  csr_add_into(values, csr, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("csr_transpose", &csr_transpose_cuda);
  m.impl("csr_add", &csr_add_cuda);
  m.impl("csr_add_", &csr_add_inplace_cuda);
}

}  // namespace rosa
