"""TEST DOUBLE of `tensorrt_llm.LLM` (PyTorch backend, 1.0+) and `SamplingParams`. Runs no model.

Enforces what trtconv relies on: the LLM-API keyword arguments it writes (unknown ones raise, as
the real pydantic TorchLlmArgs forbids extras), config objects of the right types, and a model
folder that is a unified HF checkpoint (config.json, *.safetensors, tokenizer). generate() returns
deterministic fake token ids. Hook: TRTCONV_DOUBLE_LLM_FAIL=1 makes construction fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

ACCEPTED_KWARGS = {
    "max_batch_size": int, "max_num_tokens": int, "max_seq_len": int, "tensor_parallel_size": int,
    "pipeline_parallel_size": int, "attn_backend": str, "kv_cache_config": KvCacheConfig, "cuda_graph_config": CudaGraphConfig,
}
ATTN_BACKENDS = {"TRTLLM", "FLASHINFER", "VANILLA", "FLASHINFER_STAR_ATTENTION"}


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    prompt: str
    outputs: list[CompletionOutput]


class LLM:
    """TEST DOUBLE: checks arguments and the model folder; generate() invents tokens."""

    def __init__(self, model: str, **kwargs: Any):
        if os.environ.get("TRTCONV_DOUBLE_LLM_FAIL"):
            raise RuntimeError("TEST DOUBLE: simulated failure while loading the model")
        for key, value in kwargs.items():
            if key not in ACCEPTED_KWARGS:
                raise ValueError(f"Unknown LLM argument {key!r} (TEST DOUBLE knows {sorted(ACCEPTED_KWARGS)})")
            if value is not None and not isinstance(value, ACCEPTED_KWARGS[key]):
                raise TypeError(f"{key} must be {ACCEPTED_KWARGS[key].__name__}, got {type(value).__name__}")
        if kwargs.get("attn_backend", "TRTLLM") not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend {kwargs['attn_backend']!r} not in {sorted(ATTN_BACKENDS)}")
        self.model_dir = Path(model)
        self._check_model_dir()
        self.kwargs = kwargs
        self._vocab = int(json.loads((self.model_dir / "config.json").read_text()).get("vocab_size", 32000))

    def _check_model_dir(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}/config.json")
        if not list(self.model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors in {self.model_dir}")
        if not any((self.model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"no tokenizer in {self.model_dir}")

    def generate(self, prompts: list[str] | str, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        results = []
        for prompt in [prompts] if isinstance(prompts, str) else prompts:
            seed = hashlib.sha256(prompt.encode()).digest()
            ids = [seed[i % len(seed)] % self._vocab for i in range(params.max_tokens)]
            results.append(RequestOutput(prompt, [CompletionOutput(0, "<test double text>", ids)]))
        return results

    def shutdown(self) -> None:
        pass
