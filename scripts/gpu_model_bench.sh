#!/usr/bin/env bash
# The model training-step benchmark on one CUDA GPU, in one go (about 6-8 minutes on an H100):
#   1. installs peft (and bitsandbytes, when its wheel is there) from .whl/ (no network needed;
#      transformers must already be installed),
#   2. builds rosa_kernels with its CUDA kernels (pip install --no-build-isolation --no-deps .),
#   3. runs `python bench/report.py --model --device cuda` (bench/model_step.py): full FT / PEFT LoRA /
#      RoSA on HF Llama models, RoSA's phases, torch.compile(mode="reduce-overhead") rows, and PEFT QLoRA /
#      QRoSA on a 4-bit base where bitsandbytes imports,
#   4. prints a short summary table LAST.
# Writes $OUT/model/model_step.json and model_step.md (the Markdown tables) and logs to $OUT (or
# ./gpu_model_bench_logs). Run from the repository root, with the peft wheel in .whl/:
#   bash scripts/gpu_model_bench.sh
# Knobs (environment):
#   MODEL_SHAPES    7b-slice,tinyllama (also: tiny)          MODEL_BATCHES  1,4 (sequences of 2048 per step)
#   MODEL_METHODS   all of bench/model_step.py's ALL_METHODS: full,lora,rosa,rosa-structured,rosa-warmup,rosa-warmup-end,
#                   rosa-collect,rosa-collect-8,rosa-first-sparse,full+compile,lora+compile,rosa+compile,
#                   qlora,qrosa,qrosa-spmm (the last three by default only where bitsandbytes imports)
#   MODEL_COMPILE   the SHAPE:TOKENS cases that get the compiled rows (default 7b-slice:2048; "none": no
#                   compiled rows; "all": every case). Compiled rows run after every eager row.
#   MODEL_STEPS     WARMUP,TIMED,PHASE_TIMED steps per row (default 3,5,3: few steps to fit the budget)
#   MODEL_KV_HEADS  key/value heads (default: as many as heads, LlamaConfig's default)
#   MODEL_TIME_LIMIT seconds after which the cases not yet started are skipped (default: what the
#                   script's budget leaves after the build, less 150 s for a compile pass in progress)
#   SCRIPT_BUDGET   seconds for the whole script (default 560: a device call may run 10 minutes); the
#                   sweep is stopped when it would overrun it, keeping the rows measured so far
#   PROFILES=1      first run bench/report.py --profile-collect (the collection step by stage) and
#                   --profile-step (kernel time by class; PROFILE_STEP_ARGS, default TinyLlama at 8192
#                   tokens, full / RoSA warm-up / RoSA); their summaries print last
#   SKIP_BUILD=1    use the rosa_kernels already installed;  PYTHON (default python3)
#   MODEL_DEVICE=cpu a dry run of this script without a GPU (with MODEL_SHAPES=tiny SKIP_BUILD=1)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-gpu_model_bench_logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
started=$SECONDS
# shellcheck source=scripts/gpu_steps.sh
. scripts/gpu_steps.sh

# 1. peft (and safetensors where missing) from the wheels carried in .whl/
install_peft
install_bitsandbytes  # the QLoRA / QRoSA rows, where .whl/ holds its wheel

# 2. rosa_kernels with the CUDA kernels
if ! build_rosa 360; then
  printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1
fi
# Import rosa_kernels from site-packages (the build), bench/ from the repository root.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step versions 60 "$PYTHON" -c "
import torch, transformers, peft, rosa_kernels as r
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'rosa_kernels', r.__file__, 'cuda kernels', r.cuda_available())
assert '${MODEL_DEVICE:-cuda}' != 'cuda' or r.cuda_available(), 'rosa_kernels was built without its CUDA kernels'" || { printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1; }

# 2b. PROFILES=1: where the collection step's time goes and a step's kernel time by class, first
if [ -n "${PROFILES:-}" ]; then
  step profile-collect 120 "$PYTHON" bench/report.py --profile-collect --device "${MODEL_DEVICE:-cuda}" --top 20
  step profile-step 120 "$PYTHON" bench/report.py --profile-step --device "${MODEL_DEVICE:-cuda}" \
    ${PROFILE_STEP_ARGS:---shape tinyllama --batch 4 --methods full,rosa-warmup,rosa}
fi

# 3. the sweep
compile_args=()
case "${MODEL_COMPILE:-7b-slice:2048}" in
  none) compile_args=(--no-compile) ;;
  all) ;;
  *) compile_args=(--compile-cases "${MODEL_COMPILE:-7b-slice:2048}") ;;
esac
method_args=(); [ -n "${MODEL_METHODS:-}" ] && method_args=(--model-methods "$MODEL_METHODS")
kv_args=(); [ -n "${MODEL_KV_HEADS:-}" ] && kv_args=(--model-kv-heads "$MODEL_KV_HEADS")
sweep_limit=$(( ${SCRIPT_BUDGET:-560} - (SECONDS - started) - 15 ))
[ "$sweep_limit" -gt 60 ] || sweep_limit=60
time_limit=${MODEL_TIME_LIMIT:-$(( sweep_limit > 270 ? sweep_limit - 150 : sweep_limit / 2 ))}
echo "sweep: at most $sweep_limit s; no new case after $time_limit s"
step model-bench "$sweep_limit" "$PYTHON" bench/report.py --model --device "${MODEL_DEVICE:-cuda}" --out "$LOGS/model" \
  --model-shapes "${MODEL_SHAPES:-7b-slice,tinyllama}" --model-batches "${MODEL_BATCHES:-1,4}" \
  --model-steps "${MODEL_STEPS:-3,5,3}" --time-limit "$time_limit" \
  "${compile_args[@]}" "${method_args[@]}" "${kv_args[@]}"

# 4. summary, last (from the JSON, which is written after each case: a run cut short still shows)
echo "--- summary ($((SECONDS - started)) s in all)"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${PROFILES:-}" ]; then
  grep -E "^model [0-9]|^host synchronizations" "$LOGS/profile-collect.log" 2>/dev/null
  sed -n '/^| class/,$p' "$LOGS/profile-step.log" 2>/dev/null
fi
"$PYTHON" - "$LOGS/model/model_step.json" <<'EOF'
import json, sys
from pathlib import Path
from bench import report
path = Path(sys.argv[1])
if not path.exists():
    sys.exit(f"no {path}: the sweep wrote nothing")
results = json.loads(path.read_text())
env = results["environment"]
print(f"{env.get('device')} | host CPU {env.get('cpu')} | torch {env.get('torch')} | peft {env.get('peft')} | "
      f"steps {results['options']['warmup']}+{results['options']['timed']} | {results.get('elapsed_s', 0):.0f} s")
print(report.model_summary(results))
EOF
