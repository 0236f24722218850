"""TEST DOUBLE of `tensorrt_llm._tensorrt_engine.LLM` (the TensorRT engine backend, 1.0-1.2).

!!! NOT TensorRT-LLM, runs no TensorRT plan. Context logits come from TRTCONV'S OWN REFERENCE
EXECUTOR (trtconv.checkpoints.trtllm_reader) run on the TensorRT-LLM checkpoint the fake engine was built
from, so tests of this path check ORCHESTRATION (calls, shapes, padding, vocab slicing, refusals),
never TensorRT numerics. !!!

Enforces the documented contract trtconv relies on:
- `LLM(model=<engine dir>, tokenizer=<tokenizer dir>, kv_cache_config=KvCacheConfig(...))`; any
  other keyword raises (TrtLlmArgs forbids extras); KvCacheConfig.dtype must stay "auto" on this
  backend (trtllm-reference.md §1.2);
- the engine folder is one the double's trtllm-build wrote: config.json with exactly version /
  pretrained_config / build_config, one fake rank{N}.engine per rank;
- the attention window is KvCacheConfig.max_attention_window, else the engine's
  pretrained_config.runtime_defaults.max_attention_window (as the LLM API fills it), else none;
- `return_context_logits` on an engine whose build_config.gather_context_logits is false fails, as
  the real runtime does ("the engine must be built with gather_context_logits", run.py help);
  so does a prompt longer than build_config.max_input_len.
The checkpoint is found at <engine dir>/../checkpoint (trtconv's artifact layout) and must be the
one the engine was built from: every rank file's sha256 must match the one in its fake engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tensorrt_llm._double_llm import RequestOutput, SamplingParams, run_generate, simulated_failure
from tensorrt_llm.llmapi import KvCacheConfig

FAKE_ENGINE_HEADER = b"TRTCONV TEST DOUBLE ENGINE -- NOT A TENSORRT PLAN\n"
ENGINE_CONFIG_KEYS = {"version", "pretrained_config", "build_config"}


class LLM:
    """TEST DOUBLE of the TensorRT-backend LLM; see the module docstring."""

    def __init__(self, model: str, tokenizer: str | None = None, kv_cache_config: KvCacheConfig | None = None, **kwargs: Any):
        simulated_failure()
        if kwargs:
            raise ValueError(f"TEST DOUBLE: unknown LLM arguments {sorted(kwargs)} (knows model, tokenizer, kv_cache_config)")
        if kv_cache_config is not None:
            if not isinstance(kv_cache_config, KvCacheConfig):
                raise TypeError(f"kv_cache_config must be KvCacheConfig, got {type(kv_cache_config).__name__}")
            if kv_cache_config.dtype != "auto":
                raise ValueError("KvCacheConfig.dtype must be 'auto' on the TensorRT backend (the engine fixes the KV dtype)")
        self.engine_dir = Path(model)
        self.config = self._read_engine_config()
        self.tokenizer_dir = self._check_tokenizer(tokenizer)
        self.kv_cache_config = kv_cache_config
        self.checkpoint_dir = self._checkpoint_built_from()
        self._executor = None
        self.shut_down = False

    def _read_engine_config(self) -> dict:
        path = self.engine_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} (not an engine folder)")
        config = json.loads(path.read_text())
        if set(config) != ENGINE_CONFIG_KEYS:
            raise ValueError(f"TEST DOUBLE: {path} has keys {sorted(config)}, not an engine config")
        return config

    @staticmethod
    def _check_tokenizer(tokenizer: str | None) -> Path:
        # The engine folder holds no tokenizer (reference §4.1): the runtime needs it separately.
        if tokenizer is None:
            raise ValueError("TEST DOUBLE: an engine folder has no tokenizer; pass tokenizer=")
        folder = Path(tokenizer)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"no tokenizer in {folder}")
        return folder

    def _checkpoint_built_from(self) -> Path:
        checkpoint = self.engine_dir.parent / "checkpoint"
        world_size = self.config["pretrained_config"]["mapping"]["world_size"]
        for rank in range(world_size):
            plan = (self.engine_dir / f"rank{rank}.engine").read_bytes()
            if not plan.startswith(FAKE_ENGINE_HEADER):
                raise RuntimeError(f"TEST DOUBLE: rank{rank}.engine was not written by the double's trtllm-build")
            built_from = json.loads(plan[len(FAKE_ENGINE_HEADER):])["checkpoint_sha256"]
            actual = hashlib.sha256((checkpoint / f"rank{rank}.safetensors").read_bytes()).hexdigest()
            if built_from != actual:
                raise RuntimeError(f"TEST DOUBLE: {checkpoint}/rank{rank}.safetensors is not the checkpoint rank{rank}.engine was built from")
        return checkpoint

    def _context_logits(self, ids: list[int]):
        # BORROWED: trtconv's own TensorRT-LLM-checkpoint executor, not TensorRT.
        import torch

        from trtconv.checkpoints.trtllm_reader import load_checkpoint_model

        if self._executor is None:
            self._executor = load_checkpoint_model(self.checkpoint_dir)
            self._executor.attention_window = self._attention_window()
        return self._executor.logits(torch.tensor([ids], dtype=torch.long))[0]

    def _attention_window(self) -> int | None:
        """As the runtime resolves it: KvCacheConfig.max_attention_window, else the engine's
        pretrained_config.runtime_defaults (fill_empty_fields_from_runtime_defaults), else none."""
        windows = self.kv_cache_config.max_attention_window if self.kv_cache_config is not None else None
        if windows is None:
            windows = (self.config["pretrained_config"].get("runtime_defaults") or {}).get("max_attention_window")
        if windows and len(set(windows)) > 1:
            raise ValueError(f"TEST DOUBLE: per-layer windows {windows} are not emulated")
        return windows[0] if windows else None

    def generate(self, inputs: Any, sampling_params: SamplingParams | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        if self.shut_down:
            raise RuntimeError("TEST DOUBLE: generate() after shutdown()")
        build = self.config["build_config"]
        if sampling_params is not None and sampling_params.return_context_logits and not build.get("gather_context_logits"):
            raise ValueError(
                "TEST DOUBLE: return_context_logits=True but the engine was built without gather_context_logits "
                "(the engine must be built with gather_context_logits or gather_all_token_logits)"
            )
        vocab = int(self.config["pretrained_config"].get("vocab_size", 32000))
        return run_generate(inputs, sampling_params, vocab, self._context_logits, max_input_len=build.get("max_input_len"))

    def shutdown(self) -> None:
        self.shut_down = True

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = ["LLM"]
