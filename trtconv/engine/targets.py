"""The engine targets trtconv offers: one explicit table, read by everything that names a target.

A target turns the export into what a TensorRT-LLM runtime loads. Its row says which export it
starts from (the recipe flag that must be on, and the artifact folder it reads), its options model
(the recipe's `engine.<name>` section), and the TensorRT-LLM releases it supports. The recipe's
`engine.target` choices and options fields, the recipe's export check, the engine record, the plan
checks and the CLI's `--target` read this table; what each target does (option and version rules,
build, the gate's engine candidate) is its row in trtconv.engine.backends.

This module is plain data on purpose: the recipe schema imports it, so it imports only the
options models and the artifact layout, never the engine code.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from trtconv.artifact.layout import CHECKPOINT_DIR, HF_CHECKPOINT_DIR
from trtconv.recipe.engine_options import PyTorchBackendOptions, TensorRTEngineOptions

NO_ENGINE = "none"  # engine.target value that stops at the checkpoint


@dataclass(frozen=True)
class EngineTarget:
    name: str  # engine.target value, and the name of its options section (engine.<name>)
    description: str  # what it makes (the recipe's help for engine.target)
    source_export: str  # the ExportSection flag that must be true: the export it starts from
    source_dir: str  # the artifact folder that export is written to
    source_why: str  # how it uses that export, for the error when the flag is off
    options_model: type[BaseModel]
    min_trtllm: tuple[int, int]  # oldest TensorRT-LLM (major, minor) it supports
    max_trtllm: tuple[int, int] | None = None  # newest (major, minor) it supports; None = no upper bound


ENGINE_TARGETS: dict[str, EngineTarget] = {
    t.name: t
    for t in (
        # The TensorRT engine backend ships in 1.0, 1.1 and 1.2. 1.3.0rc deprecated it and TensorRT-LLM
        # main removed trtllm-build in July 2026, so 1.3 is refused rather than half supported.
        EngineTarget(
            "tensorrt",
            "TensorRT engines through trtllm-build (TensorRT-LLM 1.0-1.2 only)",
            source_export="tensorrt_llm_checkpoint",
            source_dir=CHECKPOINT_DIR,
            source_why="builds from the TensorRT-LLM checkpoint",
            options_model=TensorRTEngineOptions,
            min_trtllm=(1, 0),
            max_trtllm=(1, 2),
        ),
        # 1.0 made the PyTorch backend the default `tensorrt_llm.LLM` and introduced the config objects
        # the options YAML uses (kv_cache_config, cuda_graph_config).
        EngineTarget(
            "pytorch",
            "the unified HF checkpoint + a validated LLM-API options YAML for TensorRT-LLM's PyTorch backend (1.0 and later)",
            source_export="hf_checkpoint",
            source_dir=HF_CHECKPOINT_DIR,
            source_why="serves the unified HF checkpoint",
            options_model=PyTorchBackendOptions,
            min_trtllm=(1, 0),
        ),
    )
}


def target_names(joiner: str = " or ") -> str:
    """The target names for help texts and errors ("tensorrt or pytorch")."""
    return joiner.join(ENGINE_TARGETS)
