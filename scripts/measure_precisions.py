"""Measure every precision on one model with the default evaluation: the table behind docs/accuracy.md.

Usage: python scripts/measure_precisions.py MODEL_DIR OUT_DIR [fp8 fp8+kv int8_sq int4_awq w4a8_awq] [-- --set ...]

Runs `trtconv calibrate` (the defaults: built-in calibration mix, 64 x 256 tokens; built-in
evaluation mix, 64 documents) once per precision, one after another (CPU is scarce), with gates
disabled in effect (allow_inconclusive and thresholds at their loosest) so every run reports its
numbers, and writes OUT_DIR/measurements.json plus a markdown table. Wall time per run is recorded:
it is the conversion time a user sees on this host.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "fp8": ["--precision", "fp8"],
    "fp8+kv": ["--precision", "fp8", "--kv-cache", "fp8"],
    "int8_sq": ["--precision", "int8_sq"],
    "int4_awq": ["--precision", "int4_awq"],
    "w4a8_awq": ["--precision", "w4a8_awq"],
}
# Measure, do not judge: thresholds no build can miss, so the artifact and its numbers are written.
OPEN_GATES = ["--set", "evaluate.gates.max_kl=1000", "--set", "evaluate.gates.max_ppl_increase_pct=100000",
              "--set", "evaluate.gates.min_top1_agreement=0"]


def _children_cpu_s() -> float:
    """CPU seconds used by finished child processes: on a shared host, wall time alone says little."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(model: Path, out: Path, name: str, extra: list[str]) -> dict:
    target = out / name
    cmd = [sys.executable, "-m", "trtconv", "calibrate", "--model", str(model), *VARIANTS[name], "-o", str(target),
           "--force", "--json", "--no-cache", *OPEN_GATES, *extra]
    t0, cpu0 = time.monotonic(), _children_cpu_s()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.monotonic() - t0, _children_cpu_s() - cpu0
    (out / f"{name}.log").write_text(res.stderr, encoding="utf-8")
    manifest = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").is_file() else {}
    return {"variant": name, "exit_code": res.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "metrics": manifest.get("metrics"),
            "stages": {s["name"]: s["wall_s"] for s in manifest.get("stages", [])},
            "calibration": {k: manifest.get("calibration", {}).get(k) for k in ("compute_dtype", "awq_group_size")}}


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    model, out = Path(argv[0]), Path(argv[1])
    names = argv[2:] or list(VARIANTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "measurements.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        results[name] = measure(model, out, name, extra)
        path.write_text(json.dumps(results, indent=1), encoding="utf-8")
        print(name, results[name]["exit_code"], results[name]["wall_s"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
