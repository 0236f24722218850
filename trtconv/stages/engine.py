"""Stage 4, engine: turn the export into what a TensorRT-LLM runtime loads (or say why not here).

The target (`engine.target` in the recipe) decides: `tensorrt` builds engines with trtllm-build from
the TensorRT-LLM checkpoint, `pytorch` writes validated LLM-API options for the unified HF
checkpoint, `none` stops at the checkpoint. The work itself lives in trtconv.engine.
"""

from __future__ import annotations

from pathlib import Path

from trtconv.artifact.manifest import StageRecord
from trtconv.core.errors import UserError
from trtconv.core.ui import Reporter
from trtconv.recipe.schema import Recipe
from trtconv.artifact.layout import ENGINE_DIR
from trtconv.stages.base import StageMeter

NAME = "engine"
# Not cached: a built engine is bound to the GPU and TensorRT it was built with; its files enter
# the evaluation key instead.
CACHE_KEY_COVERS: tuple[str, ...] = ()


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


