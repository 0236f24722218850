"""The failed-gate advice (trtconv.gate.sensitivity) for an existing artifact, against the shipped gate.

Usage: python scripts/sensitivity_of.py ARTIFACT MODEL_DIR [OUT.json] [--streamed] [--device cuda]

What `trtconv build` prints after a failed gate, for an artifact built with other gates (e.g. by
scripts/measure_precisions.py, which opens the gates to record numbers): the same evaluation tokens,
the precision's shipped max_kl, the artifact's measured KL (worst pack), read from the checkpoint the
gate judged. Prints the advice, then one JSON line with its time and peak GPU memory (the GPU
benchmark hook: --device cuda, and --streamed for the layer-streamed original).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(artifact: Path, model_dir: Path, out: Path | None, streamed: bool, device: str) -> None:
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data import samples
    from trtconv.gate import sensitivity
    from trtconv.recipe.schema import Recipe
    from trtconv.stages.evaluate import candidate_dir

    manifest = json.loads((artifact / "manifest.json").read_text())
    data = manifest["recipe"]
    data["evaluate"]["gates"] = {}
    data["quantization"]["awq_group_size"] = manifest["calibration"].get("awq_group_size")
    recipe = Recipe.model_validate(data).resolved()
    tok = load_tokenizer(model_dir, False)
    tokens = samples.evaluation_rows(samples.builtin_packs("evaluation"), tok, recipe.evaluate.num_samples,
                                     recipe.evaluate.seq_len, recipe.evaluate.seed)
    metrics = manifest["metrics"]
    measured = max(m["mean_kl"]["value"] for m in [metrics, *(metrics.get("packs") or {}).values()])

    checkpoint = candidate_dir(recipe, artifact)
    record = sensitivity.run(model_dir, checkpoint, recipe, tokens, measured, device, Reporter(), streamed,
                             {"checkpoint": checkpoint.name, "export": f"of {artifact}"}).record()
    for line in sensitivity.advice_lines(record, recipe.quantization.exclude, recipe.evaluate.gates.max_kl):
        print(line)
    if out:
        out.write_text(json.dumps(record, indent=1))
    calibration = next((s for s in manifest["stages"] if s["name"] == "calibrate"), {})
    print(json.dumps({"precision": recipe.quantization.precision, "path": record["path"], "wall_s": record["wall_s"],
                      "seconds": record["seconds"], "peak_gpu_mib": record["peak_gpu_mib"],
                      "calibration_peak_gpu_mib": calibration.get("peak_gpu_mib"), "layers": record["num_layers"]}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--streamed", action="store_true", help="read the original's decoder layers one at a time")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    a = parser.parse_args()
    main(a.artifact, a.model_dir, a.out, a.streamed, a.device)
