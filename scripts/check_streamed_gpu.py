"""On a GPU: the streamed evaluation's copy stream and its parking change no number (run on the GPU host).

    python3 scripts/check_streamed_gpu.py WORK_DIR [--shape llama3-1b --layers 4]

Makes a shaped checkpoint (random weights), exports it to fp8 with `trtconv calibrate` (evaluation
off), then runs the layer-streamed evaluation three ways on the GPU: as shipped (layers copied on
their own CUDA stream; vocabulary matrices resident), with the copies on the default stream
(CopyStream off), and with the vocabulary matrices parked on the host. Every per-document statistic,
every token's KL and every weight error must be bit-identical; prints the seconds of each.
CPU tests cannot cover this: on a CPU neither the copy stream nor parking does anything.
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
    from trtconv.stages.evaluate import evaluate_streamed

    recipe = recipe_from_dict({"name": "check", "model": {"path": str(model), "dtype": "bfloat16"},
                               "quantization": {"precision": "fp8"}}).resolved()
    tok = load_tokenizer(model, False)
    e = recipe.evaluate
    tokens = evaluation_rows(builtin_packs("evaluation"), tok, e.num_samples, e.seq_len, e.seed)
    shipped = es.CopyStream

    class DefaultStream(shipped):
        def __init__(self, device):
            super().__init__("cpu")

    runs = {}
    for name, copies, park in (("shipped", shipped, False), ("default stream", DefaultStream, False), ("parked", shipped, True)):
        es.CopyStream = copies
        t = time.monotonic()
        outcome = evaluate_streamed(recipe, model, out / "checkpoint", tokens, a.device, Reporter(quiet=True), True, park)
        runs[name] = (outcome, time.monotonic() - t)
        print(f"{name}: {runs[name][1]:.2f} s, laps {outcome.seconds}", flush=True)
    es.CopyStream = shipped
    ref = runs["shipped"][0]
    ok = True
    for name, (outcome, _) in runs.items():
        same = all(np.array_equal(getattr(ref.stats, f), getattr(outcome.stats, f)) for f in
                   ("n_tokens", "nll_baseline", "nll_candidate", "kl", "top1_agree", "token_kl"))
        same = same and ref.weight_errors == outcome.weight_errors
        ok = ok and same
        print(f"{name}: {'identical' if same else 'DIFFERENT'} to shipped (mean KL {outcome.stats.kl.sum() / outcome.stats.n_tokens.sum():.6g})",
              flush=True)
    print("CHECK", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
