#!/usr/bin/env bash
# The GPU check of issue 2, run on a lent H100/H200 host from the repo root with .whl carried
# (fill it here first with `bash ../shared/gpu-host/wheels.sh`). That host has torch (CUDA),
# transformers, typer, rich, safetensors... but no ModelOpt and no network: the wheels bring them.
#
# It builds the default recipe (fp8) and the int4_awq recipe on the GPU, and the default recipe
# on the same host's CPU for a side-by-side timing; logs and manifests go to $OUT.
set -uo pipefail
: "${OUT:=/tmp/trtconv-gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.tar.gz || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TRTCONV_CACHE=/tmp/trtconv-cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, transformers, modelopt; print('torch', torch.__version__, 'transformers', transformers.__version__, 'modelopt', modelopt.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
run() {  # run NAME RECIPE DEVICE
  local name=$1 recipe=$2 device=$3 start end
  start=$(date +%s.%N)
  python3 -m trtconv.cli.app build "$recipe" -o "/tmp/art/$name" --force --device "$device" > "$OUT/$name.log" 2>&1
  echo "exit $? after $(echo "$(date +%s.%N) - $start" | bc) s" >> "$OUT/$name.log"
  cp "/tmp/art/$name/manifest.json" "$OUT/$name.manifest.json" 2>/dev/null
  tail -n 25 "$OUT/$name.log"
}
run fp8-cuda default cuda
run int4awq-cuda llama-ref-int4-awq cuda
run fp8-cpu default cpu
python3 - <<'PY'
import json, os
out = os.environ.get("OUT", "/tmp/trtconv-gpu-out")
for name in ("fp8-cuda", "int4awq-cuda", "fp8-cpu"):
    try:
        m = json.load(open(f"{out}/{name}.manifest.json"))
    except OSError:
        print(name, "no manifest"); continue
    stages = ", ".join(f"{s['name']} {s['wall_s']:.1f}s" for s in m["stages"])
    gates = ", ".join(f"{g['metric']} {g['value']:.4g} {g['verdict']}" for g in m["gates"])
    print(f"{name}: {m['status']} on {m['device']['name']} | {stages} | {gates}")
PY
