"""TEST DOUBLE: how TensorRT-LLM 1.0-1.2 loads a checkpoint for `trtllm-build`, checked strictly.

Written from the reference (docs: trtllm-reference.md §2.1-2.4), independently of trtconv's own
validator, so that tests of trtconv's export go through a second reading of the format:
- config.json: `architecture` a known model class, `dtype`, `mapping` with world_size == tp*pp(*cp),
  `quantization.quant_algo` in QUANT_ALGO_LIST (all QuantAlgo but INT8),
  `kv_cache_quant_algo` in [FP8, INT8, NVFP4];
- one rank{N}.safetensors per rank, holding every parameter of that rank's model with the dtype
  and shape the layer expects (TP already applied; layer indices local to the pipeline stage).
  Missing parameters fail like `PretrainedModel.load`: "Required but not provided tensors: ...";
  extra ones only warn. lm_head may be absent when vocab_embedding is in the same file.
Safetensors headers are read directly (no torch), like a loader that never materialises weights.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# MistralForCausalLM: TensorRT-LLM maps it onto its LLaMA model (tensorrt_llm/models/__init__.py MODEL_MAP).
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
MODEL_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}  # QUANT_ALGO_LIST = set(QuantAlgo) - {INT8}
KV_CACHE_QUANT_ALGOS = {"FP8", "INT8", "NVFP4"}
# The quant_algos whose tensor layout this double models; any other valid one is refused loudly
# (exit 3) rather than accepted unchecked.
MODELLED_ALGOS = {None, "NO_QUANT", "FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ", "NVFP4"}
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


class CheckpointRejected(Exception):
    """The checkpoint does not load; `exit_code` says how the double exits."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Spec:
    dtypes: frozenset[str]
    shapes: tuple[tuple[int, ...], ...]  # any of these


def spec(dtypes, *shapes) -> Spec:
    return Spec(frozenset([dtypes] if isinstance(dtypes, str) else dtypes), tuple(tuple(s) for s in shapes))


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}


def load_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise CheckpointRejected(f"FileNotFoundError: {path}")
    config = json.loads(path.read_text())
    if config.get("architecture") not in ARCHITECTURES:
        raise CheckpointRejected(f"KeyError: unsupported architecture {config.get('architecture')!r} (double knows {sorted(ARCHITECTURES)})")
    if config.get("dtype") not in MODEL_DTYPES:
        raise CheckpointRejected(f"ValueError: config.json dtype {config.get('dtype')!r} is not one of {sorted(MODEL_DTYPES)}")
    mapping = config.get("mapping")
    if not isinstance(mapping, dict):
        raise CheckpointRejected("KeyError: config.json has no 'mapping'")
    tp, pp, cp = (int(mapping.get(k, 1)) for k in ("tp_size", "pp_size", "cp_size"))
    if int(mapping.get("world_size", 0)) != tp * pp * cp:
        raise CheckpointRejected(f"ValueError: mapping.world_size={mapping.get('world_size')} != tp_size*pp_size*cp_size={tp * pp * cp}")
    quant = config.get("quantization") or {}
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        raise CheckpointRejected(f"ValueError: quantization.quant_algo {algo!r} is not in QUANT_ALGO_LIST")
    if kv is not None and kv not in KV_CACHE_QUANT_ALGOS:
        raise CheckpointRejected(f"ValueError: quantization.kv_cache_quant_algo {kv!r} is not in KV_CACHE_QUANT_ALGO_LIST")
    if algo not in MODELLED_ALGOS:
        raise CheckpointRejected(f"TEST DOUBLE: quant_algo {algo} is valid but its tensor layout is not modelled by the double", exit_code=3)
    return config


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Layers of one pipeline stage: an even split, earlier stages taking the remainder."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def linear_specs(prefix: str, out_f: int, in_f: int, algo: str | None, model_dtype: str, group_size: int) -> dict[str, Spec]:
    if algo in (None, "NO_QUANT"):
        return {f"{prefix}.weight": spec(model_dtype, (out_f, in_f))}
    if algo == "FP8":  # int8 bytes are reinterpreted as float8_e4m3fn by the loader
        return {
            f"{prefix}.weight": spec({"F8_E4M3", "I8"}, (out_f, in_f)),
            f"{prefix}.weights_scaling_factor": spec("F32", (1,), ()),
            f"{prefix}.activation_scaling_factor": spec("F32", (1,), ()),
        }
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {
            f"{prefix}.weight": spec("I8", (out_f, in_f)),
            f"{prefix}.weights_scaling_factor": spec("F32", (out_f,)),
            f"{prefix}.activation_scaling_factor": spec("F32", (1,), ()),
            f"{prefix}.prequant_scaling_factor": spec({model_dtype, "F32"}, (in_f,), (1, in_f)),
        }
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):  # two int4 per int8 along out
        specs = {
            f"{prefix}.weight": spec("I8", (out_f // 2, in_f)),
            f"{prefix}.weights_scaling_factor": spec({model_dtype, "F32"}, (out_f, _ceil_div(in_f, group_size))),
            f"{prefix}.prequant_scaling_factor": spec({model_dtype, "F32"}, (in_f,), (1, in_f)),
        }
        if algo == "W4A8_AWQ":
            specs[f"{prefix}.activation_scaling_factor"] = spec("F32", (1,), ())
            specs[f"{prefix}.weights_scaling_factor_2"] = spec("F32", (1,), ())
        return specs
    if algo == "NVFP4":  # two fp4 per byte along in; one fp8 block scale per 16 inputs
        return {
            f"{prefix}.weight": spec("U8", (out_f, in_f // 2)),
            f"{prefix}.weights_scaling_factor": spec("F8_E4M3", (out_f, in_f // 16)),
            f"{prefix}.weights_scaling_factor_2": spec("F32", (1,), ()),
            f"{prefix}.activation_scaling_factor": spec("F32", (1,), ()),
        }
    raise AssertionError(algo)


def required_tensors(config: dict, rank: int) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """(required, optional) tensors of one rank's model."""
    mapping = config["mapping"]
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    tp_rank, pp_rank = rank % tp, (rank // tp) % pp
    dt = MODEL_DTYPES[config["dtype"]]
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head = int(config.get("head_size") or hidden // heads)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config["vocab_size"])
    quant = config.get("quantization") or {}
    algo, kv_algo, group = quant.get("quant_algo"), quant.get("kv_cache_quant_algo"), int(quant.get("group_size") or 128)
    exclude = quant.get("exclude_modules") or []

    kv_per_rank = max(kv_heads // tp, 1)
    dims = {
        "attention.qkv": ((heads // tp + 2 * kv_per_rank) * head, hidden),
        "attention.dense": (hidden, heads // tp * head),
        "mlp.fc": (inter // tp, hidden),
        "mlp.gate": (inter // tp, hidden),
        "mlp.proj": (hidden, inter // tp),
    }
    required: dict[str, Spec] = {}
    optional: dict[str, Spec] = {}
    layers = stage_layers(int(config["num_hidden_layers"]), pp, pp_rank)
    for local in range(len(layers)):
        p = f"transformer.layers.{local}"
        required[f"{p}.input_layernorm.weight"] = spec(dt, (hidden,))
        required[f"{p}.post_layernorm.weight"] = spec(dt, (hidden,))
        for name, (out_f, in_f) in dims.items():
            layer_algo = None if any(_excluded(f"{p}.{name}", pat) for pat in exclude) else algo
            required.update(linear_specs(f"{p}.{name}", out_f, in_f, layer_algo, dt, group))
        qkv_bias = spec(dt, (dims["attention.qkv"][0],))
        if config["architecture"] == "Qwen2ForCausalLM" or config.get("attn_bias"):
            required[f"{p}.attention.qkv.bias"] = qkv_bias
        if kv_algo in ("FP8", "INT8", "NVFP4"):
            required[f"{p}.attention.kv_cache_scaling_factor"] = spec("F32", (1,), ())

    vocab_rows = _ceil_div(vocab, tp)  # vocab zero-padded to a multiple of tp, then split
    if pp_rank == 0:
        if config.get("use_parallel_embedding"):
            shape = (vocab_rows, hidden) if int(config.get("embedding_sharding_dim", 0)) == 0 else (vocab, hidden // tp)
        else:
            shape = (vocab, hidden)
        required["transformer.vocab_embedding.weight"] = spec(dt, shape)
    if pp_rank == pp - 1:
        required["transformer.ln_f.weight"] = spec(dt, (hidden,))
        lm_head = spec({dt, "F8_E4M3"}, (vocab_rows, hidden))
        # Embedding sharing: lm_head may be left out when the embedding is in this file.
        (optional if pp_rank == 0 else required)["lm_head.weight"] = lm_head
    return required, optional


def _excluded(module: str, pattern: str) -> bool:
    from fnmatch import fnmatch

    return fnmatch(module, pattern) or fnmatch(module.split(".")[-1], pattern)


def check_rank_file(checkpoint_dir: Path, config: dict, rank: int) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[str]]:
    """Load-check one rank file; return its header and warnings; raise CheckpointRejected."""
    path = checkpoint_dir / f"rank{rank}.safetensors"
    if not path.is_file():
        raise CheckpointRejected(f"FileNotFoundError: No such file or directory: '{path}'")
    header = read_header(path)
    required, optional = required_tensors(config, rank)
    missing = sorted(set(required) - set(header))
    if missing:
        raise CheckpointRejected(f"RuntimeError: Required but not provided tensors: {set(missing)}")
    problems = []
    for name, want in {**required, **{k: v for k, v in optional.items() if k in header}}.items():
        dtype, shape = header[name]
        if name == "lm_head.weight" and dtype == "F8_E4M3":
            for scale in ("weights_scaling_factor", "activation_scaling_factor"):
                if f"lm_head.{scale}" not in header:
                    problems.append(f"lm_head.weight is FP8 but lm_head.{scale} is missing")
        if dtype not in want.dtypes:
            problems.append(f"{name}: dtype {dtype}, expected {sorted(want.dtypes)}")
        if shape not in want.shapes:
            problems.append(f"{name}: shape {list(shape)}, expected {' or '.join(str(list(s)) for s in want.shapes)}")
    if problems:
        raise CheckpointRejected(f"ValueError: {path.name}: tensors do not match the model: " + "; ".join(problems))
    known = set(required) | set(optional) | {"lm_head.weights_scaling_factor", "lm_head.activation_scaling_factor"}
    extra = sorted(set(header) - known)
    warnings = [f"[TRT-LLM] [W] Provided but not required tensors: {set(extra)}"] if extra else []
    return header, warnings
