#!/usr/bin/env bash
# The GPU check, run on a CUDA machine from the repository root (under 10 minutes):
#   1. installs peft and bitsandbytes from .whl/ when carried there, and builds rosa_kernels with its
#      CUDA kernels (pip install --no-build-isolation --no-deps .),
#   2. runs the whole test suite on the GPU,
#   3. runs compute-sanitizer --tool memcheck over the tests marked `sanitizer`,
#   4. prints the GPU benchmark table (bench/report.py),
#   5. prints a short summary last.
# Logs go to $OUT (or ./gpu_check_logs). Environment: PYTHON (default python3), SKIP_BENCH=1,
# SKIP_SANITIZER=1, SKIP_TESTS=1, TESTS (what step 2 runs, default "tests"; e.g. "tests/test_plan.py
# tests/test_masks.py"), PYTEST_ARGS (extra arguments for step 2), TESTS_TIMEOUT (default 480 s).
# Time on an H100 machine (2026-12-07): build 68 s, the whole suite ~8 minutes (4,075 tests), the
# sanitizer subset ~40 s, the TORCH_CUDA_ARCH_LIST="8.0;9.0" wheel of ARCH_CHECK=1 ~3 minutes. A
# device call may run 10 minutes, so run the suite in one call (SKIP_SANITIZER=1 SKIP_BENCH=1) and
# the rest in another (SKIP_TESTS=1), or narrow the suite with PYTEST_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-gpu_check_logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
# shellcheck source=scripts/gpu_steps.sh
. scripts/gpu_steps.sh
# peft and bitsandbytes from the wheels in .whl/ where they are carried (else their tests skip)
install_peft
install_bitsandbytes

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if ! step build 300 env ROSA_CUDA=ON "$PYTHON" -m pip install --no-build-isolation --no-deps -q .; then
  printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1
fi
# Which GPU code the build holds (SASS per arch, PTX); ARCH_CHECK=1 also builds a wheel with
# TORCH_CUDA_ARCH_LIST="8.0;9.0" and lists it.
if command -v cuobjdump >/dev/null; then
  step archs 60 bash scripts/list_cuda_archs.sh "$("$PYTHON" -c "import rosa_kernels._C as c; print(c.__file__)")"
  if [ -n "${ARCH_CHECK:-}" ]; then
    wheels=$(mktemp -d)
    step archs-8.0-9.0 300 bash -c "TORCH_CUDA_ARCH_LIST='8.0;9.0' ROSA_CUDA=ON $PYTHON -m pip wheel -q \
      --no-build-isolation --no-deps . -w $wheels && cd $wheels && $PYTHON -m zipfile -e *.whl x && \
      bash $PWD/scripts/list_cuda_archs.sh x/rosa_kernels/_C*.so"
  fi
fi
step cuda-visible 60 "$PYTHON" -c "import torch, rosa_kernels as r; assert r.cuda_available(), 'CUDA kernels not available'; print(torch.cuda.get_device_name(), torch.__version__, 'cuda_built', r.cuda_built())"
if [ -z "${SKIP_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  step tests "${TESTS_TIMEOUT:-480}" "$PYTHON" -m pytest ${TESTS:-tests} -q --maxfail=30 -p no:cacheprovider ${PYTEST_ARGS:-}
  tests_line=$(grep -E "passed|failed|error" "$LOGS/tests.log" | tail -1)
fi
if [ -z "${SKIP_SANITIZER:-}" ]; then
  if command -v compute-sanitizer >/dev/null; then
    # PyTorch's caching allocator hides out-of-bounds accesses inside its own blocks: turn it off.
    step sanitizer 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --error-exitcode 99 --print-limit 20 "$PYTHON" -m pytest tests -q -m sanitizer -p no:cacheprovider
  else
    SUMMARY+=("sanitizer: skipped (compute-sanitizer not found)")
  fi
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  step bench 300 "$PYTHON" bench/report.py --device cuda --out "$LOGS/bench"
fi
echo "--- summary"
printf '%s\n' "${SUMMARY[@]}"
[ -n "${tests_line:-}" ] && echo "tests: $tests_line"
exit "$status"
