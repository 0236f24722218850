"""On a GPU: the layer-streamed unified HF export and evaluation against the in-memory ones (run on the GPU host).

    python3 scripts/check_streamed_hf_gpu.py WORK_DIR [--families qwen3,gemma3,qwen3_moe] [--device cuda]

For each family's tiny model (tests/factories.py): calibrate + export fp8 with an FP8 KV cache both ways on
the device (bf16 compute there, float32 on a CPU), compare hf_checkpoint/ file by file (PASS needs every byte
equal), then judge the streamed checkpoint both ways and print the largest difference of every per-document
statistic and of the weight errors (on a GPU the matrix products may differ in the last bits between the
whole model and one layer: for information; the verdicts must agree). CPU tests cover the bytes and the
statistics exactly; this covers the device path (kept-as-stored weights, the copy stream, parking).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(work: Path, family: str, device: str) -> bool:
    import numpy as np

    from tests.contract.test_streaming_hf import _differing, _recipe
    from tests.factories import make_tiny_model
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import calibration_rows, evaluation_rows
    from trtconv.pipeline import run_calibrate_and_export
    from trtconv.stages.evaluate import evaluate_checkpoint

    model = make_tiny_model(work / family / "m", family, hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
    recipe = _recipe(model, "fp8", "fp8", samples=16)
    recipe = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
        "num_samples": 8, "seq_len": 64, "batch_size": 4})}).resolved()
    tok = load_tokenizer(model, False)
    c, e = recipe.calibration, recipe.evaluate
    rows = calibration_rows(builtin_pack("calib"), tok, c.num_samples, c.seq_len, c.seed)
    arch = json.loads((model / "config.json").read_text())["architectures"][0]
    dirs, seconds = {}, {}
    for streamed in (False, True):
        t = time.monotonic()
        exported = run_calibrate_and_export(recipe, model, arch, tok, rows, work / family / str(streamed), device,
                                            Reporter(quiet=True), streamed=streamed)[0]
        dirs[streamed], seconds[f"export_{streamed}"] = exported.hf_checkpoint_dir, round(time.monotonic() - t, 2)
    a, b = dirs[False], dirs[True]
    names = sorted(p.name for p in a.iterdir())
    differ = {n: _differing(a / n, b / n) for n in names if not (b / n).is_file() or (a / n).read_bytes() != (b / n).read_bytes()}
    same_files = names == sorted(p.name for p in b.iterdir()) and not differ
    tokens = evaluation_rows(builtin_pack("eval"), tok, e.num_samples, e.seq_len, e.seed)
    runs = {}
    for streamed in (False, True):
        t = time.monotonic()
        runs[streamed] = evaluate_checkpoint(recipe, model, b, tokens, device, Reporter(quiet=True), streamed=streamed)
        seconds[f"evaluate_{streamed}"] = round(time.monotonic() - t, 2)
    x, y = runs[False], runs[True]
    diffs = {f: float(np.max(np.abs(np.asarray(getattr(x.stats, f), float) - np.asarray(getattr(y.stats, f), float))))
             for f in ("nll_baseline", "nll_candidate", "kl", "top1_agree", "token_kl")}
    werr = max((abs(p - q) for (_, p), (_, q) in zip(x.weight_errors, y.weight_errors)), default=0.0)
    verdicts = [(g.metric, g.verdict) for g in x.gates] == [(g.metric, g.verdict) for g in y.gates]
    print(json.dumps({"family": family, "device": device, "files_identical": same_files, "differing": differ,
                      "paths": [x.record["path"], y.record["path"]], "max_abs_diff": diffs, "weight_error_diff": werr,
                      "same_weight_error_names": [n for n, _ in x.weight_errors] == [n for n, _ in y.weight_errors],
                      "verdicts_agree": verdicts, "seconds": seconds}), flush=True)
    return same_files and verdicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--families", default="qwen3,gemma3,qwen3_moe")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    ok = all([one(a.work, f, a.device) for f in a.families.split(",")])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
