# Sourced by the GPU scripts (gpu_check.sh, gpu_model_bench.sh, gpu_multi.sh), with LOGS and PYTHON set:
# step() runs one step with a time limit, logs it to $LOGS/NAME.log, and records its outcome in SUMMARY
# (status=1 on failure); install_peft, install_bitsandbytes and build_rosa are the setup steps the benchmark scripts share.
declare -a SUMMARY=()
status=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok; [ "$rc" -eq 0 ] || { verdict="FAILED (exit $rc)"; status=1; }
  SUMMARY+=("$name: $verdict in $((SECONDS - start)) s")
  return "$rc"
}

install_peft() {  # peft (and safetensors where missing) from the wheels carried in .whl/, unless importable
  if ! "$PYTHON" -c "import peft" 2>/dev/null && compgen -G ".whl/peft-*.whl" >/dev/null; then
    local wheels=(.whl/peft-*.whl)
    "$PYTHON" -c "import safetensors" 2>/dev/null || wheels+=(.whl/safetensors-*.whl)
    step install-peft 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

install_bitsandbytes() {  # bitsandbytes from its wheel in .whl/, where there is one and it is not importable
  if ! "$PYTHON" -c "import bitsandbytes" 2>/dev/null && compgen -G ".whl/bitsandbytes-*.whl" >/dev/null; then
    step install-bitsandbytes 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/bitsandbytes-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

build_rosa() {  # build_rosa TIMEOUT_S: rosa_kernels with its CUDA kernels, unless SKIP_BUILD is set
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  [ -n "${SKIP_BUILD:-}" ] && return 0
  step build "$1" env ROSA_CUDA=ON "$PYTHON" -m pip install --no-build-isolation --no-deps -q .
}
