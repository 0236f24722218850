"""`quantization.precision: auto` on a GPU host: its whole time against one fp8 conversion (issue 21, target <= 3x),
and ModelOpt's own `mtq.auto_quantize` at the same effective bits.

    python3 scripts/bench_auto.py --work /tmp/bench_auto [--shape llama3-8b] [--candidates int4_awq,fp8,none]
                                  [--skip-model] [--no-auto-quantize]

1. makes (or reuses) a model of the shape with random bf16 weights in WORK/model (scripts/shaped_model.py);
2. `trtconv calibrate --precision fp8` (unified HF checkpoint, no engine, no advice pass, no cache), timed;
3. `trtconv calibrate --precision auto --candidates ...` with the same settings, timed. On random weights
   every quantized mix fails the gates and only the path's last step (every layer 16-bit) passes, so the
   search measures trials until it reaches that step or search.max_trials (8) runs out: near the most it can
   cost (checked on --shape tiny on the CPU: 5 trials, 4.1 -> 16 bits, exit 0). The time is what is measured,
   with the manifest's per-stage times and the search's own split (calibrate_candidates / sensitivity / trials);
4. unless --no-auto-quantize, `mtq.auto_quantize` (method kl_div, the same formats, "none" implied) on the
   same calibration rows at the auto build's chosen effective bits (on random weights 16: its calibration of
   every format and its scoring cost the same whatever the budget), in a child process, timed;
5. writes WORK/bench_auto.json and prints a table: wall seconds, peak GPU, the ratio auto / fp8.

Accuracy numbers mean nothing on random weights; times and memory do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # bench_scale's helpers (versions, extensions_dir), also when imported


def model_opt_formats(candidates: list[str]) -> list[dict]:
    """ModelOpt's config of each quantized candidate, from trtconv's precisions table (its preset names)."""
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    from trtconv.precisions import PRECISIONS

    return [QUANT_CFG_CHOICES[PRECISIONS[c].modelopt_preset] for c in candidates if PRECISIONS[c].modelopt_preset]


COMMON = ["--no-cache", "--force", "--hf-checkpoint", "--set", "export.tensorrt_llm_checkpoint=false",
          "--set", "engine.target=none", "--set", "evaluate.sensitivity=false"]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if "TORCH_EXTENSIONS_DIR" not in env:  # every process loads ModelOpt's extension from the folder trtconv uses
        from bench_scale import extensions_dir

        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir(env)
    return env


def compile_extensions(device: str) -> dict:
    """ModelOpt's CUDA extensions compiled (or loaded) before anything is timed: a fresh host compiles for minutes."""
    if device != "cuda":
        return {}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "_compile"], env=_env(), capture_output=True, text=True)
    return {"rc": res.returncode, "process_s": round(time.monotonic() - t0, 1), **({"error": res.stderr[-2000:]} if res.returncode else {})}


def trtconv(model: Path, out: Path, args: list[str], device: str) -> dict:
    cmd = [sys.executable, "-m", "trtconv", "calibrate", "--model", str(model), "-o", str(out), "--device", device, *COMMON, *args]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.monotonic() - t0
    (out.parent / f"{out.name}.log").write_text(res.stdout + res.stderr, encoding="utf-8")
    written = out if (out / "manifest.json").is_file() else out.with_name(out.name + ".failed")
    manifest = json.loads((written / "manifest.json").read_text()) if (written / "manifest.json").is_file() else {}
    search = (manifest.get("calibration") or {}).get("search") or {}
    return {"exit_code": res.returncode, "wall_s": round(wall, 1),
            "stages": {s["name"]: {"wall_s": s["wall_s"], "peak_gpu_mib": s.get("peak_gpu_mib")} for s in manifest.get("stages", [])},
            "search": {k: search.get(k) for k in ("candidates", "chosen_trial", "effective_bits", "passed", "stop_reason", "seconds")}
            | {"trials": len(search.get("trials") or [])}}


def auto_quantize_child(model: str, bits: float, candidates: str, out: str, device: str = "cuda") -> None:
    """The child: ModelOpt's auto_quantize at `bits`, on trtconv's calibration rows (64 x 256, seed 1234)."""
    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtconv.data import samples
    from trtconv.stages.load import data_packs

    tok = AutoTokenizer.from_pretrained(model)
    rows = samples.calibration_rows(data_packs(None, "calibration"), tok, 64, 256, 1234).rows
    t0 = time.monotonic()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    loaded = time.monotonic() - t0
    batches = [torch.tensor(rows[i : i + 4], device=device) for i in range(0, len(rows), 4)]
    formats = model_opt_formats(candidates.split(","))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.monotonic()
    m, state = mtq.auto_quantize(m, constraints={"effective_bits": bits}, quantization_formats=formats, data_loader=batches,
                                 forward_step=lambda model, batch: model(input_ids=batch, use_cache=False).logits,
                                 method="kl_div", num_calib_steps=len(batches), num_score_steps=len(batches))
    searched = time.monotonic() - t1
    chosen = {}
    for name, info in (state.get("candidate_stats") or {}).items():
        fmt = str((info.get("formats") or ["?"])[0]) if isinstance(info, dict) else "?"
        chosen[fmt] = chosen.get(fmt, 0) + 1
    Path(out).write_text(json.dumps({"load_s": round(loaded, 1), "auto_quantize_s": round(searched, 1),
                                     "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
                                     "effective_bits_target": bits, "best": str(state.get("best", {}).get("constraints"))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--candidates", default="int4_awq,fp8,none")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--no-auto-quantize", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to check the script on --shape tiny")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        model, bits, candidates, out = a._child
        auto_quantize_child(model, float(bits), candidates, out, a.device)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / "model"
    if not (a.skip_model and (model / "config.json").is_file()):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "shaped_model.py"), a.shape, str(model)], check=True)
    from bench_scale import versions  # the card, driver and library versions, as bench_scale records them

    result = {"shape": a.shape, "candidates": a.candidates, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": versions()}
    record = a.work / "bench_auto.json"  # rewritten after each step: a run cut by a time limit keeps what it measured
    result["extension_compile"] = compile_extensions(a.device)
    record.write_text(json.dumps(result, indent=2))
    result["fp8"] = trtconv(model, a.work / "fp8", ["--precision", "fp8"], a.device)
    record.write_text(json.dumps(result, indent=2))
    result["auto"] = trtconv(model, a.work / "auto", ["--precision", "auto", "--candidates", a.candidates], a.device)
    result["ratio_auto_to_fp8"] = round(result["auto"]["wall_s"] / max(result["fp8"]["wall_s"], 1e-9), 2)
    record.write_text(json.dumps(result, indent=2))
    bits = result["auto"]["search"].get("effective_bits")
    if not a.no_auto_quantize and bits:
        out = a.work / "auto_quantize.json"
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--device", a.device, "--_child", str(model), str(bits), a.candidates, str(out)],
                             capture_output=True, text=True, env=_env())
        result["auto_quantize"] = ({**json.loads(out.read_text()), "wall_s": round(time.monotonic() - t0, 1)} if res.returncode == 0
                                   else {"exit_code": res.returncode, "error": res.stderr[-2000:]})
    record.write_text(json.dumps(result, indent=2))
    print(f"| run | wall s | exit |\n|---|---|---|\n| trtconv fp8 | {result['fp8']['wall_s']} | {result['fp8']['exit_code']} |\n"
          f"| trtconv auto ({a.candidates}) | {result['auto']['wall_s']} | {result['auto']['exit_code']} |")
    print(f"auto / fp8 = {result['ratio_auto_to_fp8']} (target <= 3); search split: {result['auto']['search'].get('seconds')}")
    if "auto_quantize" in result:
        print(f"mtq.auto_quantize at {bits} bits: {result['auto_quantize']}")


if __name__ == "__main__":
    main()
