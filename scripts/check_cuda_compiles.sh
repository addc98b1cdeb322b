#!/usr/bin/env bash
# Compiles every torch-free CUDA kernel source for the GPU generations users have (ARCHS, default
# sm_80 A100, 86 A10/RTX 30xx, 89 L4/RTX 40xx, 90 H100/H200, 100 B200), compile only (no GPU
# needed), so a change that breaks CUDA code on any of them fails CI. With VERBOSE=1 prints the
# register/spill report.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_compiles: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "check_cuda_compiles: no CUDA sources"; exit 0; fi
read -r -a archs <<< "${ARCHS:-80 86 89 90 100}"
gencode=()
for arch in "${archs[@]}"; do gencode+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
out=$(mktemp -d)
pids=()
for src in "${sources[@]}"; do  # two at a time (CI has 2 cores)
  nvcc -std=c++17 "${gencode[@]}" -O3 --expt-relaxed-constexpr -Icsrc -c "$src" -o "$out/$(basename "$src").o" \
    ${VERBOSE:+-Xptxas -v} &
  pids+=("$!:$src")
  if [ ${#pids[@]} -ge 2 ]; then
    entry=${pids[0]}; pids=("${pids[@]:1}")
    wait "${entry%%:*}" || { echo "check_cuda_compiles: ${entry#*:} FAILED"; exit 1; }
    echo "check_cuda_compiles: ${entry#*:} OK (sm_${archs[*]})"
  fi
done
for entry in "${pids[@]}"; do
  wait "${entry%%:*}" || { echo "check_cuda_compiles: ${entry#*:} FAILED"; exit 1; }
  echo "check_cuda_compiles: ${entry#*:} OK (sm_${archs[*]})"
done
rm -rf "$out"

# The CUDA binding layers (csrc/*_cuda.cpp) need torch's headers: syntax-check them with the CPU torch's headers when a
# Python with torch is at hand (PYTHON, default python3). A CPU wheel lacks one generated header,
# which a stub replaces.
PYTHON=${PYTHON:-python3}
if torch_include=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
  stub=$(mktemp -d)
  mkdir -p "$stub/c10/cuda/impl" && touch "$stub/c10/cuda/impl/cuda_cmake_macros.h"
  # nvcc may be a wrapper script: ask it where its headers are.
  cuda_include=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="\?-I\([^" ]*\).*/\1/p' | head -1)
  [ -f "$cuda_include/cuda_runtime_api.h" ] || cuda_include=${CUDA_HOME:-/usr/local/cuda}/include
  for binding in csrc/*_cuda.cpp; do
    g++ -std=c++17 -fsyntax-only -w -I"$stub" -I"$torch_include" -I"$torch_include/torch/csrc/api/include" \
      -I"$cuda_include" -Icsrc "$binding"
    echo "check_cuda_compiles: $binding OK (syntax, against torch's headers)"
  done
  rm -rf "$stub"
else
  echo "check_cuda_compiles: no torch for $PYTHON, skipping the syntax check of csrc/*_cuda.cpp"
fi
