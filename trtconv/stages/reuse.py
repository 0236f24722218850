"""What the pipeline stores in, and takes back from, the stage cache (trtconv/cache/store.py).

Two units are cached, each under a key that covers everything that can change its bytes:

- **export** (calibrate + export together): the files of checkpoint/, hf_checkpoint/ and tokenizer/,
  with the calibration and export records as metadata. Key: the model's file hashes, its load dtype
  and trust_remote_code, the quantization / calibration / export sections (data paths replaced by
  the data's sha256), the versions of trtconv (and its source), torch, transformers, ModelOpt,
  TensorRT-LLM and TensorRT, and the device (CPU, or GPU name + SM). Calibration and export are one
  unit because the calibrated in-memory state can only be saved by ModelOpt as a pickle, which
  trtconv never writes or loads; export takes seconds next to calibration, so a run killed during
  export recalibrates (a run killed after export resumes from the export).
- **evaluate**: the per-document statistics (safetensors) and the weight errors; the gates are
  always recomputed from them, so changing only thresholds re-runs only the gate. Key: the export
  key, the evaluate section without gates, the evaluation data's sha256, versions and device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trtconv.cache.store import StageCache, stage_key, versions_for_key
from trtconv.data.packs import pack_sha256
from trtconv.core.environment import DeviceInfo
from trtconv.artifact.manifest import InputRecord
from trtconv.gate.stats import STAT_FIELDS
from trtconv.recipe.schema import Recipe

EXPORT_STAGE = "export"
EVALUATE_STAGE = "evaluate"
STATS_FILE = "document_stats.safetensors"
_STAT_FIELDS = STAT_FIELDS  # every DocumentStats array, so a new statistic is cached without a change here


def _device_part(device: DeviceInfo) -> dict:
    # Calibration numerics differ between CPU and GPU kernels, and between GPU generations.
    return {"kind": device.kind, "name": device.name if device.kind == "cuda" else None, "sm": device.sm}


def _files_part(inputs: list[InputRecord]) -> list:
    return sorted((rec.role, f.path, f.sha256) for rec in inputs for f in rec.files)


def export_key(recipe: Recipe, inputs: list[InputRecord], calib_sha256: str, device: DeviceInfo) -> str:
    calibration = recipe.calibration.model_dump(mode="json")
    calibration.pop("data")
    return stage_key(
        EXPORT_STAGE,
        {
            "model_files": _files_part(inputs),
            "model": {"dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code},
            "quantization": recipe.quantization.model_dump(mode="json"),
            "calibration": calibration,
            "calibration_data_sha256": calib_sha256,
            "export": recipe.export.model_dump(mode="json"),
            "versions": versions_for_key(),
            "device": _device_part(device),
        },
    )


def evaluate_key(recipe: Recipe, upstream: str, eval_sha256: str, device: DeviceInfo, engine_files: list | None = None) -> str:
    section = recipe.evaluate.model_dump(mode="json")
    for not_an_input in ("gates", "allow_inconclusive", "enabled", "data", "multiple_choice"):
        section.pop(not_an_input)
    task = recipe.evaluate.multiple_choice
    section["multiple_choice_sha256"] = pack_sha256(Path(task)) if task else None
    return stage_key(
        EVALUATE_STAGE,
        {"export_key": upstream, "evaluate": section, "evaluation_data_sha256": eval_sha256,
         "versions": versions_for_key(), "device": _device_part(device), "engine_files": sorted(engine_files or [])},
    )


# -- export unit --------------------------------------------------------------------------------


def store_export(cache: StageCache, key: str, artifact_tmp: Path, meta: dict[str, Any], reporter) -> None:
    from trtconv.cache.store import CacheError

    try:
        cache.put(EXPORT_STAGE, key, artifact_tmp, meta)
    except CacheError as exc:  # busy or disk full: the artifact is fine, it just isn't cached
        reporter.warn(f"not cached: {exc}")


def restore_export(cache: StageCache, key: str, artifact_tmp: Path, reporter) -> dict | None:
    """Copy a cached export into the artifact; its metadata, or None on a miss (reason reported)."""
    return _restore(cache, EXPORT_STAGE, key, artifact_tmp, reporter)


# -- evaluate unit ------------------------------------------------------------------------------


def store_evaluation(cache: StageCache, key: str, stats, weight_errors: list, meta: dict, scratch: Path, reporter) -> None:
    import torch
    from safetensors.torch import save_file

    from trtconv.cache.store import CacheError

    scratch.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.from_numpy(np.ascontiguousarray(getattr(stats, name))) for name in _STAT_FIELDS}, scratch / STATS_FILE)
    try:
        cache.put(EVALUATE_STAGE, key, scratch, {**meta, "weight_errors": weight_errors})
    except CacheError as exc:
        reporter.warn(f"not cached: {exc}")


def restore_evaluation(cache: StageCache, key: str, scratch: Path, reporter):
    """(DocumentStats, weight_errors, meta) from the cache, or None on a miss."""
    from safetensors.torch import load_file

    from trtconv.gate.stats import DocumentStats

    meta = _restore(cache, EVALUATE_STAGE, key, scratch, reporter)
    if meta is None:
        return None
    tensors = load_file(scratch / STATS_FILE)
    stats = DocumentStats(**{name: tensors[name].numpy() for name in _STAT_FIELDS})
    errors = [tuple(x) for x in meta.pop("weight_errors")]
    return stats, errors, meta


def _restore(cache: StageCache, stage: str, key: str, dest: Path, reporter) -> dict | None:
    """The entry's files copied into dest and its metadata, or None on a miss (reason reported).

    `restore` checks sizes, then hashes while copying: the data is read once, and a corrupted
    entry leaves nothing in dest.
    """
    if cache.restore(stage, key, dest) is None:
        miss = cache.last_miss
        if miss is not None and miss.kind != "absent":
            reporter.warn(f"{stage}: cache entry not used ({miss.kind}: {miss.detail}); rebuilding")
        return None
    return cache.read_record(cache.entry_dir(stage, key))["meta"]
