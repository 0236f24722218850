"""The failed-gate advice (trtconv.gate.sensitivity) for an existing artifact, against the shipped gate.

Usage: python scripts/sensitivity_of.py ARTIFACT MODEL_DIR [OUT.json]

What `trtconv build` prints after a failed gate, for an artifact built with other gates (e.g. by
scripts/measure_precisions.py, which opens the gates to record numbers): the same calibration and
evaluation tokens, the precision's shipped max_kl, the artifact's measured KL (worst pack).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(artifact: Path, model_dir: Path, out: Path | None) -> None:
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data import samples
    from trtconv.gate import sensitivity
    from trtconv.recipe.schema import Recipe

    manifest = json.loads((artifact / "manifest.json").read_text())
    data = manifest["recipe"]
    data["evaluate"]["gates"] = {}
    data["quantization"]["awq_group_size"] = manifest["calibration"].get("awq_group_size")
    recipe = Recipe.model_validate(data).resolved()
    tok = load_tokenizer(model_dir, False)
    calib = samples.calibration_rows(samples.builtin_packs("calibration"), tok, recipe.calibration.num_samples,
                                     recipe.calibration.seq_len, recipe.calibration.seed)
    tokens = samples.evaluation_rows(samples.builtin_packs("evaluation"), tok, recipe.evaluate.num_samples,
                                     recipe.evaluate.seq_len, recipe.evaluate.seed)
    metrics = manifest["metrics"]
    measured = max(m["mean_kl"]["value"] for m in [metrics, *(metrics.get("packs") or {}).values()])
    record = sensitivity.run(model_dir, recipe, calib, tokens, measured, "cpu", Reporter()).record()
    for line in sensitivity.advice_lines(record, recipe.quantization.exclude, recipe.evaluate.gates.max_kl):
        print(line)
    if out:
        out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
