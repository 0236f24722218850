"""On a GPU: the streamed evaluation's copy stream and its parking change no number (run on the GPU host).

    python3 scripts/check_streamed_gpu.py WORK_DIR [--shape llama3-1b --layers 4]

Makes a shaped checkpoint (random weights), exports it to fp8 with `trtconv calibrate` (evaluation
off), then runs the layer-streamed evaluation three ways on the GPU: as shipped (layers copied on
their own CUDA stream; vocabulary matrices resident), with the copies on the default stream
(CopyStream off), and with the vocabulary matrices parked on the host. Every per-document statistic,
every token's KL and every weight error must be bit-identical; prints the seconds of each.
CPU tests cannot cover this: on a CPU neither the copy stream nor parking does anything.

Then, for information (not part of PASS): the in-memory path under the same TF32 setting, and the
shipped streamed path with the candidate's matrix products in full float32 (how far TF32 moves the
gate metrics; stages/evaluate.py gpu_matmuls).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--shape", default="llama3-1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cpu: only checks that the script runs (nothing differs there)")
    a = ap.parse_args()
    model, out = a.work / "model", a.work / "out"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "shaped_model.py"), a.shape, str(model), "--layers", str(a.layers)],
                       check=True)
    subprocess.run([sys.executable, "-m", "trtconv", "calibrate", "--model", str(model), "--precision", "fp8", "--device", a.device,
                    "-o", str(out), "--force", "--no-cache", "--set", "evaluate.enabled=false"], check=True, cwd=ROOT)

    import numpy as np

    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data.samples import builtin_packs, evaluation_rows
    from trtconv.recipe.schema import recipe_from_dict
    from trtconv.stages import evaluate_streamed as es
    from trtconv.stages.evaluate import evaluate_checkpoint, evaluate_streamed

    recipe = recipe_from_dict({"name": "check", "model": {"path": str(model), "dtype": "bfloat16"},
                               "quantization": {"precision": "fp8"}}).resolved()
    tok = load_tokenizer(model, False)
    e = recipe.evaluate
    tokens = evaluation_rows(builtin_packs("evaluation"), tok, e.num_samples, e.seq_len, e.seed)
    shipped = es.CopyStream

    class DefaultStream(shipped):
        def __init__(self, device):
            super().__init__("cpu")

    def timed(name, fn):
        t = time.monotonic()
        outcome = fn()
        print(f"{name}: {time.monotonic() - t:.2f} s, laps {outcome.seconds}", flush=True)
        return outcome

    ckpt = out / "checkpoint"
    runs = {}
    for name, copies, park in (("shipped", shipped, False), ("default stream", DefaultStream, False), ("parked", shipped, True)):
        es.CopyStream = copies
        runs[name] = timed(name, lambda park=park: evaluate_checkpoint(recipe, model, ckpt, tokens, a.device, Reporter(quiet=True),
                                                                       streamed=True, park=park))
    es.CopyStream = shipped
    ref = runs["shipped"]
    ok = True
    for name, outcome in runs.items():
        same = identical(ref, outcome)
        ok = ok and same
        print(f"{name}: {'identical' if same else 'DIFFERENT'} to shipped ({summary(outcome)})", flush=True)
    print("CHECK", "PASS" if ok else "FAIL", flush=True)

    # For information: the in-memory path (same TF32 setting), and full-float32 candidate products.
    memory = timed("in memory", lambda: evaluate_checkpoint(recipe, model, ckpt, tokens, a.device, Reporter(quiet=True)))
    print(f"in memory: {'identical' if identical(ref, memory) else 'different'} to shipped streamed ({summary(memory)})", flush=True)
    full = timed("float32 products", lambda: evaluate_streamed(recipe, model, ckpt, tokens, a.device, Reporter(quiet=True), True, False))
    print(f"float32 products: {'identical' if identical(ref, full) else 'different'} to shipped ({summary(full)}); "
          f"largest per-document change: KL {np.abs(full.stats.kl - ref.stats.kl).max():.3g} nats, "
          f"candidate NLL {np.abs(full.stats.nll_candidate - ref.stats.nll_candidate).max():.3g} nats, "
          f"top-1 agreements {np.abs(full.stats.top1_agree - ref.stats.top1_agree).max():.0f} tokens", flush=True)
    for metric in ("mean_kl", "top1_agreement", "ppl_increase_pct"):
        print(f"  {metric}: TF32 {ref.summary[metric]['value']:.6g}, float32 {full.summary[metric]['value']:.6g}", flush=True)
    sys.exit(0 if ok else 1)


def identical(ref, outcome) -> bool:
    import numpy as np

    return all(np.array_equal(getattr(ref.stats, f), getattr(outcome.stats, f)) for f in
               ("n_tokens", "nll_baseline", "nll_candidate", "kl", "top1_agree", "token_kl")) and ref.weight_errors == outcome.weight_errors


def summary(outcome) -> str:
    s = outcome.stats
    return f"mean KL {s.kl.sum() / s.n_tokens.sum():.6g}, top-1 agreement {s.top1_agree.sum() / s.n_tokens.sum():.6g}"


if __name__ == "__main__":
    main()
