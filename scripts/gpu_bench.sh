#!/usr/bin/env bash
# Issue 9's benchmark on the GPU host in one device call (docs/performance.md). From the repo root,
# with .whl carried (bash ../shared/gpu-host/wheels.sh):
#   bash scripts/gpu_bench.sh fp8,fp8_kv,int8_sq fp8      # precisions, then those to run again (cache hit)
# Reuses /tmp/bench (model, trtconv cache, compiled extension) when an earlier call left it.
# ModelOpt's compiled CUDA extension comes back as $OUT/ext.tgz; carried back in (.ext/ext.tgz) it is
# restored, so a fresh host skips the ~110 s compile (outputs touched: ninja then finds them up to date).
# SAMPLE=1 runs trtconv under scripts/stack_sampler.py; its files come back in $OUT/stacks.tgz.
set -uo pipefail
PRECISIONS=${1:-fp8}; WARM=${2:-}
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/bench}; mkdir -p "$OUT" "$WORK"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRTCONV_CACHE=$WORK/trtconv-cache
if ! python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.tar.gz
fi
EXT=$(python3 -c "from trtconv.cache.store import use_torch_extensions_cache as u; print(u())")
if [ -f .ext/ext.tgz ] && [ -z "$(ls -A "$EXT" 2>/dev/null)" ]; then
  mkdir -p "$EXT" && tar xzf .ext/ext.tgz -C "$EXT" && find "$EXT" -type f -exec touch {} + && echo "extension restored into $EXT"
fi
KEEP=(); [ -n "$(ls -A "$EXT" 2>/dev/null)" ] && KEEP=(--keep-extensions)
SAMPLING=(); [ -n "${SAMPLE:-}" ] && SAMPLING=(--sample-stacks)
timeout "${BENCH_TIMEOUT:-540}" python3 scripts/bench_scale.py --work "$WORK" --precisions "$PRECISIONS" --warm "$WARM" \
  --skip-warm-compile "${KEEP[@]}" "${SAMPLING[@]}" ${BARE_ONLY:+--bare-only "$BARE_ONLY"}
echo "bench exit $?"
cp "$WORK"/bench.md "$WORK"/bench.json "$OUT"/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log 2>/dev/null)
ls "$WORK"/*.stacks.* >/dev/null 2>&1 && tar czf "$OUT/stacks.tgz" -C "$WORK" $(cd "$WORK" && ls *.stacks.*)
[ -f .ext/ext.tgz ] || tar czf "$OUT/ext.tgz" -C "$EXT" .
ls -la "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
df -h /tmp | tail -1 >> "$OUT/gpu.txt"
