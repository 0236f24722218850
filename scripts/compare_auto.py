"""`precision: auto` side by side with the two other ways to a passing artifact (issue 21, item 3), on one model.

    python3 scripts/compare_auto.py --auto OUT_AUTO --work WORK [--advice OUT_FP8] [--device cpu]

OUT_AUTO is a `trtconv calibrate --precision auto` artifact (passing or not); OUT_FP8, optional, a failed
single-precision artifact whose manifest holds the failed-gate advice. Every contender is judged by trtconv's
own gate code (stages.evaluate.evaluate_checkpoint) on the auto artifact's evaluation rows, so the numbers
compare:

1. the auto artifact's unified HF checkpoint, as shipped;
2. ModelOpt's own `mtq.auto_quantize` (method kl_div: ModelOpt's format search under an effective-bits budget)
   with the same formats, on the recipe's calibration rows, at the auto artifact's effective bits, exported with
   `export_hf_checkpoint`. ModelOpt counts bits without the scales; the table gives every checkpoint's bits
   counted one way, from its files (checkpoints.export_bits.mixed_weight_bits);
3. with --advice: the advice's suggested `quantization.exclude` applied to the same precision (a real
   `trtconv calibrate` run in WORK/advice).

Writes WORK/compare_auto.json and prints a table (bits, KL with its 95% interval, top-1, the default gates' verdict).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT))
from bench_auto import model_opt_formats  # noqa: E402  (scripts/, the script's own folder)


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))


def _recipe(artifact: Path):
    from trtconv.recipe.schema import load_recipe

    return load_recipe(str(artifact / "recipe.yaml"))[0].resolved()


def _rows(recipe, model_dir: Path):
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.data import samples
    from trtconv.stages.load import data_packs

    tok = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    c, e = recipe.calibration, recipe.evaluate
    calib = samples.calibration_rows(data_packs(c.data, "calibration"), tok, c.num_samples, c.seq_len, c.seed)
    evals = samples.evaluation_rows(data_packs(e.data, "evaluation"), tok, e.num_samples, e.seq_len, e.seed)
    return calib, evals


def auto_quantize(recipe, model_dir: Path, calib, bits: float, out: Path, device: str, score_batches: int | None = None,
                  state_file: Path | None = None) -> dict:
    """ModelOpt's auto_quantize at `bits` over the recipe's candidates, exported as the unified HF checkpoint.
    Calibrated on every calibration batch; scored on the first `score_batches` (all when None). With `state_file`,
    ModelOpt's own search checkpoint: its scores are saved there, and read back (no scoring) when it exists."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    size = recipe.calibration.batch_size
    batches = [torch.tensor(calib.rows[i:i + size], device=device) for i in range(0, len(calib.rows), size)]
    from trtconv.stages.search import candidates_of

    formats = model_opt_formats(candidates_of(recipe.quantization))
    target = modelopt_target(model, bits)
    restored = bool(state_file and state_file.exists())
    t0 = time.monotonic()
    model, state = mtq.auto_quantize(model, constraints={"effective_bits": target}, quantization_formats=formats,
                                     data_loader=batches, forward_step=lambda m, b: m(input_ids=b, use_cache=False).logits,
                                     method="kl_div", num_calib_steps=len(batches), num_score_steps=score_batches or len(batches),
                                     checkpoint=str(state_file) if state_file else None)
    seconds = time.monotonic() - t0
    if device == "cpu":
        model = model.to(torch.bfloat16)  # what trtconv exports from a CPU run: the checkpoint's own dtype
    export_hf_checkpoint(model, export_dir=str(out))
    return {"seconds": round(seconds, 1), "scores_restored_from": str(state_file) if restored else None, "effective_bits_target": bits, "modelopt_target": round(target, 3),
            "best": str(state.get("best", {}).get("constraints")),
            "score_rows": sum(len(b) for b in batches[: score_batches or len(batches)]), "calibration_rows": len(calib.rows)}


def modelopt_target(model, bits: float) -> float:
    """`bits` per decoder linear weight (the files' count, checkpoints.export_bits) as auto_quantize's effective_bits,
    which also counts lm_head, a format it searches too (it chose 16-bit there on SmolLM2): at 13.87 asked in its
    count it shipped 13.18 in the files'. Same bits in one count: lm_head's share at 16 bits added."""
    import torch

    head = model.get_output_embeddings().weight.numel()
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}" and not n.endswith((".gate", ".router")))
    share = head / (head + linears)
    return (1 - share) * bits + share * 16


def judge(recipe, model_dir: Path, hf_dir: Path, evals, device: str) -> dict:
    """trtconv's gate on one unified HF checkpoint: the statistics with intervals, the default gates' verdict."""
    from trtconv.checkpoints.export_bits import mixed_weight_bits
    from trtconv.core.ui import Reporter
    from trtconv.gate import stats
    from trtconv.stages.evaluate import evaluate_checkpoint

    outcome = evaluate_checkpoint(recipe, model_dir, hf_dir, evals, device, Reporter(quiet=True), weight_errors=False)
    pick = lambda m: {k: outcome.summary[m][k] for k in ("value", "ci_low", "ci_high")}  # noqa: E731
    return {"bits": round(mixed_weight_bits(hf_dir).bits_per_weight, 3), "mean_kl": pick("mean_kl"),
            "top1_agreement": pick("top1_agreement"),
            "passed": stats.gates_passed(outcome.gates, recipe.evaluate.allow_inconclusive),
            "failed_gates": [g.metric for g in outcome.gates if g.verdict != "pass"]}


def advice_run(fp8: Path, model_dir: Path, out: Path) -> Path:
    """The advice's exclude list applied: the same command as the failed run, plus the exclude."""
    man = _manifest(fp8)
    advice = (man.get("evaluation") or {}).get("advice") or {}
    exclude = advice.get("suggested_exclude") or []
    if not exclude:
        raise SystemExit(f"{fp8}: its manifest holds no suggested exclude list (advice: {sorted(advice)})")
    recipe = (fp8 / "recipe.yaml").read_text(encoding="utf-8")
    import yaml

    r = yaml.safe_load(recipe)
    r.setdefault("quantization", {})["exclude"] = list(r["quantization"].get("exclude") or []) + list(exclude)
    r.setdefault("evaluate", {})["sensitivity"] = False
    r.setdefault("export", {})["hf_checkpoint"] = True
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(r), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "trtconv", "build", str(out / "recipe.yaml"), "-o", str(out / "artifact"), "--force"],
                   check=False, cwd=ROOT)
    return out / "artifact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--auto", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--advice", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-auto-quantize", action="store_true",
                    help="skip mtq.auto_quantize (on the 2-core CPU its kl_div scoring of SmolLM2 takes about 18 min per batch of 8 rows)")
    ap.add_argument("--score-batches", type=int, help="calibration batches mtq.auto_quantize scores on (default all): "
                    "the first N of calibration.batch_size rows each; at batch size 8, 1 = as many rows as trtconv's "
                    "per-layer sensitivity uses (stages.search.SENSITIVITY_EVAL_ROWS), though not the same rows (it "
                    "spreads its 8 over the calibration set)")
    ap.add_argument("--search-state", type=Path, help="ModelOpt's auto_quantize checkpoint: its scores are saved there, and "
                    "reused when it exists (same model, formats and score rows), so a second target costs no scoring")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(a.auto)
    from trtconv.stages.load import resolve_model_dir

    model_dir = resolve_model_dir(recipe.model)
    calib, evals = _rows(recipe, model_dir)
    rows = {"auto (trtconv)": judge(recipe, model_dir, a.auto / "hf_checkpoint", evals, a.device)}
    bits = rows["auto (trtconv)"]["bits"]
    if not a.no_auto_quantize:
        aq = a.work / "auto_quantize"
        meta = auto_quantize(recipe, model_dir, calib, bits, aq, a.device, a.score_batches, a.search_state)
        rows["mtq.auto_quantize"] = {**judge(recipe, model_dir, aq, evals, a.device), **meta}
    if a.advice:
        art = advice_run(a.advice, model_dir, a.work / "advice")
        rows["advice's exclude list"] = judge(recipe, model_dir, art / "hf_checkpoint", evals, a.device)
    (a.work / "compare_auto.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print("| contender | bits/weight | KL [95% interval] | top-1 | default gates |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        kl, t1 = r["mean_kl"], r["top1_agreement"]
        print(f"| {name} | {r['bits']:.2f} | {kl['value']:.4g} [{kl['ci_low']:.4g}, {kl['ci_high']:.4g}] | {t1['value']:.3f} | "
              f"{'pass' if r['passed'] else 'fail: ' + ', '.join(r['failed_gates'])} |")


if __name__ == "__main__":
    main()
