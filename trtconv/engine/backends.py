"""What each engine target does, one row per target: the code side of trtconv.engine.targets.

`targets.ENGINE_TARGETS` is plain data (the recipe schema imports it); this table holds the
behaviour that differs per target, so the plan, the engine stage, `trtconv engine` and the gate's
engine candidate read one row instead of branching on the target's name. A new target is a row
here and a row there. The work itself stays in trtconv.engine.tensorrt / .pytorch / .logits,
imported when a row's function runs (TensorRT-LLM and trtllm-build are optional).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trtconv.recipe.engine import EngineSection


@dataclass(frozen=True)
class Backend:
    name: str  # the engine.target value (a key of ENGINE_TARGETS)
    working: str  # what the engine stage says it is doing
    # (engine section, quant_algo=, kv_cache_quant_algo=, device=) -> warnings; raises UserError on an impossible plan
    check_options: Callable[..., list[str]]
    # (major, minor, is_pre, installed version string) -> warnings; raises UserError on an unsupported release
    check_version: Callable[..., list[str]]
    # (source dir, engine dir, engine section, tp_size=, pp_size=, require=, device=, install=) -> EngineRecord
    build: Callable[..., object]
    # (engine dir, artifact root, tokenizer dir, vocab, seq_len, install) -> EngineLogits
    candidate: Callable[..., object]


# -- tensorrt: trtllm-build from the TensorRT-LLM checkpoint ------------------------------------------

def _tensorrt_options(section: EngineSection, **algos) -> list[str]:
    from trtconv.engine.plan import check_tensorrt_options

    return check_tensorrt_options(section.tensorrt, **algos)


def _tensorrt_version(major: int, minor: int, is_pre: bool, version: str) -> list[str]:
    from trtconv.engine.plan import tensorrt_version_rule

    return tensorrt_version_rule(major, minor, is_pre, version)


def _tensorrt_build(source: Path, engine_dir: Path, section: EngineSection, *, tp_size: int, pp_size: int, require: bool,
                    device=None, install=None):
    from trtconv.engine.rebuild import require_checkpoint_files
    from trtconv.engine.tensorrt import build_tensorrt_engine

    require_checkpoint_files(source, tp_size=tp_size, pp_size=pp_size)  # a clear error before any GPU work
    return build_tensorrt_engine(source, engine_dir, section.tensorrt, require=require, device=device, install=install)


def _tensorrt_candidate(engine_dir: Path, artifact_root: Path, tokenizer_dir: Path, vocab: int, seq_len, install):
    from trtconv.engine.logits import tensorrt_candidate

    return tensorrt_candidate(engine_dir, tokenizer_dir, vocab, seq_len)


# -- pytorch: the unified HF checkpoint + LLM-API options for TensorRT-LLM's PyTorch backend ----------

def _pytorch_options(section: EngineSection, **algos) -> list[str]:
    from trtconv.engine.plan import check_pytorch_options

    return check_pytorch_options(section.pytorch, **algos)


def _pytorch_version(major: int, minor: int, is_pre: bool, version: str) -> list[str]:
    from trtconv.engine.plan import pytorch_version_rule

    return pytorch_version_rule(major, minor, is_pre, version)


def _pytorch_build(source: Path, engine_dir: Path, section: EngineSection, *, tp_size: int, pp_size: int, require: bool,
                   device=None, install=None):
    from trtconv.engine.pytorch import prepare_pytorch_target

    return prepare_pytorch_target(source, engine_dir, section.pytorch, tp_size=tp_size, pp_size=pp_size, require=require,
                                  device=device, install=install)


def _pytorch_candidate(engine_dir: Path, artifact_root: Path, tokenizer_dir: Path, vocab: int, seq_len, install):
    from trtconv.artifact.layout import HF_CHECKPOINT_DIR
    from trtconv.engine.logits import pytorch_candidate

    return pytorch_candidate(engine_dir, artifact_root / HF_CHECKPOINT_DIR, vocab, seq_len, install)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("tensorrt", "trtllm-build from the TensorRT-LLM checkpoint", _tensorrt_options, _tensorrt_version,
                _tensorrt_build, _tensorrt_candidate),
        Backend("pytorch", "LLM-API options for the unified HF checkpoint", _pytorch_options, _pytorch_version,
                _pytorch_build, _pytorch_candidate),
    )
}
