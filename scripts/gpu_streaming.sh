#!/usr/bin/env bash
# Layer-streamed conversion under a GPU memory cap, on the GPU host (docs/performance.md,
# "Models larger than the GPU"). Run from the repo root with .whl carried:
#   bash scripts/gpu_streaming.sh 8b     # llama3-8b-shaped: fp8 and int4_awq, uncapped vs --max-gpu-memory 8
#   bash scripts/gpu_streaming.sh 70b    # llama3-70b-shaped cut to 8 layers under --max-gpu-memory 16: fp8 (evaluation on), int4_awq
#   bash scripts/gpu_streaming.sh advice # llama3-8b-shaped fp8, evaluation and the failed gate's advice on (random weights
#                                        # fail the gate): uncapped (advice in memory) and --max-gpu-memory 8 (advice streamed);
#                                        # advice-full / advice-cap8 run one of the two
# Writes one JSON line per run (digest, stage times, peaks, the plan's prediction) to $OUT/runs.jsonl.
set -uo pipefail
WHAT=${1:-8b}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHL=${WHL:-$ROOT/.whl}
export PYTHONPATH=/tmp/site:$ROOT HF_HUB_OFFLINE=1 TRTCONV_NO_CACHE=1 NUM_SAMPLES=${NUM_SAMPLES:-32}
if ! python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$WHL"/*.tar.gz
fi
export TRTCONV_CACHE=${TRTCONV_CACHE:-/tmp/bench/trtconv-cache}  # where gpu_bench.sh compiled ModelOpt's extension
cd "$ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"

run() {  # run NAME MODEL RECIPE-ARGS...
  local name=$1 model=$2; shift 2
  local art=/tmp/art_$name
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "/tmp/smi_$name.txt" &
  local smi=$!
  local t0=$(date +%s.%N)
  local evaluation=(--set evaluate.enabled=false)
  [ "${EVAL:-0}" = 1 ] && evaluation=(--set evaluate.sensitivity=false)  # random weights fail the gate: no advice pass
  [ "${ADVICE:-0}" = 1 ] && evaluation=(--set evaluate.num_samples=24)  # the gate fails: the advice pass runs
  timeout ${RUN_TIMEOUT:-240} python3 -m trtconv calibrate --model "$model" --device cuda --no-cache -o "$art" \
      "${evaluation[@]}" --num-samples ${NUM_SAMPLES:-32} "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  local rc=$? t1=$(date +%s.%N)
  kill $smi; wait $smi 2>/dev/null
  python3 - "$name" "$art" "$rc" "$t0" "$t1" "/tmp/smi_$name.txt" "$model" "$@" >> "$OUT/runs.jsonl" <<'PY'
import json, sys
from pathlib import Path
name, art, rc, t0, t1, smi, model, *args = sys.argv[1:]
rec = {"run": name, "rc": int(rc), "wall_s": round(float(t1) - float(t0), 1), "args": args}
used = [int(x) for x in Path(smi).read_text().split() if x.strip().isdigit()]
rec["nvidia_smi_peak_mib"] = max(used) if used else None
m = Path(art) / "manifest.json"
if m.is_file():
    man = json.loads(m.read_text())
    rec["digest"] = man["artifact_digest"]
    rec["path"] = man["calibration"].get("path")
    rec["stages"] = [{k: s.get(k) for k in ("name", "wall_s", "peak_rss_mib", "peak_gpu_mib")} for s in man["stages"]]
    advice = man["evaluation"].get("advice") or {}
    rec["advice"] = {k: advice.get(k) for k in ("path", "wall_s", "seconds", "peak_gpu_mib", "reused", "error", "suggested_exclude")}
# The plan's prediction for the same recipe and cap
from trtconv.recipe.schema import recipe_from_dict
from trtconv.memory_plan import plan_memory, GIB, CUDA_CONTEXT
import torch
cfg = json.loads((Path(model) / "config.json").read_text())
prec = args[args.index("--precision") + 1]
cap = float(args[args.index("--max-gpu-memory") + 1]) if "--max-gpu-memory" in args else None
import os
r = recipe_from_dict({"name": "p", "model": {"path": model}, "quantization": {"precision": prec},
                      "calibration": {"num_samples": int(os.environ.get("NUM_SAMPLES", 32)), "batch_size": 4},
                      "evaluate": {"enabled": "1" in (os.environ.get("EVAL"), os.environ.get("ADVICE")), "sensitivity": False}}).resolved()
total = torch.cuda.get_device_properties(0).total_memory
plan = plan_memory(r, cfg, int(cap * GIB) if cap else total, "cuda")
rec["plan"] = {"streamed": plan.streamed, "evaluate_streamed": plan.evaluate_streamed,
               **{f"{c.stage}|{c.where}": round(c.need_bytes / GIB, 2) for c in plan.checks}}
print(json.dumps(rec))
PY
  grep -ahE "^\[ *[0-9.]+s\] |where the time|^  [a-z]+ +[0-9.]+ s" "$OUT/$name.err" "$OUT/$name.json" | tail -14; tail -c 600 "$OUT/$name.err"; tail -1 "$OUT/runs.jsonl"
  rm -rf "$art"
}

if [ "$WHAT" = 8b ]; then
  python3 scripts/shaped_model.py llama3-8b /tmp/m8 2>&1 | tail -1
  run fp8_full /tmp/m8 --precision fp8
  run fp8_cap8 /tmp/m8 --precision fp8 --max-gpu-memory 8
  run awq_cap8 /tmp/m8 --precision int4_awq --max-gpu-memory 8
  run awq_full /tmp/m8 --precision int4_awq
elif [ "${WHAT%%-*}" = advice ]; then  # advice, or advice-full / advice-cap8 alone (one call each under a 10-minute limit)
  [ -f /tmp/m8/config.json ] || python3 scripts/shaped_model.py llama3-8b /tmp/m8 2>&1 | tail -1
  [ "$WHAT" = advice-cap8 ] || ADVICE=1 RUN_TIMEOUT=${RUN_TIMEOUT:-540} run fp8_advice_full /tmp/m8 --precision fp8
  [ "$WHAT" = advice-full ] || ADVICE=1 RUN_TIMEOUT=${RUN_TIMEOUT:-540} run fp8_advice_cap8 /tmp/m8 --precision fp8 --max-gpu-memory 8
else
  # 70B shapes cut to 8 layers, the default 64 calibration rows; fp8 with the default (streamed) evaluation.
  export NUM_SAMPLES=64
  [ -f /tmp/m70/config.json ] || python3 scripts/shaped_model.py llama3-70b /tmp/m70 --layers 8 2>&1 | tail -1
  EVAL=1 run l70x8_fp8_cap16 /tmp/m70 --precision fp8 --max-gpu-memory 16
  run l70x8_awq_cap18 /tmp/m70 --precision int4_awq --max-gpu-memory 18  # the plan refuses 16 for AWQ (see memory_plan.AWQ_EXTRA_LAYERS)
fi
df -h /tmp | tail -1 >> "$OUT/gpu.txt"
