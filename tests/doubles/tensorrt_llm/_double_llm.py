"""TEST DOUBLE of `tensorrt_llm.LLM` (PyTorch backend, 1.0+), `SamplingParams` and `RequestOutput`.

!!! NOT TensorRT-LLM. Context logits come from TRTCONV'S OWN REFERENCE EXECUTOR !!!
`generate(prompt_token_ids, SamplingParams(return_context_logits=True))` computes `.context_logits`
by running trtconv's checkpoint executor (trtconv.checkpoints.hf_reader here; the TensorRT
double in tensorrt_llm/_tensorrt_engine runs trtconv.checkpoints.trtllm_reader on the TensorRT-LLM
checkpoint the engine was built from). So tests that go through this path check ORCHESTRATION —
which calls are made, shapes, padding, vocabulary slicing, refusals — and never TensorRT-LLM's
numerics: "engine logits == checkpoint-executor logits" holds here by construction.

Enforces what trtconv relies on:
- the LLM-API keyword arguments it writes (unknown ones raise, as the real pydantic TorchLlmArgs
  forbids extras), config objects of the right types, and a model folder that is a unified HF
  checkpoint (config.json, *.safetensors, tokenizer);
- `SamplingParams` is a keyword-only dataclass like the real one (tensorrt_llm/sampling_params.py),
  so an unknown keyword raises TypeError;
- `generate(inputs, sampling_params=None, use_tqdm=True)` with the real batching rule
  (tensorrt_llm/llmapi/llm.py: a list whose first item is an int is ONE prompt), and an empty
  prompt is refused.
Hook: TRTCONV_DOUBLE_LLM_FAIL=1 makes construction fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

ACCEPTED_KWARGS = {
    "max_batch_size": int, "max_num_tokens": int, "max_seq_len": int, "tensor_parallel_size": int,
    "pipeline_parallel_size": int, "attn_backend": str, "kv_cache_config": KvCacheConfig, "cuda_graph_config": CudaGraphConfig,
}
ATTN_BACKENDS = {"TRTLLM", "FLASHINFER", "VANILLA", "FLASHINFER_STAR_ATTENTION"}


@dataclass(kw_only=True)
class SamplingParams:
    """The fields of the real SamplingParams that trtconv may pass (keyword-only: unknown ones -> TypeError)."""

    max_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    end_id: int | None = None
    pad_id: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    prompt: str | None
    outputs: list[CompletionOutput]
    prompt_token_ids: list[int] = field(default_factory=list)
    context_logits: Any = None  # torch.Tensor [prompt_len, vocab] when return_context_logits


def simulated_failure() -> None:
    if os.environ.get("TRTCONV_DOUBLE_LLM_FAIL"):
        raise RuntimeError("TEST DOUBLE: simulated failure while loading the model")


def split_batch(inputs: Any) -> list[Any]:
    """The real generate()'s rule: a non-list is one prompt; a list of ints is one token-id prompt."""
    if not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int)):
        return [inputs]
    return list(inputs)


def run_generate(
    inputs: Any, params: SamplingParams | None, vocab: int, context_logits: Callable[[list[int]], Any], max_input_len: int | None = None
) -> list[RequestOutput]:
    """Shared by both double LLMs: fake tokens, and context logits from trtconv's executor when asked."""
    params = params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    results = []
    for prompt in split_batch(inputs):
        ids = list(prompt) if isinstance(prompt, list) else None
        if ids is not None and not ids:
            raise ValueError("TEST DOUBLE: the prompt is empty (the LLM API refuses empty token lists)")
        if ids is not None and max_input_len is not None and len(ids) > max_input_len:
            raise ValueError(f"TEST DOUBLE: prompt length {len(ids)} exceeds max_input_len {max_input_len}")
        seed = hashlib.sha256(json.dumps(prompt).encode()).digest()
        generated = [seed[i % len(seed)] % vocab for i in range(params.max_tokens)]
        logits = context_logits(ids) if params.return_context_logits and ids is not None else None
        text = prompt if isinstance(prompt, str) else None
        results.append(RequestOutput(text, [CompletionOutput(0, "<test double text>", generated)], ids or [], logits))
    return results


class LLM:
    """TEST DOUBLE of the PyTorch-backend LLM: checks arguments and the model folder; see the module docstring."""

    def __init__(self, model: str, **kwargs: Any):
        simulated_failure()
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
        self._executor = None
        self.shut_down = False

    def _check_model_dir(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}/config.json")
        if not list(self.model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors in {self.model_dir}")
        if not any((self.model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"no tokenizer in {self.model_dir}")

    def _context_logits(self, ids: list[int]):
        # BORROWED: trtconv's own unified-HF-checkpoint executor, not a TensorRT-LLM runtime.
        import torch

        from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

        if self._executor is None:
            self._executor = load_hf_checkpoint_model(self.model_dir)
            kv_cache = self.kwargs.get("kv_cache_config")
            windows = kv_cache.max_attention_window if kv_cache is not None else None
            if windows:  # KvCacheConfig's window wins over the one in config.json
                self._executor.attention_window = windows[0]
        return self._executor.logits(torch.tensor([ids], dtype=torch.long))[0]

    def generate(self, inputs: Any, sampling_params: SamplingParams | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        if self.shut_down:
            raise RuntimeError("TEST DOUBLE: generate() after shutdown()")
        max_seq_len = self.kwargs.get("max_seq_len")
        return run_generate(inputs, sampling_params, self._vocab, self._context_logits, max_input_len=max_seq_len)

    def shutdown(self) -> None:
        self.shut_down = True

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
