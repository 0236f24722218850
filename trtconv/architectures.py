"""The model architectures trtconv converts: one explicit table, nothing discovered by magic.

A row is everything the pipeline needs to know about a Hugging Face decoder class: the name the
TensorRT-LLM checkpoint carries, whether its attention always has q/k/v biases (the exporter's
config cannot be trusted on that), which rope scaling kinds the reference forward computes for
it, and the keys the export stage must write into TensorRT-LLM's config.json because ModelOpt's
exporter leaves them out. The load stage, the checkpoint validator, both checkpoint readers and
the export repair read this table, so a new architecture is one row here (plus, where its
forward differs, the forward itself) and a tiny factory in tests/factories.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Rope scaling kinds the reference forward computes (trtconv.checkpoints.trtllm_reader).
ROPE_KINDS: tuple[str, ...] = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ConfigKey:
    """A key the export stage writes into TensorRT-LLM's config.json, and why."""

    key: str
    value: Any
    why: str


@dataclass(frozen=True)
class Architecture:
    hf_name: str  # config.json "architectures"[0] of the Hugging Face checkpoint
    trtllm_name: str  # "architecture" of the TensorRT-LLM checkpoint ModelOpt exports
    family: str  # short name (tests/factories.py `make_tiny_model(arch=...)`, docs)
    qkv_bias: bool  # q/k/v always carry a bias, whatever the config's bias keys say
    # Keys export writes into the TensorRT-LLM config, in this order. attn_bias / mlp_bias not
    # named here are stated from the HF config (attention_bias, mlp_bias).
    trtllm_config_keys: tuple[ConfigKey, ...] = ()
    rope_kinds: tuple[str, ...] = ROPE_KINDS  # rope scaling kinds of this family the forward runs
    sliding_window: bool = False  # does the reference forward emulate sliding-window attention


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", "LlamaForCausalLM", "llama", qkv_bias=False),
        # ModelOpt exports Mistral under the llama decoder: the same tensor layout.
        Architecture("MistralForCausalLM", "MistralForCausalLM", "mistral", qkv_bias=False),
        # Qwen2 always has a q/k/v bias; ModelOpt writes it as attention.qkv.bias although its config
        # says "bias": false (measured), so the architecture decides, not that key.
        Architecture(
            "Qwen2ForCausalLM",
            "Qwen2ForCausalLM",
            "qwen2",
            qkv_bias=True,
            trtllm_config_keys=(
                ConfigKey("qwen_type", "qwen2", "TensorRT-LLM's QWen model needs qwen_type to pick the Qwen2 layout"),
                ConfigKey("attn_bias", True, "Qwen2 has q/k/v biases; TensorRT-LLM reads attn_bias"),
                ConfigKey("mlp_bias", False, "Qwen2's MLP has no biases"),
            ),
        ),
    )
}

# The names each checkpoint kind carries, in table order (error messages list them).
HF_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
TRTLLM_NAMES: tuple[str, ...] = tuple(a.trtllm_name for a in ARCHITECTURES.values())
_BY_TRTLLM_NAME: dict[str, Architecture] = {a.trtllm_name: a for a in ARCHITECTURES.values()}


def by_hf_name(name: str | None) -> Architecture | None:
    return ARCHITECTURES.get(name) if name else None


def by_trtllm_name(name: str | None) -> Architecture | None:
    return _BY_TRTLLM_NAME.get(name) if name else None
