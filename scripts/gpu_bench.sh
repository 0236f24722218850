#!/usr/bin/env bash
# Issue 9's benchmark on the GPU host in one device call (docs/performance.md). From the repo root,
# with .whl carried (bash ../shared/gpu-host/wheels.sh):
#   bash scripts/gpu_bench.sh fp8,fp8_kv,int8_sq fp8      # precisions, then those to run again (cache hit)
# Reuses /tmp/bench (model, trtconv cache, compiled extension) when an earlier call left it.
set -uo pipefail
PRECISIONS=${1:-fp8}; WARM=${2:-}
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/bench}; mkdir -p "$OUT" "$WORK"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
if ! python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.tar.gz
fi
KEEP=(); [ -n "$(ls -A "$WORK"/trtconv-cache/torch-extensions 2>/dev/null)" ] && KEEP=(--keep-extensions)
timeout "${BENCH_TIMEOUT:-540}" python3 scripts/bench_scale.py --work "$WORK" --precisions "$PRECISIONS" --warm "$WARM" \
  --skip-warm-compile "${KEEP[@]}" ${BARE_ONLY:+--bare-only "$BARE_ONLY"}
echo "bench exit $?"
cp "$WORK"/bench.md "$WORK"/bench.json "$WORK"/*.log "$OUT"/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
df -h /tmp | tail -1 >> "$OUT/gpu.txt"
