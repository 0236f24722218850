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
class Experts:
    """Where a mixture-of-experts family keeps its experts, in transformers 5 and in the exported files.

    transformers 5 holds a layer's experts fused (``<block>.experts.gate_up_proj`` [E, 2I, H] and
    ``.down_proj`` [E, H, I]) beside an unquantized router (``<block>.gate``); ModelOpt 0.47's
    ``export_hf_checkpoint`` (and transformers' own save_pretrained) write one linear per expert
    under the hub names: ``<file_block>.experts.<e>.<gate|up|down leaf>`` (measured on tiny models).
    """

    count_keys: tuple[str, ...]  # config.json keys of the number of experts, the first present counts
    intermediate_key: str  # config.json key of one expert's intermediate size
    file_block: str  # the MoE block's name in the files (the module is "mlp" in transformers 5)
    file_leaves: tuple[str, str, str]  # gate, up, down projection names of one expert in the files
    # What trtconv converts and judges for this family (others are refused before any work, with the reason).
    precisions: tuple[str, ...] = ("none", "fp8")
    why_not: str = ""
    module_block: str = "mlp"  # the MoE block in transformers 5's modules
    router: str = "gate"  # the router module within the block (stays unquantized)
    # Experts every token goes through beside the routed ones (DeepSeek-V3: n_shared_experts, one MLP of
    # n x the expert width, quantized as a dense MLP); None: none.
    shared_key: str | None = None
    # config.json key of how many first decoder layers keep a dense MLP (DeepSeek-V3: first_k_dense_replace;
    # intermediate_size wide); None: every layer holds experts.
    dense_layers_key: str | None = None


# The hub's Qwen3-MoE config.json says num_experts; transformers 5 saves the same attribute as num_local_experts
# (its attribute_map), so a checkpoint re-saved by transformers (shaped_model.py's, a fine-tune's) has only that.
_QWEN_MOE_EXPERTS = ("num_experts", "num_local_experts")
_MOE_WHY = ("ModelOpt 0.47's AWQ fails on transformers 5's fused experts (get_experts_list calls len(module.experts)); "
            "int8 SmoothQuant and NVFP4 experts are not verified against trtconv's executor (NVFP4 needs CUDA as well)")
_DEEPSEEK_WHY = ("ModelOpt 0.47's AWQ leaves DeepSeek-V3's fused experts' weight quantizers uncalibrated (amax dynamic) and "
                 "export_hf_checkpoint then fails on them (IndexError in pack_int4_in_uint8); int8 SmoothQuant and NVFP4 "
                 "experts are not verified against trtconv's executor (NVFP4 needs CUDA as well)")
# Multi-head latent attention caches one latent a token (kv_a_proj_with_mqa's output: the normed kv_lora_rank part
# and the rope part), not k and v; ModelOpt 0.47 calibrates k_scale / v_scale on the decompressed keys and values
# (after kv_b_proj) and writes them under k_proj / v_proj, modules DeepSeek-V3 does not have.
_MLA_KV_WHY = ("multi-head latent attention caches a latent, not keys and values: ModelOpt 0.47's FP8 KV-cache scales "
               "are calibrated on the decompressed keys and values (written as self_attn.k_proj.k_scale / "
               "v_proj.v_scale, modules this family does not have), not on the latent a runtime stores, and "
               "trtconv's executor would judge that other tensor")


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
    # Sliding-window attention (one window for every layer) is converted end to end: the load stage
    # accepts a config.json `sliding_window`, the export writes it where TensorRT-LLM reads it
    # (WINDOW_CONFIG_PATH), the reference forward masks to it, the engine options pass it.
    sliding_window: bool = False
    # Local and global layers interleaved (config.json layer_types, per-layer rope bases): only the
    # unified HF checkpoint carries them; transformers' own masks apply them in the gate's executor.
    per_layer_windows: bool = False
    # Linears one fused GEMM runs at the runtime (they share an activation quantizer; FP8 weights are
    # requantized to the group's scale): leaf names within one parent module. Phi-3 ships them fused.
    fused_groups: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    # Linears that read one input but run as separate GEMMs: precision auto gives them one format all the same
    # (ModelOpt's export smooths AWQ / SmoothQuant linears that share an input together, and asserts one format).
    shared_input_groups: tuple[tuple[str, ...], ...] = ()
    attention_module: str = "self_attn"  # where the FP8 KV-cache scales hang (k_proj.k_scale / v_proj.v_scale)
    # transformers' attention the ORIGINAL model must run in (calibration, the gate's baseline); None = its default.
    # Gemma 2 soft-caps attention scores, which transformers applies in eager attention only (sdpa drops it).
    attn_implementation: str | None = None
    # Why ModelOpt's legacy TensorRT-LLM checkpoint (export.tensorrt_llm_checkpoint, engine target
    # tensorrt) is refused for this family; None = it is converted, checked and judged.
    no_trtllm_checkpoint: str | None = None
    experts: Experts | None = None  # a mixture-of-experts family: where its experts are (None: dense)
    # Multi-head latent attention (DeepSeek-V2/V3's q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
    # v_head_dim): the memory plan counts its projections and its cache (one latent a token and layer).
    latent_attention: bool = False
    # Why a quantized KV cache (quantization.kv_cache other than none) is refused for this family, before any
    # work; None = every KV-cache format (trtconv.precisions.KV_CACHE_FORMATS) is converted and judged.
    no_kv_cache_quant: str | None = None


_UNIFIED_ONLY = "convert it to the unified HF checkpoint (export.tensorrt_llm_checkpoint: false, export.hf_checkpoint: true; engine target pytorch)"


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", "LlamaForCausalLM", "llama", qkv_bias=False),
        # ModelOpt exports Mistral under the llama decoder: the same tensor layout, plus the window.
        Architecture("MistralForCausalLM", "MistralForCausalLM", "mistral", qkv_bias=False, sliding_window=True),
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
        Architecture(
            "Qwen3ForCausalLM", "Qwen3ForCausalLM", "qwen3", qkv_bias=False, per_layer_windows=True,
            no_trtllm_checkpoint="ModelOpt 0.47's legacy export writes no qwen_type for Qwen3 (q/k-norm would be off in "
            "TensorRT-LLM) and trtconv's TensorRT-LLM checkpoint reader has no q/k-norm; " + _UNIFIED_ONLY,
        ),
        Architecture(
            "Gemma3ForCausalLM", "Gemma3ForCausalLM", "gemma3", qkv_bias=False, per_layer_windows=True,
            no_trtllm_checkpoint="ModelOpt 0.47 has no legacy TensorRT-LLM export for Gemma 3 (NotImplementedError); " + _UNIFIED_ONLY,
        ),
        Architecture(
            "Gemma2ForCausalLM", "Gemma2ForCausalLM", "gemma2", qkv_bias=False, per_layer_windows=True, attn_implementation="eager",
            no_trtllm_checkpoint="ModelOpt 0.47 writes Gemma 2's legacy TensorRT-LLM config only with tensorrt_llm installed; " + _UNIFIED_ONLY,
        ),
        Architecture(
            "Phi3ForCausalLM", "Phi3ForCausalLM", "phi3", qkv_bias=False, sliding_window=True, fused_groups=(),
            no_trtllm_checkpoint="ModelOpt 0.47 writes no legacy TensorRT-LLM config for Phi-3 without tensorrt_llm installed; " + _UNIFIED_ONLY,
        ),
        # Mixture of experts: the files keep Mixtral's original names (block_sparse_moe, w1 = gate, w3 = up, w2 = down).
        Architecture(
            "MixtralForCausalLM", "MixtralForCausalLM", "mixtral", qkv_bias=False,
            no_trtllm_checkpoint="ModelOpt 0.47's legacy export fails on transformers 5's fused experts (TypeError: "
            "QuantMixtralExperts has no len()) and trtconv's TensorRT-LLM checkpoint reader has no experts; " + _UNIFIED_ONLY,
            experts=Experts(("num_local_experts",), "intermediate_size", "block_sparse_moe", ("w1", "w3", "w2"), why_not=_MOE_WHY),
        ),
        Architecture(
            "Qwen3MoeForCausalLM", "Qwen3MoeForCausalLM", "qwen3_moe", qkv_bias=False,
            no_trtllm_checkpoint="ModelOpt 0.47's legacy export accepts MoE only for llama/dbrx/phi3/deepseek/qwen decoders "
            "(AssertionError on Qwen3-MoE) and trtconv's TensorRT-LLM checkpoint reader has no experts; " + _UNIFIED_ONLY,
            experts=Experts(_QWEN_MOE_EXPERTS, "moe_intermediate_size", "mlp", ("gate_proj", "up_proj", "down_proj"), why_not=_MOE_WHY),
        ),
        # DeepSeek-V3: multi-head latent attention, one shared expert beside the routed ones, dense first layers.
        # vLLM runs q_a_proj and kv_a_proj_with_mqa (both read the layer input) as one GEMM, fused_qkv_a_proj, where
        # q_lora_rank is set (model_executor/models/deepseek_v2.py, packed_modules_mapping); ModelOpt writes them
        # two weight scales (one input scale), so the group is the executor's to apply. The shared experts'
        # gate/up are one GEMM as a dense MLP's are; the routed experts are the Experts rule.
        Architecture(
            "DeepseekV3ForCausalLM", "DeepseekV3ForCausalLM", "deepseek_v3", qkv_bias=False,
            fused_groups=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),
            shared_input_groups=(("q_proj", "kv_a_proj_with_mqa"),),  # q_lora_rank null: no q_a_proj, q_proj reads the input
            latent_attention=True,
            no_kv_cache_quant=_MLA_KV_WHY,
            no_trtllm_checkpoint="ModelOpt 0.47's legacy export has no TensorRT-LLM config for DeepSeek (NotImplementedError: "
            "'not supported by TensorRT-LLM yet', with or without tensorrt_llm installed) and trtconv's TensorRT-LLM "
            "checkpoint reader has neither experts nor latent attention; " + _UNIFIED_ONLY,
            experts=Experts(("n_routed_experts",), "moe_intermediate_size", "mlp", ("gate_proj", "up_proj", "down_proj"),
                            why_not=_DEEPSEEK_WHY, shared_key="n_shared_experts", dense_layers_key="first_k_dense_replace"),
        ),
    )
}

# Families users ask for that trtconv does not convert yet, with what was measured: the load stage's refusal
# names the reason instead of only the supported list, and the support matrix lists them.
NOT_CONVERTED: dict[str, str] = {
    "GptOssForCausalLM": (
        "ModelOpt 0.47's unified HF export writes GPT-OSS's experts as fused 3-D FP8 tensors (mlp.experts.gate_up_proj "
        "[experts, hidden, 2 x intermediate], with biases) under one weight scale and one input scale for all experts of "
        "a layer (measured on a tiny model, transformers 5.14); trtconv's gate reads one linear per expert"
    ),
}

# The names each checkpoint kind carries, in table order (error messages list them).
HF_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
# Only the families whose legacy TensorRT-LLM checkpoint trtconv converts and reads.
TRTLLM_NAMES: tuple[str, ...] = tuple(a.trtllm_name for a in ARCHITECTURES.values() if a.no_trtllm_checkpoint is None)
_BY_TRTLLM_NAME: dict[str, Architecture] = {a.trtllm_name: a for a in ARCHITECTURES.values() if a.no_trtllm_checkpoint is None}


def by_hf_name(name: str | None) -> Architecture | None:
    return ARCHITECTURES.get(name) if name else None


def row_for_config(cfg: dict) -> Architecture | None:
    """The row of a Hugging Face config.json: its first `architectures` entry the table has (the load stage's rule)."""
    archs = cfg.get("architectures")
    if not isinstance(archs, list):  # malformed: the load stage's check names it
        return None
    return next((ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)


def row_for_folder(model_dir) -> Architecture | None:
    """row_for_config of a folder's config.json; None where it is missing or unreadable (the load stage names that)."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row_for_config(cfg) if isinstance(cfg, dict) else None


def by_trtllm_name(name: str | None) -> Architecture | None:
    return _BY_TRTLLM_NAME.get(name) if name else None


# --------------------------------------------------------------------------------------------
# Sliding-window attention
# --------------------------------------------------------------------------------------------
# Where the window goes in a TensorRT-LLM checkpoint's config.json. TensorRT-LLM 1.2's LLaMAConfig
# (which also serves Mistral) reads no window from the HF config (tensorrt_llm/models/llama/
# config.py, from_hugging_face), and trtllm-build has no window flag: the window is a run-time
# setting, KvCacheConfig.max_attention_window (a list: one window per layer, repeated). The one
# place a checkpoint carries it is PretrainedConfig.runtime_defaults (models/modeling_utils.py),
# which the engine keeps and the LLM API copies into an unset KvCacheConfig.max_attention_window
# when it loads the engine (llmapi/llm_args.py, fill_empty_fields_from_runtime_defaults).
WINDOW_CONFIG_PATH: tuple[str, str] = ("runtime_defaults", "max_attention_window")


def hf_attention_window(cfg: dict) -> int | None:
    """The window a Hugging Face config.json asks for; None = full causal attention.

    Mistral: `sliding_window` (null = none). Qwen2 writes a `sliding_window` too, but uses it only
    with `use_sliding_window: true`, so that flag decides there.
    """
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        return None
    return cfg.get("sliding_window")


def check_attention_window(cfg: dict, hf_name: str, where, error: type[Exception]) -> int | None:
    """The HF config's one window for every layer (None: none, or per-layer windows that config.json's
    layer_types carry for the runtime), refused (``error``, naming ``sliding_window``) where it cannot be converted."""
    window = hf_attention_window(cfg)
    if window is None:
        return None
    supported = [a.hf_name for a in ARCHITECTURES.values() if a.sliding_window or a.per_layer_windows]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise error(f"{where}: sliding_window is {window!r}; allowed: a positive integer (tokens) or null")
    if ARCHITECTURES[hf_name].per_layer_windows:
        return None
    if not ARCHITECTURES[hf_name].sliding_window:
        raise error(
            f"{where}: sliding_window {window} with {hf_name}: trtconv converts sliding-window attention only for "
            f"{', '.join(supported)}; allowed for {hf_name}: no window (use_sliding_window: false or sliding_window: null)"
        )
    if cfg.get("max_window_layers") not in (None, cfg.get("num_hidden_layers")):
        raise error(f"{where}: max_window_layers {cfg['max_window_layers']}: only one window for every layer is supported")
    return window
