#!/usr/bin/env bash
# Issue 19's side-by-side runs on the GPU host in one device call: bare ModelOpt's unified HF export against
# `trtconv calibrate` on a Qwen3-8B-shaped and a Gemma-3-4B-shaped (text) checkpoint, random bf16 weights.
# From the repo root with .whl carried (bash ../shared/gpu-host/wheels.sh):
#   bash scripts/gpu_families.sh "qwen3-8b:fp8 gemma3-4b:fp8"
# A run is SHAPE[@LAYERS]:PRECISIONS (bench_scale.py's names; fp8_cap / fp8_kv_cap: trtconv under
# --max-gpu-memory $BENCH_CAP, default 8, beside the uncapped bare export), e.g. issue 19/20's layer streaming:
#   BENCH_CAP=8 bash scripts/gpu_families.sh "qwen3-8b:fp8,fp8_cap qwen3-30b-a3b@16:fp8,fp8_cap"
# Each shape's model is made in /tmp/fam-SHAPE, measured, and removed (the host's 64 GB disk); KEEP_MODEL=SHAPE
# keeps that one's for a next call on the same warm host (e.g. scripts/bench_auto.py --skip-model).
set -uo pipefail
RUNS=${1:-"qwen3-8b:fp8 gemma3-4b:fp8"}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRTCONV_CACHE=/tmp/fam-cache BENCH_EXPORT=hf
if ! python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.tar.gz
fi
KEEP=()
DEADLINE=${DEADLINE:-560}  # seconds for the whole script (a device call has 600): a shape gets what is left, up to BENCH_TIMEOUT
for run in $RUNS; do
  left=$(( DEADLINE - SECONDS - 15 ))  # 15 s to copy the records out
  if (( left < 60 )); then echo "bench $run skipped: ${left}s left of DEADLINE ${DEADLINE}"; continue; fi
  limit=$(( left < ${BENCH_TIMEOUT:-500} ? left : ${BENCH_TIMEOUT:-500} ))
  shape=${run%%:*}; precisions=${run#*:}
  LAYERS=()
  if [[ $shape == *@* ]]; then LAYERS=(--layers "${shape#*@}"); shape=${shape%%@*}; fi
  work=/tmp/fam-$shape
  timeout "$limit" python3 scripts/bench_scale.py --work "$work" --shape "$shape" --precisions "$precisions" \
    --warm '' --skip-warm-compile "${LAYERS[@]}" "${KEEP[@]}"
  echo "bench $shape exit $?"
  KEEP=(--keep-extensions)  # compiled once, in the shared TRTCONV_CACHE
  cp "$work/bench.json" "$OUT/$shape.json"; cp "$work/bench.md" "$OUT/$shape.md"
  tar czf "$OUT/$shape-logs.tgz" -C "$work" $(cd "$work" && ls *.log 2>/dev/null)
  [[ $shape == "${KEEP_MODEL:-}" ]] || rm -rf "$work/model"
  rm -rf "$TRTCONV_CACHE/stages"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
df -h /tmp | tail -1 >> "$OUT/gpu.txt"
