#!/usr/bin/env bash
# The real-data study (python -m rosa_kernels.study, docs/demo.md) on one CUDA GPU, in one device call
# of at most ~9.5 minutes:
#   1. builds rosa_kernels with its CUDA kernels (skip with SKIP_BUILD=1),
#   2. runs the study on the float16 model copy in .model-f16/ (written here beforehand with
#      `python -m rosa_kernels.study --export-model .model-f16`; the GPU machine has transformers but
#      neither the model package nor a network) with a time budget of what the build left,
#   3. prints the Markdown tables LAST (from study.json, which is written after every run: a run cut
#      short still shows what it measured).
# Output in $OUT/study (study.json, study.md, study.png when matplotlib imports), logs in $OUT.
#   bash scripts/gpu_study.sh                      # the device call carries .model-f16
# Knobs (environment): SCRIPT_BUDGET seconds for the whole script (default 560); STUDY_ARGS extra
# arguments for the study (e.g. "--budgets 1,2 --seeds 4"); MODEL_DIR (default .model-f16);
# TORCH_CUDA_ARCH_LIST (default 9.0: H100 / H200 only, the quickest build); PYTHON (default python3);
# STUDY_DEVICE=cpu a dry run of this script without a GPU (with SKIP_BUILD=1 and a tiny STUDY_ARGS).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-gpu_study_logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
started=$SECONDS
budget=${SCRIPT_BUDGET:-560}
# shellcheck source=scripts/gpu_steps.sh
. scripts/gpu_steps.sh

MODEL_DIR=${MODEL_DIR:-.model-f16}
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  echo "no $MODEL_DIR/model.safetensors: run 'python -m rosa_kernels.study --export-model $MODEL_DIR' and carry it"
  exit 1
fi

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${SKIP_BUILD:-}" ]; then
  if ! step build 300 env ROSA_CUDA=ON "$PYTHON" -m pip install --no-build-isolation --no-deps -q .; then
    printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1
  fi
fi
DEVICE=${STUDY_DEVICE:-cuda}
step versions 60 "$PYTHON" -c "
import torch, transformers, rosa_kernels as r
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'torch', torch.__version__,
      'transformers', transformers.__version__, 'rosa_kernels', r.__file__, 'cuda kernels', r.cuda_available())
assert '$DEVICE' != 'cuda' or r.cuda_available(), 'rosa_kernels was built without its CUDA kernels'" || { printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1; }

# The study stops starting runs at its --time-budget; the step's own limit is a backstop.
left=$(( budget - (SECONDS - started) ))
time_budget=$(( left - 30 ))
[ "$time_budget" -gt 60 ] || time_budget=60
echo "study: no run starts that would end after $time_budget s"
# shellcheck disable=SC2086
step study $(( left - 10 > 70 ? left - 10 : 70 )) "$PYTHON" -m rosa_kernels.study --device "$DEVICE" \
  --model-dir "$MODEL_DIR" --out "$LOGS/study" --time-budget "$time_budget" ${STUDY_ARGS:-}

echo "--- summary ($((SECONDS - started)) s in all)"
printf '%s\n' "${SUMMARY[@]}"
if [ -f "$LOGS/study/study.json" ]; then
  "$PYTHON" -m rosa_kernels.study --report "$LOGS/study/study.json" 2>&1 | grep -v '^\[study\] plot'
else
  echo "the study wrote no results"
fi
exit "$status"
