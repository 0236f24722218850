"""The recipe's `engine:` section: which target turns the export into what a runtime loads, and how.

The targets and their options models are rows of trtconv.engine.targets.ENGINE_TARGETS; this
section is derived from that table (the `target` choices, one options field per target), so a new
target is a row there, not an edit here. The options models themselves live in
trtconv.recipe.engine_options (re-exported here).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model

from trtconv.recipe.base import Section

from trtconv.engine.targets import ENGINE_TARGETS, NO_ENGINE
from trtconv.recipe.engine_options import (  # noqa: F401  (re-exported: the options are part of this section)
    GemmPluginDtype,
    LogLevel,
    PluginDtype,
    PyTorchBackendOptions,
    TensorRTEngineOptions,
)

TargetName = Literal[(NO_ENGINE, *ENGINE_TARGETS)]


class _EngineSectionBase(Section):
    model_config = ConfigDict(extra="forbid")


def _engine_section() -> type[Section]:
    """`target` plus one options field per row of ENGINE_TARGETS, in table order."""
    described = "; ".join(f"{t.name} = {t.description}" for t in ENGINE_TARGETS.values())
    fields: dict[str, Any] = {
        "target": (TargetName, Field(NO_ENGINE, description=f"{NO_ENGINE} = stop at the checkpoint; {described}.")),
    }
    for t in ENGINE_TARGETS.values():
        fields[t.name] = (t.options_model, Field(default_factory=t.options_model, description=f"Options of the {t.name} target."))
    return create_model(
        "EngineSection",
        __base__=_EngineSectionBase,
        __doc__="Which runtime format the export is turned into.",
        __module__=__name__,
        **fields,
    )


EngineSection = _engine_section()
