// CUDA SDDMM, first version: one block per CSR row (rows with no nonzeros exit at once), one warp
// per nonzero, each lane striding over k with general element strides. Correct for any layout;
// the fast structured kernels replace it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/sddmm.h"

namespace rosa::cuda {
namespace {

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

template <typename T>
__global__ void sddmm_rows_kernel(const int32_t* __restrict__ row_offsets,
                                  const int32_t* __restrict__ col_indices, const T* __restrict__ a,
                                  int64_t a_row_stride, int64_t a_col_stride,
                                  const T* __restrict__ bt, int64_t bt_row_stride,
                                  int64_t bt_col_stride, T* __restrict__ out, int64_t k) {
  using AccT = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t p = begin + warp; p < end; p += warps) {
    const int64_t col = col_indices[p];
    AccT sum = 0;
    for (int64_t c = lane; c < k; c += 32) {
      sum += static_cast<AccT>(a[row * a_row_stride + c * a_col_stride]) *
             static_cast<AccT>(bt[col * bt_row_stride + c * bt_col_stride]);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[p] = static_cast<T>(sum);
  }
}

}  // namespace

template <typename T>
void sddmm(const int32_t* row_offsets, const int32_t* /*row_indices*/, const int32_t* col_indices,
           const T* a, int64_t a_row_stride, int64_t a_col_stride, const T* bt,
           int64_t bt_row_stride, int64_t bt_col_stride, T* out, int64_t m, int64_t /*n*/,
           int64_t k, int64_t nnz, cudaStream_t stream) {
  if (m == 0 || nnz == 0) return;
  sddmm_rows_kernel<T><<<static_cast<unsigned>(m), 128, 0, stream>>>(
      row_offsets, col_indices, a, a_row_stride, a_col_stride, bt, bt_row_stride, bt_col_stride,
      out, k);
}

#define ROSA_INSTANTIATE_SDDMM(T)                                                              \
  template void sddmm<T>(const int32_t*, const int32_t*, const int32_t*, const T*, int64_t,    \
                         int64_t, const T*, int64_t, int64_t, T*, int64_t, int64_t, int64_t,   \
                         int64_t, cudaStream_t);
ROSA_INSTANTIATE_SDDMM(float)
ROSA_INSTANTIATE_SDDMM(double)
ROSA_INSTANTIATE_SDDMM(__half)
ROSA_INSTANTIATE_SDDMM(__nv_bfloat16)

}  // namespace rosa::cuda
