# Sourced by the other scripts: creates .venv (once), installs torch and the build/test tools, and
# builds rosa_kernels into it. TORCH_SPEC picks the torch (default: the 2.13.0 CPU build here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -r requirements-dev.txt "$@"
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
