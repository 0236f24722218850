"""The options models of the engine targets (the recipe's `engine.tensorrt` and `engine.pytorch`).

They live apart from `EngineSection` (trtconv.recipe.engine) because the engine-target table
(trtconv.engine.targets) names each target's options model, and EngineSection is derived from that
table: options <- table <- section, with no import cycle.

Defaults of `TensorRTEngineOptions` are TensorRT-LLM 1.0-1.2's own `trtllm-build` defaults
(BuildConfig / PluginConfig; see docs/engine.md for the table and sources). trtconv still passes
every one of them explicitly on the command line, so the recorded command builds the same engine
even under a TensorRT-LLM whose defaults differ.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from trtconv.recipe.base import Section

# Dtype-valued plugin flags of trtllm-build ("auto" = the checkpoint's dtype). trtllm-build also
# accepts "int32" there; it is meaningless for attention/GEMM of an LLM, so trtconv rejects it.
PluginDtype = Literal["auto", "float16", "bfloat16", "float32", "disable"]
GemmPluginDtype = Literal["auto", "float16", "bfloat16", "float32", "fp8", "nvfp4", "disable"]
LogLevel = Literal["internal_error", "error", "warning", "info", "verbose", "debug", "trace"]


class TensorRTEngineOptions(Section):
    """`trtllm-build` settings for the `tensorrt` target (TensorRT-LLM 1.0-1.2)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(2048, ge=1, description="Largest batch the engine accepts (--max_batch_size). Baked into the engine.")
    max_input_len: int = Field(1024, ge=1, description="Longest prompt in tokens (--max_input_len). Baked into the engine.")
    max_seq_len: int | None = Field(
        None, ge=1, description="Longest prompt + output in tokens (--max_seq_len). null = from the model (max_position_embeddings)."
    )
    max_num_tokens: int = Field(
        8192, ge=1, description="Token budget of one engine step after padding removal (--max_num_tokens)."
    )
    opt_num_tokens: int | None = Field(
        None,
        ge=1,
        description="Token count TensorRT tunes kernels for (--opt_num_tokens). null = max_batch_size x max_beam_width. "
        "Cannot be combined with multiple_profiles.",
    )
    max_beam_width: int = Field(1, ge=1, description="Largest beam-search width (--max_beam_width). Baked into the engine.")
    kv_cache_type: Literal["paged", "continuous", "disabled"] = Field(
        "paged", description="KV-cache layout (--kv_cache_type). In-flight batching needs paged."
    )
    tokens_per_block: int = Field(32, ge=1, description="Tokens per paged KV-cache block (--tokens_per_block); a power of two.")
    gpt_attention_plugin: PluginDtype = Field(
        "auto", description="GPT attention plugin dtype (--gpt_attention_plugin); paged KV, packed input and FMHA need it."
    )
    context_fmha: bool = Field(True, description="Fused multi-head attention in the context phase (--context_fmha enable|disable).")
    use_paged_context_fmha: bool = Field(
        True, description="Paged context FMHA (--use_paged_context_fmha); needed for KV-cache block reuse and chunked context."
    )
    use_fp8_context_fmha: bool | None = Field(
        None,
        description="FP8 context FMHA (--use_fp8_context_fmha). null = auto: enable for FP8/NVFP4 checkpoints on SM 89/90 "
        "(TensorRT-LLM's own default is enable, which it ignores on other checkpoints), disable otherwise; the resolved value "
        "is always passed explicitly. true on a non-FP8 checkpoint or another SM is rejected.",
    )
    remove_input_padding: bool = Field(True, description="Packed (padding-free) input (--remove_input_padding); needed for in-flight batching.")
    use_fused_mlp: bool = Field(
        True, description="Fuse the gated MLP's two GEMMs (--use_fused_mlp). TensorRT-LLM forces it off unless the checkpoint is FP8."
    )
    gemm_plugin: GemmPluginDtype | None = Field(
        None, description="GEMM plugin (--gemm_plugin). null = flag not passed (TensorRT-LLM default: off, except NVFP4 GEMMs)."
    )
    multiple_profiles: bool = Field(
        False, description="Several TensorRT optimization profiles (--multiple_profiles): faster runtime, longer build."
    )
    inflight_batching: bool = Field(
        True,
        description="Require an engine that supports in-flight batching (the C++ executor, Triton and the LLM API use it): "
        "needs kv_cache_type paged, remove_input_padding and the gpt_attention_plugin. trtconv-level check, not a flag.",
    )
    workers: int = Field(1, ge=1, description="Ranks built in parallel, one GPU each (--workers). 1 builds every rank on one GPU.")
    timing_cache: str | None = Field(
        None,
        description="TensorRT timing-cache file, read when it exists (--input_timing_cache) and written after the build "
        "(--output_timing_cache). Speeds up rebuilds on the same GPU and TensorRT. null = none read; TensorRT-LLM writes its default.",
    )
    log_level: LogLevel = Field("info", description="trtllm-build log level (--log_level).")
    gather_context_logits: bool = Field(
        False,
        description="Keep the logits of every prompt token (--gather_context_logits), so the accuracy gate can judge the "
        "engine itself through the LLM API (SamplingParams.return_context_logits). Costs GPU memory: the logits buffer "
        "grows from one row per sequence to one row per context token (max_num_tokens x vocab); see docs/engine.md.",
    )


class PyTorchBackendOptions(Section):
    """LLM-API options for TensorRT-LLM's PyTorch backend (1.0 and later), written as YAML next to the unified checkpoint."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(2048, ge=1, description="Largest runtime batch (LLM API max_batch_size).")
    max_num_tokens: int = Field(8192, ge=1, description="Token budget of one scheduler step (LLM API max_num_tokens).")
    max_seq_len: int | None = Field(None, ge=1, description="Longest prompt + output (LLM API max_seq_len). null = from the model.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="KV-cache dtype (kv_cache_config.dtype). auto = the checkpoint's (FP8 when it was calibrated with an FP8 KV cache)."
    )
    kv_cache_free_gpu_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of the free GPU memory given to the KV cache (kv_cache_config.free_gpu_memory_fraction)."
    )
    cuda_graphs: bool | list[int] = Field(
        True,
        description="CUDA graphs for decoding (cuda_graph_config): true = TensorRT-LLM's default batch sizes, "
        "a list = exactly those batch sizes, false = off (cuda_graph_config: null).",
    )
    attention_backend: Literal["TRTLLM", "FLASHINFER", "VANILLA"] = Field(
        "TRTLLM", description="Attention implementation (attn_backend)."
    )

    @field_validator("cuda_graphs")
    @classmethod
    def _batch_sizes_positive(cls, value: bool | list[int]) -> bool | list[int]:
        if isinstance(value, list):
            if not value or any(size < 1 for size in value):
                raise ValueError(f"cuda_graphs batch sizes must be a non-empty list of integers >= 1, got {value}")
            return sorted(set(value))
        return value
