"""The engine stage's public surface: turn an export into what a TensorRT-LLM runtime loads.

Targets (recipe `engine.target`; the table is trtconv.engine.targets.ENGINE_TARGETS):
- `tensorrt`: TensorRT engines from the TensorRT-LLM checkpoint, by `trtllm-build` (1.0-1.2 only),
  see trtconv.engine.tensorrt;
- `pytorch`: the unified HF checkpoint + a validated LLM-API options YAML for TensorRT-LLM's
  PyTorch backend (1.0 and later), see trtconv.engine.pytorch;
- `none`: stop at the checkpoint.

This module is the public surface (and `trtconv engine OUT`); the pieces live in the other
trtconv.engine modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trtconv.engine.plan import check_engine_plan, check_precision_on_device, min_sm_for_precision
from trtconv.recipe.engine import EngineSection, PyTorchBackendOptions, TensorRTEngineOptions
from trtconv.engine.stamp import STAMP_NAME, check_engine_compatible, read_engine_stamp
from trtconv.engine.pytorch import OPTIONS_FILE, llm_api_options, prepare_pytorch_target
from trtconv.engine.targets import ENGINE_TARGETS, NO_ENGINE, target_names
from trtconv.engine.record import NOT_INSTALLED_REASON, EngineRecord, TrtllmInstall, probe_tensorrt_llm
from trtconv.engine.tensorrt import (
    build_tensorrt_engine,
    checkpoint_world_size,
    read_checkpoint_config,
    trtllm_build_command,
    validate_engine_dir,
)
from trtconv.artifact.layout import ENGINE_DIR, MANIFEST_NAME
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import ArtifactError, CheckpointError, RecipeError, UserError
from trtconv.core.jsonio import read_json_object

__all__ = [
    "EngineRecord",
    "EngineSection",
    "NOT_INSTALLED_REASON",
    "OPTIONS_FILE",
    "PyTorchBackendOptions",
    "STAMP_NAME",
    "TensorRTEngineOptions",
    "TrtllmInstall",
    "build_tensorrt_engine",
    "check_engine_compatible",
    "check_engine_plan",
    "check_precision_on_device",
    "llm_api_options",
    "min_sm_for_precision",
    "prepare_pytorch_target",
    "probe_tensorrt_llm",
    "read_engine_stamp",
    "rebuild_engine_for_artifact",
    "trtllm_build_command",
    "validate_engine_dir",
]


def rebuild_engine_for_artifact(
    out_dir: Path,
    *,
    force: bool,
    require: bool,
    target: str | None = None,
    device: DeviceInfo | None = None,
    install: TrtllmInstall | None = None,
) -> EngineRecord:
    """`trtconv engine OUT`: (re)build OUT/engine/ from an existing artifact, atomically.

    Reads OUT/manifest.json; refuses an artifact whose accuracy gate failed unless `force`. The
    target and its options come from the recipe recorded in the manifest (`target` overrides the
    target only). Returns the record; updating the manifest is the caller's job.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest.get("status") != "passed" and not force:
        raise UserError(
            f"{out_dir / MANIFEST_NAME}: status is {manifest.get('status')!r}, not 'passed': the accuracy gate of this artifact "
            "failed, so no engine is built from it. Pass --force to build one anyway"
        )
    recipe = manifest.get("recipe") or {}
    section = _engine_section(out_dir, recipe)
    chosen = target or section.target
    if chosen == NO_ENGINE:
        raise UserError(
            f"{out_dir / MANIFEST_NAME}: the recipe's engine.target is '{NO_ENGINE}', so there is nothing to build. "
            f"Pass a target ({target_names()})"
        )
    tp_size, pp_size = _export_parallelism(recipe)
    engine_dir = out_dir / ENGINE_DIR
    source_dir = out_dir / ENGINE_TARGETS[chosen].source_dir
    from trtconv.engine.backends import BACKENDS

    return BACKENDS[chosen].build(source_dir, engine_dir, section, tp_size=tp_size, pp_size=pp_size, require=require,
                                  device=device, install=install)


def require_checkpoint_files(checkpoint_dir: Path, *, tp_size: int, pp_size: int) -> None:
    """A clear error, before any GPU work, when the TensorRT-LLM checkpoint is incomplete."""
    config = read_checkpoint_config(checkpoint_dir)
    world_size = checkpoint_world_size(config)
    if world_size != tp_size * pp_size:
        raise CheckpointError(
            f"{checkpoint_dir / 'config.json'}: mapping.world_size is {world_size}, but the recipe's export has "
            f"tp_size={tp_size} x pp_size={pp_size} = {tp_size * pp_size}"
        )
    for rank in range(world_size):
        path = checkpoint_dir / f"rank{rank}.safetensors"
        if not path.is_file() or path.stat().st_size == 0:
            state = "is missing" if not path.is_file() else "is empty"
            raise CheckpointError(f"{path} {state}: a world_size {world_size} checkpoint needs rank0..rank{world_size - 1}.safetensors")


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {out_dir} is not a trtconv artifact (run `trtconv build RECIPE -o {out_dir}` first)")
    return read_json_object(path, "the artifact manifest", ArtifactError)


def _engine_section(out_dir: Path, recipe: dict[str, Any]) -> EngineSection:
    try:
        return EngineSection.model_validate(recipe.get("engine") or {})
    except ValidationError as exc:
        problems = "; ".join(f"engine.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise RecipeError(f"{out_dir / MANIFEST_NAME}: the recorded recipe's engine section is not valid: {problems}") from exc


def _export_parallelism(recipe: dict[str, Any]) -> tuple[int, int]:
    export = recipe.get("export") or {}
    return int(export.get("tp_size") or 1), int(export.get("pp_size") or 1)
