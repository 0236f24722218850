"""Which fp8 units of a precision-auto artifact's chosen mix hurt one evaluation document, and how they add up.

    python3 scripts/unit_kl_on_document.py --auto OUT_AUTO --document stdlib:keyword [--top 8]

The original model is quantized to fp8 by trtconv's calibrate stage on the artifact recipe's calibration rows (real
ModelOpt, CPU float32); the document's KL against the original is measured with the fp8 quantizers of: every unit
the chosen trial put in fp8, the whole model, and each of those units alone. Prints the numbers and writes them as
JSON to stdout's last line. Used for docs/accuracy.md (per-GEMM mixes failing on one document).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_auto import _recipe, _rows  # noqa: E402  (scripts/, the script's own folder)


def unit_paths(unit: str) -> list[str]:
    """Module paths of a search unit's name ('model.layers.2.mlp.gate_proj+up_proj' -> its two linears)."""
    parent, leaves = unit.rsplit(".", 1)
    return [f"{parent}.{leaf}" for leaf in leaves.split("+")] if "+" in leaves else [unit]


def main() -> None:
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.core.ui import Reporter
    from trtconv.gate import sensitivity as s
    from trtconv.stages import calibrate
    from trtconv.stages.load import resolve_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--auto", type=Path, required=True)
    ap.add_argument("--document", required=True)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    recipe = _recipe(a.auto)
    model_dir = resolve_model_dir(recipe.model)
    calib, evals = _rows(recipe, model_dir)
    i = evals.doc_ids.index(a.document)
    ids, n = torch.tensor([evals.rows[i]]), evals.lengths[i]
    model = load_hf_model(model_dir, "float32", recipe.model.trust_remote_code, "cpu").eval()
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    section = recipe.quantization.model_copy(update={"precision": "fp8", "search": None})
    calibrate.run(model, section, calib, recipe.calibration.batch_size, "cpu", Reporter(quiet=True))
    found = json.loads((a.auto / "manifest.json").read_text(encoding="utf-8"))["calibration"]["search"]
    formats = next(t for t in found["trials"] if t["trial"] == found["chosen_trial"])["formats"]
    enabled = s._enabled_quantizers(model)

    def kl_with(paths: list[str]) -> float:
        s._set_quantizers(model, lambda q: q in enabled and any(q.startswith(p + ".") for p in paths))
        return s._kl(model, ids, [n], base)  # the sensitivity pass's own per-token KL, averaged over the document

    fp8 = [u for u, f in formats.items() if f == "fp8"]
    out = {"document": a.document, "tokens": n, "fp8_units": len(fp8),
           "mix_fp8_units_together": kl_with([p for u in fp8 for p in unit_paths(u)]), "whole_model_fp8": kl_with(["model"]),
           "each_unit_alone": dict(sorted(((u, kl_with(unit_paths(u))) for u in fp8), key=lambda kv: -kv[1])[: a.top])}
    for k, v in out.items():
        print(k, v if not isinstance(v, dict) else "")
    for u, v in out["each_unit_alone"].items():
        print(f"  {v:.4f} {u}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
