#!/usr/bin/env bash
# Issue 9's benchmark on the GPU host in one device call (docs/performance.md). From the repo root,
# with .whl carried (bash ../shared/gpu-host/wheels.sh):
#   bash scripts/gpu_bench.sh fp8,fp8_kv,int8_sq fp8      # precisions, then those to run again (cache hit)
# Reuses /tmp/bench (model, trtconv cache, compiled extension) when an earlier call left it.
# (Restoring ModelOpt's compiled extension from an earlier call was tried and removed: on a fresh
# host torch rebuilt both extensions anyway, 67 + 56 s. Reuse needs the same host: chain calls.)
# BENCH_EXTENSIONS=int compiles only the int4/int8 extension up front (AWQ runs).
# SAMPLE=1 runs trtconv under scripts/stack_sampler.py; its files come back in $OUT/stacks.tgz.
# CHECK=1 first runs scripts/check_streamed_gpu.py (streamed evaluation on the GPU: copy stream, parking).
set -uo pipefail
PRECISIONS=${1:-fp8}; WARM=${2:-}
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/bench}; mkdir -p "$OUT" "$WORK"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRTCONV_CACHE=$WORK/trtconv-cache
if ! python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.tar.gz
fi
EXT=$(python3 -c "from trtconv.cache.store import use_torch_extensions_cache as u; print(u())")
if [ -n "${CHECK:-}" ]; then  # the streamed evaluation's copy stream and parking change no number (a small model)
  timeout 320 python3 scripts/check_streamed_gpu.py /tmp/check 2>&1 | grep -v "^\[" | tee "$OUT/check.log" | tail -8
fi
KEEP=(); [ -n "$(ls -A "$EXT" 2>/dev/null)" ] && KEEP=(--keep-extensions)
SAMPLING=(); [ -n "${SAMPLE:-}" ] && SAMPLING=(--sample-stacks)
timeout "${BENCH_TIMEOUT:-540}" python3 scripts/bench_scale.py --work "$WORK" --precisions "$PRECISIONS" --warm "$WARM" \
  --skip-warm-compile "${KEEP[@]}" "${SAMPLING[@]}" ${BARE_ONLY:+--bare-only "$BARE_ONLY"} ${NO_BARE:+--no-bare "$NO_BARE"}
echo "bench exit $?"
cp "$WORK"/bench.md "$WORK"/bench.json "$OUT"/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log 2>/dev/null)
ls "$WORK"/*.stacks.* >/dev/null 2>&1 && tar czf "$OUT/stacks.tgz" -C "$WORK" $(cd "$WORK" && ls *.stacks.*)
ls -la "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
df -h /tmp | tail -1 >> "$OUT/gpu.txt"
