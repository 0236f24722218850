"""Stage 4, engine: turn the export into what a TensorRT-LLM runtime loads (or say why not here).

The target (`engine.target` in the recipe) decides: `tensorrt` builds engines with trtllm-build from
the TensorRT-LLM checkpoint, `pytorch` writes validated LLM-API options for the unified HF
checkpoint, `none` stops at the checkpoint. The work itself lives in trtconv.engine.
"""

from __future__ import annotations

from pathlib import Path

from trtconv.artifact.manifest import StageRecord
from trtconv.core.errors import EngineUnavailable, UserError
from trtconv.core.ui import Reporter
from trtconv.recipe.schema import Recipe
from trtconv.artifact.layout import ENGINE_DIR
from trtconv.stages.base import StageMeter

NAME = "engine"
# Not cached: a built engine is bound to the GPU and TensorRT it was built with; its files enter
# the evaluation key instead.
CACHE_KEY_COVERS: tuple[str, ...] = ()


def check_required(recipe: Recipe, require: bool) -> None:
    """--require-engine: refuse before any work (exit 3) when no engine can be built here, instead
    of after calibration, export and evaluation. The same reasons the build itself gives."""
    if not require:
        return
    if recipe.engine.target == "none":
        raise EngineUnavailable("--require-engine, but the recipe's engine.target is none, so no engine would be built: "
                                "set engine.target to tensorrt or pytorch (`--set engine.target=tensorrt`), or drop --require-engine")
    from trtconv.engine.record import probe_tensorrt_llm

    install = probe_tensorrt_llm()
    if recipe.engine.target == "tensorrt":
        from trtconv.engine.tensorrt import _why_not_buildable, detect_device

        reason = _why_not_buildable(install, detect_device())
    else:
        from trtconv.engine.pytorch import _why_no_smoke, detect_device

        reason = _why_no_smoke(install, detect_device(), recipe.export.tp_size * recipe.export.pp_size)
    if reason:
        raise EngineUnavailable(f"{reason} (engine.target {recipe.engine.target}, required by --require-engine); nothing was run")


def run(recipe: Recipe, root: Path, require: bool, reporter: Reporter) -> tuple[dict, StageRecord]:
    """Build (or prepare) the recipe's engine target into root/engine; returns the record and the stage's meter record."""
    if recipe.engine.target == "none":
        return {"target": "none", "status": "skipped"}, StageRecord(name="engine", status="skipped", wall_s=0.0, details={"target": "none"})
    from trtconv.engine.backends import BACKENDS
    from trtconv.engine.targets import ENGINE_TARGETS

    backend = BACKENDS[recipe.engine.target]
    source = root / ENGINE_TARGETS[recipe.engine.target].source_dir
    with StageMeter("engine") as m:
        reporter.stage("engine", f"{backend.name}: {backend.working}")
        record = backend.build(source, root / ENGINE_DIR, recipe.engine, tp_size=recipe.export.tp_size, pp_size=recipe.export.pp_size,
                               require=require)
    status = {"built": "ok", "not_built": "not_built", "failed": "failed"}[record.status]
    reporter.stage("engine", f"{record.target}: {record.status}" + (f" ({record.reason})" if record.reason else ""))
    if record.status == "failed":
        raise UserError(f"engine build failed: {record.reason}")
    return record.model_dump(mode="json"), m.record(status=status, target=record.target)


