#!/usr/bin/env bash
# Compiles every torch-free CUDA kernel source for sm_90, compile only (no GPU needed), so a change
# that breaks CUDA code fails CI. Prints the register/spill report with -v.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_compiles: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "check_cuda_compiles: no CUDA sources"; exit 0; fi
out=$(mktemp -d)
for src in "${sources[@]}"; do
  nvcc -std=c++17 -arch=sm_90 -O3 --expt-relaxed-constexpr -Icsrc -c "$src" -o "$out/$(basename "$src").o" \
    ${VERBOSE:+-Xptxas -v}
  echo "check_cuda_compiles: $src OK"
done
rm -rf "$out"
