"""The artifact folder's names, written once.

Every stage writes into the same folder and several commands (`engine`, `verify`, `check`, the
cache) read it back, so a folder name spelled twice is a rename waiting to break half of them.
The names below are the artifact's public layout (README, docs/artifact.md); changing one changes
the artifact digest.

    OUT/
      manifest.json        what was built, from what, with which versions; the digest
      recipe.yaml          the resolved recipe (every default explicit)
      report.md            human report; a run record (wall times), outside the digest
      report_*.png         its plots: no times in them, so inside the digest (a reviewer reads them)
      checkpoint/          TensorRT-LLM checkpoint (config.json + rank{N}.safetensors)
      hf_checkpoint/       ModelOpt's unified HF checkpoint (export.hf_checkpoint)
      tokenizer/           the model's tokenizer, saved next to the weights
      engine/              what the engine target made (TensorRT engines or LLM-API options)
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
RECIPE_NAME = "recipe.yaml"
REPORT_NAME = "report.md"
# `trtconv sign`'s default signature file: inside OUT, in neither the manifest nor the signed file list.
SIGNATURE_NAME = "model.sig"
WEIGHT_PLOT = "report_weight_error.png"
KL_PLOT = "report_token_kl.png"
SENSITIVITY_PLOT = "report_sensitivity.png"  # only after a failed gate's sensitivity pass
SEARCH_PLOT = "report_search.png"  # only for quantization.precision: auto (trtconv.stages.search)

CHECKPOINT_DIR = "checkpoint"
HF_CHECKPOINT_DIR = "hf_checkpoint"
TOKENIZER_DIR = "tokenizer"
ENGINE_DIR = "engine"

# The payload folders, in the order the report lists their sizes.
PAYLOAD_DIRS: tuple[str, ...] = (CHECKPOINT_DIR, HF_CHECKPOINT_DIR, ENGINE_DIR, TOKENIZER_DIR)

# Run records: listed and verified like every file, but left out of the digest, because they hold
# wall times and dates that differ between two runs that produced the same artifact.
RUN_RECORDS: frozenset[str] = frozenset({REPORT_NAME})


def is_hf_checkpoint(folder: Path) -> bool:
    """A folder holding the unified HF checkpoint (config.json, no TensorRT-LLM rank files)."""
    return not (folder / "rank0.safetensors").is_file() and (folder / "config.json").is_file()
