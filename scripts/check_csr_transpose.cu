// Torch-free check and timing of the CUDA csr_transpose launcher: exact comparison with a CPU
// transpose on random CSR matrices (edge cases, tiles crossed by rows, heavy columns, the sort
// fallback), a determinism check, and CUDA-event times of the launcher alone (workspace allocated
// once, L2 flushed before every repetition) on the issue-6 shapes.
//
// Build (no GPU needed) and run:
//   nvcc -std=c++17 -arch=sm_90 -O3 --expt-relaxed-constexpr -Icsrc scripts/check_csr_transpose.cu \
//       csrc/cuda/csr_transpose.cu -o check_csr_transpose
//   ./check_csr_transpose [--checks-only]     (--checks-only: no timing, e.g. under compute-sanitizer)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/csr_transpose.h"

#define CHECK_CUDA(call)                                                                 \
  do {                                                                                   \
    cudaError_t error = (call);                                                          \
    if (error != cudaSuccess) {                                                          \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(error), __FILE__, __LINE__); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

struct Csr {
  int64_t m = 0, n = 0;
  std::vector<int32_t> row_offsets, col_indices;
  std::vector<float> values;
};

// Each row keeps column j with probability density * weight[j] (weights with mean ~1; skewed like
// RoSA masks when skew > 0), some rows are emptied, one column is full and one row is full.
Csr random_csr(int64_t m, int64_t n, double density, double skew, bool extremes, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform;
  std::vector<double> weight(n);
  double total = 0;
  for (auto& w : weight) total += (w = std::exp(skew * normal(rng)));
  for (auto& w : weight) w *= n / total;
  Csr a;
  a.m = m, a.n = n;
  a.row_offsets.push_back(0);
  for (int64_t i = 0; i < m; ++i) {
    const bool empty = extremes && uniform(rng) < 0.3;
    for (int64_t j = 0; j < n; ++j) {
      const bool full = extremes && (j == n / 3 || i == m / 2);
      if (full || (!empty && uniform(rng) < density * weight[j])) {
        a.col_indices.push_back(static_cast<int32_t>(j));
        a.values.push_back(static_cast<float>(normal(rng) + 0.25));
      }
    }
    a.row_offsets.push_back(static_cast<int32_t>(a.col_indices.size()));
  }
  return a;
}

struct Transposed {
  std::vector<int32_t> row_offsets, col_indices, permutation;
  std::vector<float> values;
  bool operator==(const Transposed& o) const {
    return row_offsets == o.row_offsets && col_indices == o.col_indices &&
           permutation == o.permutation && values == o.values;
  }
};

Transposed cpu_transpose(const Csr& a) {
  const int64_t nnz = a.col_indices.size();
  Transposed t;
  t.row_offsets.assign(a.n + 1, 0);
  for (int32_t j : a.col_indices) ++t.row_offsets[j + 1];
  for (int64_t j = 0; j < a.n; ++j) t.row_offsets[j + 1] += t.row_offsets[j];
  std::vector<int32_t> cursor(t.row_offsets.begin(), t.row_offsets.end() - 1);
  t.col_indices.resize(nnz), t.permutation.resize(nnz), t.values.resize(nnz);
  for (int64_t i = 0; i < a.m; ++i) {
    for (int32_t p = a.row_offsets[i]; p < a.row_offsets[i + 1]; ++p) {
      const int32_t q = cursor[a.col_indices[p]]++;
      t.col_indices[q] = static_cast<int32_t>(i), t.permutation[q] = p, t.values[q] = a.values[p];
    }
  }
  return t;
}

struct DeviceCase {
  int64_t m, n, nnz;
  float *values, *values_t;
  int32_t *row_offsets, *col_indices, *row_offsets_t, *col_indices_t, *permutation;
  void* workspace;
  size_t workspace_bytes;

  explicit DeviceCase(const Csr& a) : m(a.m), n(a.n), nnz(a.col_indices.size()) {
    const size_t count = std::max<int64_t>(1, nnz);
    CHECK_CUDA(cudaMalloc(&values, count * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&values_t, count * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&col_indices, count * sizeof(int32_t)));
    CHECK_CUDA(cudaMalloc(&col_indices_t, count * sizeof(int32_t)));
    CHECK_CUDA(cudaMalloc(&permutation, count * sizeof(int32_t)));
    CHECK_CUDA(cudaMalloc(&row_offsets, (m + 1) * sizeof(int32_t)));
    CHECK_CUDA(cudaMalloc(&row_offsets_t, (n + 1) * sizeof(int32_t)));
    workspace_bytes = rosa::cuda::csr_transpose_workspace_bytes(nnz, n);
    CHECK_CUDA(cudaMalloc(&workspace, std::max<size_t>(16, workspace_bytes)));
    CHECK_CUDA(cudaMemcpy(values, a.values.data(), nnz * sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(col_indices, a.col_indices.data(), nnz * sizeof(int32_t), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(row_offsets, a.row_offsets.data(), (m + 1) * sizeof(int32_t), cudaMemcpyHostToDevice));
  }
  ~DeviceCase() {
    for (void* p : {(void*)values, (void*)values_t, (void*)col_indices, (void*)col_indices_t,
                    (void*)permutation, (void*)row_offsets, (void*)row_offsets_t, workspace}) {
      cudaFree(p);
    }
  }
  void run(cudaStream_t stream) {
    rosa::cuda::csr_transpose<float>(values, row_offsets, col_indices, m, n, nnz, values_t,
                                     row_offsets_t, col_indices_t, permutation, workspace,
                                     workspace_bytes, stream);
  }
  Transposed result() {
    Transposed t;
    t.row_offsets.resize(n + 1), t.col_indices.resize(nnz), t.permutation.resize(nnz), t.values.resize(nnz);
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaMemcpy(t.row_offsets.data(), row_offsets_t, (n + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(t.col_indices.data(), col_indices_t, nnz * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(t.permutation.data(), permutation, nnz * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(t.values.data(), values_t, nnz * sizeof(float), cudaMemcpyDeviceToHost));
    return t;
  }
};

int main(int argc, char** argv) {
  const bool checks_only = argc > 1 && std::string(argv[1]) == "--checks-only";
  std::mt19937_64 rng(12345);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  struct Shape { int64_t m, n; double density, skew; bool extremes; };
  const Shape checks[] = {
      {1, 1, 1.0, 0, false},     {1, 9, 0.5, 0, false},      {9, 1, 0.5, 0, false},
      {13, 17, 0.2, 0, true},    {0, 5, 0.5, 0, false},      {5, 0, 0.5, 0, false},
      {64, 96, 0.7, 0, true},    {300, 500, 0.1, 0, true},   {97, 4099, 0.05, 0, true},
      {5000, 7, 0.6, 0, true},   {20000, 3, 0.1, 0, true},   {40, 70000, 0.003, 0, true},
      {8, 65536, 0.8, 0, false}, {1000, 1000, 0.01, 2.5, true}, {4096, 4096, 0.01, 2.5, false},
      {4096, 11008, 0.003, 2.5, true}, {2, 3000, 1.0, 0, false}, {700000, 2, 0.004, 0, false},
      {2000, 3000, 0.05, 2.5, true}, {100, 30000, 0.067, 0, false}, {800, 1000, 0.5, 0, true},
  };
  int failures = 0;
  for (const Shape& s : checks) {
    const Csr a = random_csr(s.m, s.n, s.density, s.skew, s.extremes, rng);
    DeviceCase d(a);
    d.run(stream);
    const Transposed got = d.result();
    d.run(stream);
    const bool same_again = d.result() == got;
    const bool ok = got == cpu_transpose(a) && same_again;
    failures += !ok;
    std::printf("check %lldx%lld nnz %lld workspace %zu B: %s\n", (long long)s.m, (long long)s.n,
                (long long)d.nnz, d.workspace_bytes, ok ? "ok" : "MISMATCH");
  }

  if (checks_only) {
    std::printf("%s\n", failures ? "FAILED" : "ALL OK");
    return failures ? 1 : 0;
  }

  // Timing: the launcher alone, L2 flushed by a 256 MB memset before every repetition.
  void* flush;
  CHECK_CUDA(cudaMalloc(&flush, 256 << 20));
  cudaEvent_t start, end;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&end));
  const int64_t shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  for (auto& shape : shapes) {
    for (double density : {0.001, 0.003, 0.01, 0.03}) {
      const Csr a = random_csr(shape[0], shape[1], density, 2.5, false, rng);
      DeviceCase d(a);
      std::vector<float> flushed, warm;
      for (int rep = 0; rep < 30; ++rep) {
        CHECK_CUDA(cudaMemsetAsync(flush, rep, 256 << 20, stream));
        CHECK_CUDA(cudaEventRecord(start, stream));
        d.run(stream);
        CHECK_CUDA(cudaEventRecord(end, stream));
        CHECK_CUDA(cudaEventSynchronize(end));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, end));
        if (rep >= 3) flushed.push_back(ms * 1000);
      }
      for (int rep = 0; rep < 30; ++rep) {
        CHECK_CUDA(cudaEventRecord(start, stream));
        d.run(stream);
        CHECK_CUDA(cudaEventRecord(end, stream));
        CHECK_CUDA(cudaEventSynchronize(end));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, end));
        warm.push_back(ms * 1000);
      }
      std::sort(flushed.begin(), flushed.end());
      std::sort(warm.begin(), warm.end());
      const bool ok = d.result() == cpu_transpose(a);
      failures += !ok;
      std::printf("time %lldx%lld d %.3f nnz %lld: %.1f us (L2 flushed), %.1f us (warm)%s\n",
                  (long long)shape[0], (long long)shape[1], density, (long long)d.nnz,
                  flushed[flushed.size() / 2], warm[warm.size() / 2], ok ? "" : " MISMATCH");
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "ALL OK");
  return failures ? 1 : 0;
}
