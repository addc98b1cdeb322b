#!/usr/bin/env bash
# Sets up .venv, builds rosa_kernels and runs the whole test suite (CPU; CUDA tests skip without a GPU).
# Extra arguments go to pytest.
set -euo pipefail
pytest_args=("$@")
set --  # a sourced script sees the caller's arguments: setup_env.sh must not get pytest's
. "$(dirname "$0")/setup_env.sh"
python -m pytest tests -q "${pytest_args[@]}"
