"""The independent check of an artifact's gate: ModelOpt's own fake-quantized model, in memory, no export.

Usage: python scripts/modelopt_vs_executor.py ARTIFACT MODEL_DIR [OUT.json]

Re-calibrates MODEL_DIR with the artifact's recipe (same calibration documents, same group size)
through `mtq.quantize`, measures KL and top-1 agreement against the original on the artifact's
evaluation documents, and prints them beside the gate's numbers (trtconv's reference executor on
the exported files) with the gate's 95% interval. tests/test_pretrained.py asserts the same on a
smaller evaluation; docs/accuracy.md records the numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pretrained import modelopt_in_memory_stats  # noqa: E402


def main(artifact: Path, model_dir: Path, out: Path | None) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    theirs = modelopt_in_memory_stats(model_dir, manifest)
    ours = manifest["metrics"]
    rows = {}
    for metric in ("ppl_baseline", "ppl_candidate", "mean_kl", "top1_agreement"):
        o, t = ours[metric], theirs[metric]
        inside = o["ci_low"] is not None and o["ci_low"] <= t["value"] <= o["ci_high"]
        rows[metric] = {"executor_on_files": o, "modelopt_in_memory": t, "modelopt_inside_executor_interval": inside}
        print(f"{metric}: executor {o['value']:.5g} [{o['ci_low']:.5g}, {o['ci_high']:.5g}]  "
              f"modelopt {t['value']:.5g} [{t['ci_low']:.5g}, {t['ci_high']:.5g}]  inside={inside}")
    if out:
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
