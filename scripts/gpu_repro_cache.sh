#!/usr/bin/env bash
# GPU check of the cache, --repro-check and the other targets (issues 4-6), on a lent H100/H200
# from the repo root with .whl carried (see scripts/gpu_smoke.sh for the set-up it shares).
# Prints a summary table last; logs and manifests go to $OUT.
set -uo pipefail
: "${OUT:=/tmp/trtconv-gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.tar.gz || exit 1
export PYTHONPATH=/tmp/site:$PWD TRTCONV_CACHE=/tmp/trtconv-cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
run() {  # run NAME RECIPE [extra args...]
  local name=$1 recipe=$2; shift 2
  local t0=$(date +%s%N)
  python3 -m trtconv.cli.app build "$recipe" -o "/tmp/art/$name" --force --device cuda "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall_s=$(( ($(date +%s%N) - t0) / 1000000 ))e-3" | tee -a "$OUT/walls.txt"
  cp "/tmp/art/$name/manifest.json" "$OUT/$name.manifest.json" 2>/dev/null || cp "/tmp/art/$name.failed/manifest.json" "$OUT/$name.manifest.json" 2>/dev/null
}
python3 -m trtconv.cli.app build default -o /tmp/art/warmup --device cuda --no-cache -q > "$OUT/warmup.log" 2>&1  # trains llama-ref, compiles kernels
run cold default --repro-check
run warm default
run w4a8 llama-ref-w4a8-awq
run pytorch-target default --set engine.target=pytorch --set export.hf_checkpoint=true
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
for name in ("cold", "warm", "w4a8", "pytorch-target"):
    try:
        m = json.load(open(f"{out}/{name}.manifest.json"))
    except OSError:
        print(name, "no manifest"); continue
    st = ", ".join(f"{s['name']} {s['status']} {s['wall_s']:.2f}s" for s in m["stages"])
    g = ", ".join(f"{x['metric']} {x['value']:.4g} {x['verdict']}" for x in m["gates"])
    rep = m["export"].get("reproducibility")
    rep = "" if not rep else f" | repro: identical={rep['identical']} compared={rep['tensors_compared']} worst={rep['differing'][:2]}"
    print(f"{name}: {m['status']} {m['device']['name']} digest {m['artifact_digest'][:16]} | {st} | {g} | candidate: {m['evaluation'].get('candidate')} | engine {m['engine'].get('status')}{rep}")
PY
cat "$OUT/walls.txt"
