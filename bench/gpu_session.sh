#!/usr/bin/env bash
# One batched GPU measurement session on the lent device machine (see bench/README or the issue notes).
#
#   bash bench/gpu_session.sh NAME[:SECONDS] "COMMAND" [NAME[:SECONDS] "COMMAND" ...]
#
# Sets up the carried wheels (.whl/) and a `wanimate` import path pointing at this checkout, then
# runs each named command with its own time limit (WANIMATE_SECTION_TIMEOUT, default 170 s) so one
# failure or hang cannot take the others down. Every command's output goes to RES/NAME.log; its
# files go to RES/NAME/ (exported as SECTION_OUT). At the end RES is packed into
# $OUT/results.tar.gz, because the device returns at most 8 files.
set -u
OUT=${OUT:-/tmp/out}
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed" >&2
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/wanimate
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
limit=${WANIMATE_SECTION_TIMEOUT:-170}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RES/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/device.txt"
while [ $# -ge 2 ]; do
  spec=$1; name=${spec%%:*}; cmd=$2; shift 2
  this_limit=$limit; case $spec in *:*) this_limit=${spec#*:};; esac
  export SECTION_OUT="$RES/$name"; mkdir -p "$SECTION_OUT"
  start=$(date +%s)
  echo "=== $name: $cmd"
  timeout --signal=TERM --kill-after=10 "$this_limit" bash -c "$cmd" >"$RES/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - start )) s"
  tail -n 40 "$RES/$name.log"
done
tar czf "$OUT/results.tar.gz" -C "$RES" . && echo "packed $OUT/results.tar.gz"
