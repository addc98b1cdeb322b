# Sourced by the GPU scripts (gpu_check.sh, gpu_model_bench.sh), with LOGS set: step() runs one step
# with a time limit, logs it to $LOGS/NAME.log, and records its outcome in SUMMARY (status=1 on failure).
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
