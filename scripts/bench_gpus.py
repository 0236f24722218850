"""Issue 22 on a multi-GPU host: the layer-streamed conversion on 1, 2, 4, 8 GPUs (`--gpus N`).

    python3 scripts/bench_gpus.py WORK [--shape llama3-70b --layers 16] [--gpus 1,2,4,8] [--precision fp8]
                                       [--cap 16] [--no-eval] [--num-samples 64]

Makes a shaped checkpoint (random weights; scripts/shaped_model.py) unless WORK/model exists, then
for each N runs `trtconv calibrate --device cuda --gpus N --set calibration.streaming=always`
(calibrate + export + evaluate, the gate's advice off), sampling every GPU's memory with nvidia-smi,
and prints one row per N: wall time, the calibrate (+export) and evaluate stages, the per-GPU peak
(allocator, from the manifest; nvidia-smi), the speed-up of calibrate + export + evaluate against
N = 1 and whether it meets 0.7 x N, whether the artifact digest equals N = 1's, the plan's predicted
speed-up, and the card. Raw records go to WORK/bench_gpus.jsonl.

The environment is left as the host sets it (NCCL_NVLS_ENABLE, TORCH_SYMM_MEM_DISABLE_MULTICAST,
NVSHMEM_DISABLE_NVLS are printed, never changed; trtconv's split uses threads and peer copies, no
NCCL and no multicast). N larger than the visible GPUs is skipped with a note.
On a CPU (`--device cpu`, TRTCONV_SIMULATED_DEVICES set by the script) it only checks that the
script runs: those rows are simulated devices, not GPU measurements, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_VARS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES")


def smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


class MemorySampler:
    """Each GPU's nvidia-smi memory.used (MiB), its maximum over the run, every 250 ms."""

    def __init__(self):
        self.peaks: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = [int(x) for x in smi("memory.used") if x.isdigit()]
            self.peaks = [max(a, b) for a, b in zip(self.peaks, used)] if self.peaks else used
            self._stop.wait(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def one_run(a, n: int, model: Path) -> dict:
    out = a.work / f"out_gpus{n}"
    cmd = [sys.executable, "-m", "trtconv", "calibrate", "--model", str(model), "--precision", a.precision, "--device", a.device,
           "--gpus", str(n), "--no-cache", "--force", "-o", str(out), "--json", "-q", "--num-samples", str(a.num_samples),
           "--set", "calibration.streaming=always", "--set", "evaluate.sensitivity=false"]
    cmd += ["--max-gpu-memory", str(a.cap)] if a.cap else []
    cmd += ["--set", "evaluate.enabled=false"] if a.no_eval else []
    t0 = time.monotonic()
    with MemorySampler() as sampler:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    rec = {"gpus": n, "rc": proc.returncode, "wall_s": round(time.monotonic() - t0, 1), "smi_peak_mib": sampler.peaks,
           "command": " ".join(cmd[1:])}
    manifest = out / "manifest.json"
    if proc.returncode not in (0, 1) or not manifest.is_file():
        rec["error"] = proc.stderr.strip().splitlines()[-1:] or ["no manifest"]
        return rec
    man = json.loads(manifest.read_text())
    stages = {s["name"]: s for s in man["stages"]}
    rec["digest"] = man["artifact_digest"]
    rec["calibrate_s"] = stages["calibrate"]["wall_s"]
    rec["evaluate_s"] = stages.get("evaluate", {}).get("wall_s", 0.0)
    rec["work_s"] = round(rec["calibrate_s"] + rec["evaluate_s"], 1)
    rec["devices"] = stages["calibrate"]["details"].get("devices")
    per_device = [stages[s]["details"].get("peak_gpu_mib_per_device") or [stages[s].get("peak_gpu_mib") or 0]
                  for s in ("calibrate", "evaluate") if s in stages]
    rec["allocator_peak_mib"] = [max(col) for col in zip(*per_device)] if per_device else None
    plan = subprocess.run([sys.executable, "-m", "trtconv", "plan", str(a.work / "recipe.yaml"), "--gpus", str(n), "--json"]
                          + (["--max-gpu-memory", str(a.cap)] if a.cap else []), cwd=ROOT, capture_output=True, text=True)
    try:
        rec["plan_time_s"] = json.loads(plan.stdout).get("time_s")
    except json.JSONDecodeError:
        rec["plan_time_s"] = None
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--shape", default="llama3-70b")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--precision", default="fp8")
    ap.add_argument("--cap", type=float, default=None, help="--max-gpu-memory GiB for every run (default: none)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: checks the script with simulated devices (not a measurement)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / "model"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "shaped_model.py"), a.shape, str(model), "--layers", str(a.layers)],
                       check=True)
    (a.work / "recipe.yaml").write_text(json.dumps({
        "name": "bench-gpus", "model": {"path": str(model)}, "quantization": {"precision": a.precision},
        "calibration": {"num_samples": a.num_samples, "streaming": "always"},
        "evaluate": {"enabled": not a.no_eval, "sensitivity": False}}))
    cards = smi("name")
    print("host variables (left as set):", {v: os.environ.get(v) for v in HOST_VARS})
    print("cards:", cards or "none (CPU)")
    wanted = [int(x) for x in a.gpus.split(",")]
    if a.device == "cpu":
        os.environ["TRTCONV_SIMULATED_DEVICES"] = str(max(wanted))
    visible = len(cards) if a.device == "cuda" else max(wanted)
    rows = []
    with (a.work / "bench_gpus.jsonl").open("a") as log:
        for n in wanted:
            if n > visible:
                print(f"--gpus {n}: skipped, {visible} GPU(s) visible")
                continue
            rec = one_run(a, n, model)
            rec["card"] = cards[0] if cards else "cpu (simulated devices: not a GPU measurement)"
            log.write(json.dumps(rec) + "\n")
            rows.append(rec)
            print(f"  done --gpus {n}: rc {rec['rc']}, {rec['wall_s']} s", flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["gpus"] == 1 and "work_s" in r), None)
    print("\n| N | wall s | calibrate+export s | evaluate s | per-GPU peak GiB (allocator / nvidia-smi) | speed-up | >= 0.7 N | "
          "digest = N=1 | plan's speed-up | card |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "work_s" not in r:
            print(f"| {r['gpus']} | {r['wall_s']} | failed: {r.get('error')} | | | | | | | |")
            continue
        speed = base["work_s"] / r["work_s"] if base else None
        alloc = max(r["allocator_peak_mib"] or [0]) / 1024
        smi_peak = max(r["smi_peak_mib"] or [0]) / 1024
        split = (r.get("plan_time_s") or {}).get("split") or {}
        speed_text = f"{speed:.2f}x" if speed else "-"
        print(f"| {r['gpus']} | {r['wall_s']} | {r['calibrate_s']} | {r['evaluate_s']} | {alloc:.2f} / {smi_peak:.2f} | "
              f"{speed_text} | {'yes' if speed and speed >= 0.7 * r['gpus'] else 'no'} | "
              f"{'yes' if base and r['digest'] == base['digest'] else 'NO'} | {split.get('speedup', '-')} | {r['card']} |")


if __name__ == "__main__":
    main()
