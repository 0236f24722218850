"""Bare ModelOpt against trtconv on one Llama-3-8B-shaped checkpoint, side by side (issue 9).

    python3 scripts/bench_scale.py --work /tmp/bench [--precisions fp8,int4_awq] [--skip-model] [--warm fp8]

Made for the GPU host (see docs/performance.md for results and the exact command used there):

1. makes (or, with --skip-model / when present, reuses) a Llama-3-8B-shaped checkpoint with random
   bf16 weights in WORK/model, through scripts/shaped_model.py (nothing is downloaded);
2. times ModelOpt's CUDA-extension compile, cold (an empty TORCH_EXTENSIONS_DIR) and warm (the same
   folder again, as a second process finds it), in that folder under trtconv's cache, so neither
   side pays the compile in the per-precision timings;
3. per precision, in its own subprocess each (so peaks are clean):
   - bare: `AutoModelForCausalLM.from_pretrained(device_map="cuda", dtype=bf16)`, `mtq.quantize`
     with the config trtconv's stages/calibrate.py builds, on the same token rows (trtconv's
     calibration rows: 64 x 256 from the built-in pack, seed 1234) in batches of 4, and
     `export_tensorrt_llm_checkpoint` exactly as stages/export.py calls it; peak GPU from
     torch.cuda.max_memory_allocated, peak host RSS from the child's ru_maxrss (os.wait4);
   - trtconv: the real `trtconv calibrate --model M --precision P --device cuda -o OUT` (default
     evaluation on), its per-stage wall_s / peak_rss_mib / peak_gpu_mib from the manifest. The
     failed-gate advice pass is off (`evaluate.sensitivity=false`): random weights always fail the
     gate, and the advice is extra work a passing conversion never does;
   - host memory both ways: peak RSS (counts the memory-mapped checkpoint's page-cache pages) and
     peak anonymous RSS (RssAnon: the process's own memory), sampled every 50 ms;
4. with --warm P, runs trtconv for P a second time (stage-cache hit) and compares with the cold run;
5. prints one table per stage (load + quantize, export, whole) and writes WORK/bench.md and
   WORK/bench.json.

`--precisions` takes fp8, int8_sq, int4_awq, w4a8_awq and fp8_kv (fp8 weights + fp8 KV cache), and
fp8_streamed: trtconv alone, fp8 through the layer-streamed path (`calibration.streaming: always`), to set
beside fp8's bare run; fp8_cap / fp8_kv_cap: trtconv alone under `--max-gpu-memory $BENCH_CAP` (default 8 GiB),
beside the uncapped fp8 / fp8_kv bare run; fp8_advice / fp8_cap_advice: the same with the failed-gate advice on
(its path, peak and time recorded). With BENCH_EXPORT=hf the bare side writes ModelOpt's unified HF
checkpoint (`export_hf_checkpoint`), what trtconv writes for the families without a legacy one (Qwen3, Gemma,
Qwen3-MoE); `--layers N` cuts a made model to N decoder layers (a MoE shape on the host's 64 GB disk).
The child modes (`_bare`, `_compile`) are internal.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = {  # name -> (trtconv --precision, --kv-cache)
    "fp8": ("fp8", "none"),
    "int8_sq": ("int8_sq", "none"),
    "int4_awq": ("int4_awq", "none"),
    "w4a8_awq": ("w4a8_awq", "none"),
    "fp8_kv": ("fp8", "fp8"),
}
# trtconv-only variants: name -> (the PRECISIONS row whose bare run they are compared with, extra trtconv arguments)
CAP_GIB = os.environ.get("BENCH_CAP", "8")  # --max-gpu-memory of the *_cap variants
VARIANTS = {
    "fp8_streamed": ("fp8", ["--set", "calibration.streaming=always"]),  # the layer-streamed path on the same model
    # Under a GPU memory cap below the whole model (calibration.streaming auto): what a user with a smaller GPU runs.
    "fp8_cap": ("fp8", ["--max-gpu-memory", CAP_GIB]),
    "fp8_kv_cap": ("fp8_kv", ["--max-gpu-memory", CAP_GIB]),
    # The failed-gate advice on (random weights fail the gate): its peak against calibration's, in memory and streamed.
    "fp8_advice": ("fp8", ["--set", "evaluate.sensitivity=true"]),
    "fp8_cap_advice": ("fp8", ["--max-gpu-memory", CAP_GIB, "--set", "evaluate.sensitivity=true"]),
}
CALIB = {"num_samples": 64, "seq_len": 256, "batch_size": 4, "seed": 1234}  # trtconv calibrate's defaults


# ---------------------------------------------------------------------------------------------
# Children


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak RssAnon of this process, sampled every 50 ms on a thread (as trtconv's StageMeter does)."""

    def __init__(self):
        import threading

        from trtconv.stages.base import _status_mib

        self.peak = 0.0
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, _status_mib("RssAnon") or 0.0)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
# Which export both sides write: "trtllm" (the legacy TensorRT-LLM checkpoint) or "hf" (the unified HF checkpoint;
# trtconv calibrate picks it by itself for the families without a legacy one, and --hf-checkpoint adds it otherwise).
EXPORT = os.environ.get("BENCH_EXPORT", "trtllm")  # "cpu" only to check the script itself on a machine without a GPU


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bare_child(model: Path, precision: str, kv_cache: str, out: Path) -> dict:
    """What a user writes with ModelOpt alone; timings of load, quantize, export."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtconv.data import samples
    from trtconv.data.packs import builtin_pack
    from trtconv.recipe.schema import QuantizationSection
    from trtconv.stages.calibrate import build_quant_config

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = samples.calibration_rows(builtin_pack("calib"), tokenizer, CALIB["num_samples"], CALIB["seq_len"], CALIB["seed"]).rows
    group = {"awq_group_size": 128} if "awq" in precision else {}  # what trtconv chooses for Llama-3-8B's shapes
    cfg = build_quant_config(QuantizationSection(precision=precision, kv_cache=kv_cache, **group))
    ids = torch.tensor(rows, dtype=torch.long)

    def forward_loop(m):
        with torch.no_grad():
            for start in range(0, len(ids), CALIB["batch_size"]):
                m(input_ids=ids[start:start + CALIB["batch_size"]].to(DEVICE), use_cache=False)

    anon = AnonPeak()
    t0 = time.monotonic()
    m = AutoModelForCausalLM.from_pretrained(model, device_map=DEVICE, dtype=torch.bfloat16)
    m.eval()
    _sync()
    t1 = time.monotonic()
    mtq.quantize(m, cfg, forward_loop)
    _sync()
    t2 = time.monotonic()
    with torch.no_grad():
        if EXPORT == "hf":  # ModelOpt's unified HF checkpoint (what trtconv writes for the families without a legacy one)
            from modelopt.torch.export import export_hf_checkpoint

            export_hf_checkpoint(m, dtype=torch.bfloat16, export_dir=out)
        else:
            export_tensorrt_llm_checkpoint(m, get_model_type(m), dtype=torch.bfloat16, export_dir=out,
                                           inference_tensor_parallel=1, inference_pipeline_parallel=1)
    t3 = time.monotonic()
    return {"load_s": t1 - t0, "quantize_s": t2 - t1, "export_s": t3 - t2,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
            "peak_rss_mib_self": _peak_rss_mib(), "peak_anon_mib": anon.stop()}


def compile_child() -> dict:
    """Load ModelOpt's CUDA extensions (int4/int8 and fp8 kernels); compiles them if the folder is empty."""
    t0 = time.monotonic()
    from modelopt.torch.quantization import extensions

    which = os.environ.get("BENCH_EXTENSIONS", "int,fp8").split(",")  # int: int4/int8 kernels (AWQ), fp8: fp8 kernels
    loaded = {}
    if "int" in which:
        loaded["modelopt_cuda_ext"] = extensions.get_cuda_ext() is not None
    if "fp8" in which:
        loaded["modelopt_cuda_ext_fp8"] = extensions.get_cuda_ext_fp8() is not None
    return {"seconds": time.monotonic() - t0, "loaded": loaded}


# ---------------------------------------------------------------------------------------------
# The parent: each measurement in its own process


def run_child(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MiB of that child alone, from wait4)."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - t0, usage.ru_maxrss / 1024


def child_result(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def bench_bare(args, env, name: str) -> dict:
    precision, kv = PRECISIONS[name]
    out = args.work / f"bare-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    log = args.work / f"bare-{name}.log"
    rc, wall, rss = run_child([sys.executable, __file__, "_bare", str(args.model), precision, kv, str(out)], env, log)
    subprocess.run(["rm", "-rf", str(out)], check=True)  # 5-16 GB each: the host's disk holds a few at most
    return {"rc": rc, "process_s": wall, "peak_rss_mib": rss, **child_result(log)}


def bench_trtconv(args, env, name: str, tag: str) -> dict:
    base, extra = VARIANTS.get(name, (name, []))
    precision, kv = PRECISIONS[base]
    out = args.work / f"trtconv-{name}"
    log = args.work / f"trtconv-{name}-{tag}.log"
    sampler = [str(ROOT / "scripts" / "stack_sampler.py"), str(args.work / f"trtconv-{name}-{tag}.stacks")] if args.sample_stacks else []
    cmd = [sys.executable, *sampler, "-m", "trtconv", "calibrate", "--model", str(args.model), "--precision", precision,
           "--kv-cache", kv, "--device", DEVICE, "-o", str(out), "--force",
           # the same rows and batches as the bare side, whatever calibrate's defaults are
           "--num-samples", str(CALIB["num_samples"]), "--seq-len", str(CALIB["seq_len"]),
           "--batch-size", str(CALIB["batch_size"]), "--seed", str(CALIB["seed"]), "--set", "evaluate.sensitivity=false", *extra]
    rc, wall, rss = run_child(cmd, env, log)
    stages = {}
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        stages = {s["name"]: s for s in manifest["stages"]}
        digest, status = manifest["artifact_digest"], manifest["status"]
        advice = (manifest.get("evaluation") or {}).get("advice") or {}
        advice = {k: advice.get(k) for k in ("path", "reused", "peak_gpu_mib", "seconds", "wall_s", "exclude_candidates", "error")
                  if k in advice}
    except (OSError, ValueError, KeyError):
        digest, status, advice = None, None, {}
    return {"rc": rc, "process_s": wall, "peak_rss_mib": rss, "stages": stages, "status": status, "digest": digest, "advice": advice,
            "command": " ".join(cmd[1 + len(sampler):])}


def stage_s(r: dict, *names: str) -> float | None:
    """Sum of the stages' times as they ran (a stage reused from the cache counts 0)."""
    total = 0.0
    for n in names:
        s = r["stages"].get(n)
        if s is None:
            return None
        total += 0.0 if s["status"] == "reused" else s["wall_s"]
    return total


def _max(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def trtconv_peak_gpu(r: dict) -> float | None:
    return _max(s.get("peak_gpu_mib") for s in r["stages"].values())


def gib(mib) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f}"


def ratio(a, b) -> str:
    return "-" if not a or b is None else f"{b / a:.2f}x"


def tables(results: dict, warm: dict) -> str:
    out = []
    out.append("### load + quantize (bare: from_pretrained + mtq.quantize; trtconv: load + calibrate stages)\n")
    out.append("| precision | bare s | trtconv s | ratio | trtconv calibrate stage s | ratio | peak GPU GiB bare / trtconv | peak host RSS GiB bare / trtconv |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        b, t = r["bare"], r["trtconv"]
        bare_lq = b.get("load_s", 0) + b.get("quantize_s", 0) if "load_s" in b else None
        t_lq, t_cal = stage_s(t, "load", "calibrate"), stage_s(t, "calibrate")
        peak_t = _max(t["stages"].get(n, {}).get("peak_gpu_mib") for n in ("load", "calibrate"))
        rss_t = _max(t["stages"].get(n, {}).get("peak_rss_mib") for n in ("load", "calibrate"))
        out.append(f"| {name} | {fmt(bare_lq)} | {fmt(t_lq)} | {ratio(bare_lq, t_lq)} | {fmt(t_cal)} | {ratio(bare_lq, t_cal)} | "
                   f"{gib(b.get('peak_gpu_mib'))} / {gib(peak_t)} | {gib(b.get('peak_rss_mib'))} / {gib(rss_t)} |")
    out.append("\n### export (export_tensorrt_llm_checkpoint; trtconv: export stage, with config repair and validation)\n")
    out.append("| precision | bare s | trtconv s | ratio | peak GPU GiB trtconv | peak host RSS GiB trtconv |")
    out.append("|---|---|---|---|---|---|")
    for name, r in results.items():
        b, t = r["bare"], r["trtconv"]
        e = t["stages"].get("export", {})
        out.append(f"| {name} | {fmt(b.get('export_s'))} | {fmt(stage_s(t, 'export'))} | {ratio(b.get('export_s'), stage_s(t, 'export'))} | "
                   f"{gib(e.get('peak_gpu_mib'))} | {gib(e.get('peak_rss_mib'))} |")
    out.append("\n### whole (bare: load + quantize + export; trtconv: the whole `trtconv calibrate` process, "
               "default evaluation included)\n")
    out.append("| precision | bare s | bare process s | trtconv process s | ratio (to bare s) | trtconv evaluate s | "
               "peak GPU GiB bare / trtconv | peak host RSS GiB bare / trtconv | peak anonymous RSS GiB bare / trtconv | trtconv status |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        b, t = r["bare"], r["trtconv"]
        whole = b.get("load_s", 0) + b.get("quantize_s", 0) + b.get("export_s", 0) if "export_s" in b else None
        out.append(f"| {name} | {fmt(whole)} | {fmt(b.get('process_s'))} | {fmt(t['process_s'])} | {ratio(whole, t['process_s'])} | "
                   f"{fmt(stage_s(t, 'evaluate'))} | {gib(b.get('peak_gpu_mib'))} / {gib(trtconv_peak_gpu(t))} | "
                   f"{gib(b.get('peak_rss_mib'))} / {gib(t['peak_rss_mib'])} | {gib(b.get('peak_anon_mib'))} / "
                   f"{gib(_max(s.get('details', {}).get('peak_rss_anon_mib') for s in t['stages'].values()))} | {t['status']} (rc {t['rc']}) |")
    if warm:
        out.append("\n### second run of an unchanged recipe (stage-cache hit)\n")
        out.append("| precision | cold trtconv process s | warm trtconv process s | warm / cold | same digest |")
        out.append("|---|---|---|---|---|")
        for name, w in warm.items():
            cold = results[name]["trtconv"]
            out.append(f"| {name} | {fmt(cold['process_s'])} | {fmt(w['process_s'])} | "
                       f"{w['process_s'] / cold['process_s']:.1%} | {w['digest'] == cold['digest']} |")
    out.append("\nPer-stage seconds of each trtconv run (as run; reused = from the cache):\n")
    for name, r in list(results.items()) + [(f"{k} (warm)", {"trtconv": v}) for k, v in warm.items()]:
        t = r["trtconv"]
        parts = ", ".join(f"{n} {s['wall_s']:.1f}{' reused' if s['status'] == 'reused' else ''} "
                          f"(GPU {gib(s.get('peak_gpu_mib'))}, RSS {gib(s.get('peak_rss_mib'))}, anon "
                          f"{gib(s.get('details', {}).get('peak_rss_anon_mib'))} GiB"
                          + (f"; {s['details']['seconds']}" if s.get("details", {}).get("seconds") else "") + ")"
                          for n, s in t["stages"].items())
        out.append(f"- {name}: {parts}")
    return "\n".join(out) + "\n"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def versions() -> dict:
    code = ("import json, torch, transformers, modelopt; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'modelopt': modelopt.__version__, "
            "'cuda': torch.version.cuda, 'card': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        v = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        v = {"error": res.stderr[-500:]}
    v["python"] = platform.python_version()
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return v


def extensions_dir(env: dict) -> str:
    """The folder trtconv compiles and loads ModelOpt's CUDA extensions in (trtconv.cache.store), under env's cache."""
    code = "from trtconv.cache.store import use_torch_extensions_cache as u; print(u())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()


def main_parent(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    args.model = args.model or args.work / "model"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("TRTCONV_CACHE", str(args.work / "trtconv-cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    # Both sides load ModelOpt's extension from the folder trtconv uses, compiled once, up front.
    ext_dir = extensions_dir(env)
    env["TORCH_EXTENSIONS_DIR"] = ext_dir
    report = {"date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(), "calibration": CALIB}
    print(json.dumps(report, indent=1), flush=True)
    if not (args.model / "config.json").is_file():
        if args.skip_model:
            raise SystemExit(f"--skip-model: {args.model} has no config.json")
        t0 = time.monotonic()
        layers = ["--layers", str(args.layers)] if args.layers else []
        subprocess.run([sys.executable, str(ROOT / "scripts" / "shaped_model.py"), args.shape, str(args.model), *layers],
                       check=True, env=env)
        report["model_made_s"] = time.monotonic() - t0
    report["model"] = {"path": str(args.model), "shape": args.shape, "layers": args.layers,
                       "bytes": sum(p.stat().st_size for p in args.model.glob("*.safetensors"))}
    log = args.work / "compile.log"
    compile_times = {}
    for tag in ("cold",) if args.skip_warm_compile else ("cold", "warm"):
        if tag == "cold" and not args.keep_extensions:
            subprocess.run(["rm", "-rf", ext_dir], check=True)
        rc, wall, _ = run_child([sys.executable, __file__, "_compile"], env, log)
        compile_times[tag] = {"rc": rc, "process_s": wall, **child_result(log)}
        print(f"extension {tag}: {compile_times[tag]}", flush=True)
    report["extension_compile"] = compile_times
    results, warm = {}, {}
    for name in args.precisions:
        if name in VARIANTS:  # compared with its base precision's bare run, when this run made one
            bare = results.get(VARIANTS[name][0], {}).get("bare", {"skipped": True})
        else:
            bare = {"skipped": True} if name in args.no_bare else bench_bare(args, env, name)
        print(f"{name} bare: {json.dumps(bare)}", flush=True)
        if name in args.bare_only:
            results[name] = {"bare": bare, "trtconv": {"rc": None, "process_s": None, "peak_rss_mib": None, "stages": {},
                                                       "status": "not run (--bare-only)", "digest": None}}
            write(args.work, report, results, warm)
            continue
        trt = bench_trtconv(args, env, name, "cold")
        print(f"{name} trtconv: process {trt['process_s']:.1f} s rc {trt['rc']} "
              + ", ".join(f"{n} {s['wall_s']:.1f}s" for n, s in trt["stages"].items()), flush=True)
        results[name] = {"bare": bare, "trtconv": trt}
        if name in args.warm:
            warm[name] = bench_trtconv(args, env, name, "warm")
            print(f"{name} trtconv warm: process {warm[name]['process_s']:.1f} s", flush=True)
        # The artifact and its cache entries (hard links of the same 5-16 GB) are not needed any more;
        # the hash table and the compiled extension stay.
        subprocess.run(["rm", "-rf", str(args.work / f"trtconv-{name}"), str(Path(env["TRTCONV_CACHE"]) / "stages")], check=True)
        write(args.work, report, results, warm)  # after each precision: a run cut short still reports
    print(write(args.work, report, results, warm))


def write(work: Path, report: dict, results: dict, warm: dict) -> str:
    text = tables(results, warm)
    (work / "bench.json").write_text(json.dumps({**report, "results": results, "warm": warm}, indent=1) + "\n")
    (work / "bench.md").write_text(text)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        model, precision, kv, out = sys.argv[2:6]
        print("RESULT " + json.dumps(bare_child(Path(model), precision, kv, Path(out))), flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_compile":
        print("RESULT " + json.dumps(compile_child()), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"), help="Folder for the model, outputs, logs, tables.")
    ap.add_argument("--model", type=Path, help="Use this checkpoint (default WORK/model, made if missing).")
    ap.add_argument("--shape", default="llama3-8b", help="shaped_model.py shape when the model is made.")
    ap.add_argument("--skip-model", action="store_true", help="Never make the model; fail if it is missing.")
    ap.add_argument("--layers", type=int, help="Decoder layers of the made model (default: the shape's own).")
    ap.add_argument("--precisions", default="fp8,int4_awq", help=f"Comma list of {', '.join(PRECISIONS)}.")
    ap.add_argument("--warm", default="fp8", help="Comma list of precisions to run a second time (cache hit); '' for none.")
    ap.add_argument("--keep-extensions", action="store_true", help="Do not empty TORCH_EXTENSIONS_DIR before the cold compile.")
    ap.add_argument("--no-bare", default="", help="Comma list of precisions to run trtconv only (bare measured in an earlier run).")
    ap.add_argument("--bare-only", default="", help="Comma list of precisions to run bare ModelOpt only (trtconv measured in an earlier run).")
    ap.add_argument("--skip-warm-compile", action="store_true", help="Time only the cold compile (it must run before the precisions anyway).")
    ap.add_argument("--sample-stacks", action="store_true",
                    help="Run trtconv under scripts/stack_sampler.py: WORK/trtconv-P-TAG.stacks.{timeline,top}.txt.")
    args = ap.parse_args()
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.warm = [p for p in args.warm.split(",") if p]
    args.no_bare = [p for p in args.no_bare.split(",") if p]
    args.bare_only = [p for p in args.bare_only.split(",") if p]
    bad = [p for p in args.precisions + args.warm if p not in PRECISIONS and p not in VARIANTS]
    if bad:
        ap.error(f"unknown precision {bad[0]!r}; allowed: {', '.join([*PRECISIONS, *VARIANTS])}")
    main_parent(args)


if __name__ == "__main__":
    main()
