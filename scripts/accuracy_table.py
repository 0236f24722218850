"""Measure every shipped recipe on its reference model and print the accuracy table (Markdown).

    .venv/bin/python scripts/accuracy_table.py [--recipes default llama-ref-int4-awq ...] [--out DIR]

Each recipe runs through the real pipeline (calibrate -> export -> reference executor -> gate);
the table reports what the manifests recorded, plus the machine it ran on. docs/accuracy.md
holds a copy of its output with the date; rerun it after any change to quantization or export.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    from trtconv.core.environment import detect_device, package_versions
    from trtconv.core.errors import GateFailed
    from trtconv.pipeline import BuildOptions, build
    from trtconv.recipe.schema import builtin_recipe_names, load_recipe
    from trtconv.core.ui import Reporter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=[n for n in builtin_recipe_names() if n != "default"])
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here (default: a temp folder)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    root = args.out or Path(tempfile.mkdtemp(prefix="trtconv-accuracy-"))
    rows = []
    for name in args.recipes:
        recipe, _ = load_recipe(name)
        out = root / name
        try:
            outcome = build(recipe, BuildOptions(out=out, force=True, device=args.device), Reporter(quiet=True))
        except GateFailed as exc:
            outcome = exc.args[0]
        m = outcome.manifest
        stage = {s.name: s for s in m.stages}
        ckpt_bytes = sum(f.size for f in m.outputs if f.path.startswith("checkpoint/"))
        met = m.metrics
        rows.append(
            [
                name,
                m.recipe["model"]["reference"] or m.recipe["model"]["path"],
                m.recipe["quantization"]["precision"] + ("+kv fp8" if m.recipe["quantization"]["kv_cache"] == "fp8" else ""),
                f"{met['ppl_baseline']['value']:.2f}",
                f"{met['ppl_candidate']['value']:.2f}",
                f"{met['ppl_increase_pct']['value']:+.2f} [{met['ppl_increase_pct']['ci_low']:+.2f}, {met['ppl_increase_pct']['ci_high']:+.2f}]",
                f"{met['mean_kl']['value']:.5f} [{met['mean_kl']['ci_low']:.5f}, {met['mean_kl']['ci_high']:.5f}]",
                f"{met['top1_agreement']['value']:.4f} [{met['top1_agreement']['ci_low']:.4f}, {met['top1_agreement']['ci_high']:.4f}]",
                f"{ckpt_bytes / 2**20:.2f}",
                f"{stage['calibrate'].wall_s:.1f}",
                m.status,
            ]
        )
    device = detect_device(args.device)
    v = package_versions()
    header = ["recipe", "model", "precision", "ppl orig", "ppl artifact", "ppl increase % [95% CI]", "KL [95% CI]",
              "top-1 agreement [95% CI]", "checkpoint MiB", "calibrate s", "gate"]
    print(f"Machine: {device.name} ({device.kind}{', SM ' + device.sm if device.sm else ''}, {device.count} "
          f"{'GPUs' if device.kind == 'cuda' else 'CPU threads'}); torch {v['torch']}, transformers {v['transformers']}, "
          f"nvidia-modelopt {v['nvidia-modelopt']}, trtconv {v['trtconv']}")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    (root / "accuracy_table.json").write_text(json.dumps({"device": device.to_dict(), "versions": v, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
