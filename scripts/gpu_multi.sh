#!/usr/bin/env bash
# RoSA on two GPUs (issue 15), in one go on a 2-GPU machine (bench/multi_gpu.py; under 10 minutes):
#   1. installs peft from .whl/ (no network needed; transformers must already be installed),
#   2. builds rosa_kernels with its CUDA kernels (pip install --no-build-isolation --no-deps .),
#   3. the single-GPU reference: RoSA (its whole life cycle) and PEFT LoRA on the global batch,
#   4. torchrun --nproc-per-node 2 (NCCL): the same under DDP and under FSDP2, one process group,
#   5. prints the comparison LAST: a Markdown table (step ms, peak GiB per GPU, the collection step's
#      peak and statistic, scaling vs 1 GPU, max |loss difference| vs 1 GPU, masks equal).
# Writes one JSON per configuration into $OUT/multi (or ./gpu_multi_logs/multi) and logs to $OUT.
# Run from the repository root, with the peft wheel in .whl/:
#   bash scripts/gpu_multi.sh
# Knobs (environment):
#   MODEL_SHAPES    7b-slice (also tinyllama, tiny; a comma list runs each in turn)
#   MODEL_METHODS   rosa,lora                   MULTI_WRAPS  ddp,fsdp2      NPROC  2 (processes = GPUs)
#   MULTI_COLLECT_BUFFERS  float32,auto: RoSA's collect_buffer(s); float32 first (the masks of 1 and 2
#                   GPUs must then be equal), auto is the package default (16-bit statistic)
#   MULTI_STEPS     20 (steps in all)           MULTI_WARMUP  4 (RoSA's LoRA-only steps, then 1 collection)
#   MULTI_BATCH     2 (sequences per step over all GPUs)      MULTI_SEQ  2048 (32 on the CPU)
#   MULTI_SHARES    NPROC: the global batch's shares; each GPU runs MULTI_SHARES / NPROC micro-batches and
#                   the 1-GPU reference all of them (NPROC=1 MULTI_SHARES=2: a smoke run on one GPU)
#   SCRIPT_BUDGET   seconds for the whole script (default 560: a device call may run 10 minutes); the
#                   reference gets 40% of what the build leaves, torchrun the rest less the comparison's
#   SKIP_BUILD=1    use the rosa_kernels already installed;  PYTHON (default python3)
#   MODEL_DEVICE=cpu a dry run without GPUs: gloo, 2 processes, the tiny shape (with SKIP_BUILD=1)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-gpu_multi_logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # NVLink multicast (NVLS) off
started=$SECONDS
budget=${SCRIPT_BUDGET:-560}
device=${MODEL_DEVICE:-cuda}
# shellcheck source=scripts/gpu_steps.sh
. scripts/gpu_steps.sh

install_peft
if ! build_rosa 360; then
  printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1
fi
# Import rosa_kernels from site-packages (the build), bench/ from the repository root.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nproc_=${NPROC:-2}
step versions 60 "$PYTHON" -c "
import torch, transformers, peft, rosa_kernels as r
gpus = torch.cuda.device_count()
print(torch.cuda.get_device_name() if gpus else 'no GPU', 'x', gpus, 'torch', torch.__version__,
      'nccl', torch.cuda.nccl.version() if gpus else None, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'rosa_kernels', r.__file__, 'cuda kernels', r.cuda_available())
if '$device' == 'cuda':
    assert r.cuda_available(), 'rosa_kernels was built without its CUDA kernels'
    assert gpus >= $nproc_, f'{gpus} GPU(s) visible, NPROC=$nproc_ needed'" || { printf '%s\n' "--- summary" "${SUMMARY[@]}"; exit 1; }

common=(--method "${MODEL_METHODS:-rosa,lora}" --collect-buffers "${MULTI_COLLECT_BUFFERS:-float32,auto}"
        --steps "${MULTI_STEPS:-20}" --warmup-steps "${MULTI_WARMUP:-4}" --global-batch "${MULTI_BATCH:-2}"
        --shares "${MULTI_SHARES:-$nproc_}" --device "$device")
[ -n "${MULTI_SEQ:-}" ] && common+=(--seq "$MULTI_SEQ")
[ "$device" = cpu ] && common+=(--threads 1)
IFS=, read -r -a shapes <<< "${MODEL_SHAPES:-$([ "$device" = cpu ] && echo tiny || echo 7b-slice)}"
masks=$(mktemp -d /tmp/rosa_multi_gpu_masks.XXXXXX)  # the masks (for overlaps) stay off $OUT: ~80 MB a run
results=()
for i in "${!shapes[@]}"; do
  shape=${shapes[$i]}
  out="$LOGS/multi/$shape"
  left=$(( (budget - (SECONDS - started) - 20) / (${#shapes[@]} - i) ))
  [ "$left" -gt 60 ] || left=60
  step "reference-$shape" $(( left * 2 / 5 )) "$PYTHON" bench/multi_gpu.py --wrap none --shape "$shape" \
    --out "$out" --masks-dir "$masks" "${common[@]}"
  left=$(( (budget - (SECONDS - started) - 20) / (${#shapes[@]} - i) ))
  [ "$left" -gt 60 ] || left=60
  step "torchrun-$shape" "$left" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc_" \
    bench/multi_gpu.py --wrap "${MULTI_WRAPS:-ddp,fsdp2}" --shape "$shape" --out "$out" --masks-dir "$masks" "${common[@]}"
  results+=("$out")
done

# the comparison, last (from the JSON files, written after each configuration: a run cut short still shows)
echo "--- summary ($((SECONDS - started)) s in all)"
printf '%s\n' "${SUMMARY[@]}"
for out in "${results[@]}"; do
  echo
  "$PYTHON" bench/multi_gpu.py --compare "$out" --masks-dir "$masks" || status=1
done
rm -rf "$masks"
exit "$status"
