"""Run ModelOpt's unified HF checkpoint in plain PyTorch, with the TensorRT-LLM executor's forward.

``export_hf_checkpoint`` writes what the TensorRT-LLM PyTorch backend and vLLM load: hub tensor
names (``model.layers.N.self_attn.q_proj.weight``), ``weight_scale`` / ``input_scale`` /
``pre_quant_scale`` / ``weight_scale_2`` next to each linear, ``k_proj.k_scale`` /
``v_proj.v_scale`` for the FP8 KV cache, and the quantization in ``hf_quant_config.json`` (and
``config.json:quantization_config``). This module reads those files the way such a runtime does and
builds the same ``DecoderLayer`` / ``EmulatedLinear`` structures as
``trtconv.checkpoints.trtllm_reader``, so both checkpoint formats run through ONE forward pass
(``CheckpointModel.logits``).

What a runtime does when loading, and therefore what this reader does too:
- q/k/v and gate/up are fused into one GEMM each, so they share one activation quantizer: the
  largest ``input_scale`` of the group (TensorRT-LLM ``rescale_fused_weights``).
- FP8: ModelOpt does not unify ``weight_scale`` across a fused group on this path; the runtime
  re-quantizes every member to the group's largest scale (FP8 -> model dtype, x own scale, / max,
  -> FP8). That second rounding is emulated.
- W4A8_AWQ: the kernel's group scales are ``weight_scale / weight_scale_2`` stored in float16;
  int4 x that scale becomes FP8 and ``weight_scale_2`` goes into alpha. ``input_scale`` and
  ``weight_scale_2`` must agree across a fused group (TensorRT-LLM refuses to load otherwise).
- NVFP4: ``weight`` packs two e2m1 codes per byte along the input, ``weight_scale`` is one FP8
  scale per 16 inputs, ``weight_scale_2`` (the global scale, unified by the exporter across a
  fused group) must agree across the group; activations are quantized to FP4 blocks on the fly
  under the group's largest ``input_scale`` (trtconv.checkpoints.quant.nvfp4_round_trip).
- Sliding window: config.json ``sliding_window`` (Mistral) masks attention as the TensorRT-LLM
  checkpoint's ``runtime_defaults.max_attention_window`` does.
- AWQ: ``pre_quant_scale`` of q/k/v and gate/up is folded into the RMSNorm weight by the exporter;
  where a fused group still carries one, every member must carry the same (a fused GEMM has one
  input) and it is applied; o_proj / down_proj keep theirs.
- FP8 KV cache: K (after rope) with ``k_scale`` and V with ``v_scale``, as vLLM does. Unlike the
  TensorRT-LLM checkpoint exporter, ``export_hf_checkpoint`` does not clamp them to >= 1.
  ``kv_cache_scales="unit"`` emulates a runtime that ignores them and runs the cache at scale 1.0
  (the TensorRT-LLM PyTorch backend's trtllm attention does so for FP8 caches).

Safetensors only (never pickle): ``model.safetensors`` or shards + ``model.safetensors.index.json``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from trtconv.architectures import ARCHITECTURES, HF_NAMES, WINDOW_CONFIG_PATH, by_hf_name, check_attention_window
from trtconv.core.errors import CheckpointError
from trtconv.checkpoints.trtllm_reader import (
    ActivationQuant,
    CheckpointModel,
    DecoderLayer,
    EmulatedLinear,
    activation_quant_for,
)
from trtconv.checkpoints.quant import (  # noqa: F401  (requantize_fp8 / w4a8_weight re-exported for callers)
    QUANT_FORMATS,
    SUPPORTED_QUANT_ALGOS,
    requantize_fp8,
    same_across_group,
    w4a8_weight,
)
from trtconv.checkpoints.hf_layers import check_shard_name
from trtconv.checkpoints.trtllm_format import (
    DEFAULT_AWQ_GROUP_SIZE,
    MODEL_DTYPES,
    SUPPORTED_KV_CACHE_QUANT_ALGOS,
    ModelShape,
    read_json_file,
)

HF_QUANT_CONFIG = "hf_quant_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_ROPE_THETA = 10000.0  # transformers' default for Llama/Qwen2 when config.json has none

# Per quant_algo, the scales each linear must carry and the weight's stored dtype (a float weight
# there means the export went wrong): trtconv.checkpoints.quant (QuantFormat.hf_scales / hf_weight_dtypes).
TORCH_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

KVCacheScales = Literal["checkpoint", "unit"]


# --------------------------------------------------------------------------------------------
# config.json + hf_quant_config.json
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return read_json_file(path, "a unified HF checkpoint needs config.json and its safetensors")


def check_hf_architecture(config: dict, path: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type")
    row = by_hf_name(arch)
    if row is None:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported by the reference executor; "
            f"supported: {', '.join(HF_NAMES)}"
        )
    check_attention_window(config, row.hf_name, path, CheckpointError)
    return arch


@dataclass(frozen=True)
class HFQuantization:
    """The quantization a runtime reads from the checkpoint, and which file said so."""

    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int
    exclude_modules: tuple[str, ...]
    source: Path | None  # None: the checkpoint is not quantized
    # quant_algo MIXED_PRECISION (ModelOpt's per-layer form, e.g. `quantization.precision: auto`):
    # module name -> its own quant_algo, from `quantized_layers`; a module not listed is unquantized.
    layers: dict[str, str] | None = None

    def excludes(self, module: str) -> bool:
        """ModelOpt writes exact names and fnmatch patterns ("lm_head", "*layers.0.mlp*")."""
        return any(fnmatch.fnmatchcase(module, pattern) for pattern in self.exclude_modules)

    def algo_for(self, module: str) -> str | None:
        """The quant_algo one linear is stored in: its own entry of a mixed checkpoint, else the checkpoint's."""
        if self.layers is not None:
            return self.layers.get(module)
        return None if self.excludes(module) else self.quant_algo


def _kv_algo_from_scheme(scheme: object, path: Path) -> str | None:
    """config.json's kv_cache_scheme ({"num_bits": 8, "type": "float"}) -> "FP8"."""
    if scheme is None:
        return None
    if isinstance(scheme, dict) and scheme.get("num_bits") == 8 and scheme.get("type") == "float":
        return "FP8"
    raise CheckpointError(f"{path}: quantization_config.kv_cache_scheme {scheme!r} is not supported; supported: FP8")


def _quantization_fields(hf_dir: Path, config: dict) -> tuple[dict, Path] | None:
    """(fields, file) from hf_quant_config.json, else config.json's quantization_config.

    TensorRT-LLM prefers hf_quant_config.json; vLLM reads config.json. When both exist they must
    name the same quant_algo, otherwise the two runtimes would serve different models.
    """
    config_path = hf_dir / "config.json"
    qc = config.get("quantization_config")
    if qc is not None and qc.get("quant_method") != "modelopt":
        raise CheckpointError(
            f"{config_path}: quantization_config.quant_method {qc.get('quant_method')!r} is not supported; "
            "only ModelOpt's unified checkpoint ('modelopt') is"
        )
    hf_quant_path = hf_dir / HF_QUANT_CONFIG
    if hf_quant_path.is_file():
        fields = _read_json(hf_quant_path).get("quantization")
        if not isinstance(fields, dict):
            raise CheckpointError(f"{hf_quant_path}: no 'quantization' object")
        if qc is not None and qc.get("quant_algo") != fields.get("quant_algo"):
            raise CheckpointError(
                f"{hf_quant_path}: quant_algo {fields.get('quant_algo')!r} disagrees with {config_path} "
                f"quantization_config.quant_algo {qc.get('quant_algo')!r}"
            )
        return fields, hf_quant_path
    if qc is None:
        return None
    fields = {
        "quant_algo": qc.get("quant_algo"),
        "kv_cache_quant_algo": qc.get("kv_cache_quant_algo") or _kv_algo_from_scheme(qc.get("kv_cache_scheme"), config_path),
        "group_size": qc.get("group_size"),
        "exclude_modules": qc.get("ignore") or qc.get("exclude_modules") or [],
    }
    return fields, config_path


def read_quantization(hf_dir: Path, config: dict) -> HFQuantization:
    found = _quantization_fields(hf_dir, config)
    if found is None:
        return HFQuantization(None, None, DEFAULT_AWQ_GROUP_SIZE, (), None)
    fields, path = found
    algo, kv_algo = fields.get("quant_algo"), fields.get("kv_cache_quant_algo")
    layers, group_size = None, fields.get("group_size")
    if algo == MIXED_PRECISION:
        layers, group_size = _mixed_layers(fields.get("quantized_layers"), path)
    elif algo not in SUPPORTED_QUANT_ALGOS:
        allowed = ", ".join("null" if a is None else a for a in (*SUPPORTED_QUANT_ALGOS, MIXED_PRECISION))
        raise CheckpointError(f"{path}: quant_algo {algo!r} is not supported; allowed: {allowed}")
    if kv_algo not in SUPPORTED_KV_CACHE_QUANT_ALGOS:
        allowed = ", ".join("null" if a is None else a for a in SUPPORTED_KV_CACHE_QUANT_ALGOS)
        raise CheckpointError(f"{path}: kv_cache_quant_algo {kv_algo!r} is not supported; allowed: {allowed}")
    return HFQuantization(
        quant_algo=algo,
        kv_cache_quant_algo=kv_algo,
        group_size=int(group_size or DEFAULT_AWQ_GROUP_SIZE),
        exclude_modules=tuple(fields.get("exclude_modules") or ()),
        source=path,
        layers=layers,
    )


MIXED_PRECISION = "MIXED_PRECISION"  # ModelOpt's quant_algo when layers differ (export/quant_utils.process_layer_quant_config)


def _mixed_layers(entries: object, path: Path) -> tuple[dict[str, str], int | None]:
    """`quantized_layers` of a MIXED_PRECISION checkpoint: module -> quant_algo, and the one group size
    its grouped formats share (the executor dequantizes with one; trtconv writes one per build)."""
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{path}: quant_algo MIXED_PRECISION needs a non-empty 'quantized_layers' object")
    layers, groups = {}, set()
    for module, entry in entries.items():
        algo = entry.get("quant_algo") if isinstance(entry, dict) else None
        if algo is None or algo not in SUPPORTED_QUANT_ALGOS:
            allowed = ", ".join(a for a in SUPPORTED_QUANT_ALGOS if a is not None)
            raise CheckpointError(f"{path}: quantized_layers.{module}.quant_algo {algo!r} is not supported; allowed: {allowed}")
        layers[module] = algo
        if entry.get("group_size"):
            groups.add(int(entry["group_size"]))
    if len(groups) > 1:
        raise CheckpointError(f"{path}: quantized_layers use group sizes {sorted(groups)}; the reference executor reads one")
    return layers, next(iter(groups), None)


def model_dtype(config: dict) -> torch.dtype:
    """The runtime's activation dtype (transformers 5 writes "dtype", 4.x "torch_dtype")."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return TORCH_DTYPES.get(name, torch.bfloat16)


def hf_model_shape(config: dict, arch: str, quant: HFQuantization, vocab_rows: int) -> ModelShape:
    """The ModelShape CheckpointModel needs (one rank, no parallel embedding)."""
    heads = config["num_attention_heads"]
    dtype_name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return ModelShape(
        architecture=arch,
        dtype=MODEL_DTYPES.get(dtype_name, "BF16"),
        vocab_size=vocab_rows,
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_size=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        tp_size=1,
        pp_size=1,
        quant_algo=quant.quant_algo,
        kv_cache_quant_algo=quant.kv_cache_quant_algo,
        group_size=quant.group_size,
        qkv_bias=ARCHITECTURES[arch].qkv_bias or bool(config.get("attention_bias")),
        use_parallel_embedding=False,
        embedding_sharding_dim=0,
        shares_embedding=bool(config.get("tie_word_embeddings")),
    )


def rope_config(config: dict) -> dict:
    """HF rope settings in the TensorRT-LLM key names CheckpointModel reads.

    transformers 5 nests theta and scaling in ``rope_parameters``; 4.x has ``rope_theta`` and
    ``rope_scaling`` at the top level. Both are accepted.
    """
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    return {
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "rotary_base": float(theta),
        "rotary_scaling": None if kind == "default" else rope,
        "rotary_pct": float(config.get("partial_rotary_factor", 1.0)),
    }


# --------------------------------------------------------------------------------------------
# Tensor files: one model.safetensors or shards named by the index
# --------------------------------------------------------------------------------------------


class HFTensors:
    """Lazy tensor access by hub name; errors name the file that should hold the tensor."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        self._where: dict[str, Path] = self._weight_map(hf_dir)
        self.source = hf_dir / (INDEX_FILE if (hf_dir / INDEX_FILE).is_file() else SINGLE_FILE)
        self._handles = {}
        for path in sorted(set(self._where.values())):
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (named by {self.source})")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc

    @staticmethod
    def _weight_map(hf_dir: Path) -> dict[str, Path]:
        from safetensors import safe_open

        index = hf_dir / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            for name, file in weight_map.items():  # the files judged must be the artifact's own (hashed) files
                check_shard_name(index, name, str(file))
            return {name: hf_dir / file for name, file in weight_map.items()}
        single = hf_dir / SINGLE_FILE
        if not single.is_file():
            if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
                raise CheckpointError(f"{hf_dir}: only pickle weights (*.bin/*.pt); the executor reads safetensors only")
            raise CheckpointError(f"{single}: missing (and no {INDEX_FILE})")
        try:
            with safe_open(str(single), framework="pt") as handle:
                return {name: single for name in handle.keys()}
        except Exception as exc:
            raise CheckpointError(f"{single}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.source}: tensor {name} missing")
        return self._handles[path].get_tensor(name)

    def get_optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.has(name) else None


# --------------------------------------------------------------------------------------------
# One HF linear as stored, and fused groups of them as the runtime runs them
# --------------------------------------------------------------------------------------------


@dataclass
class StoredLinear:
    """The tensors of one HF linear (``prefix`` = module name, e.g. model.layers.0.mlp.up_proj)."""

    prefix: str
    algo: str | None  # None when the checkpoint or this module (exclude_modules) is unquantized
    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    weight_scale_2: torch.Tensor | None
    input_scale: torch.Tensor | None
    pre_quant_scale: torch.Tensor | None
    bias: torch.Tensor | None


def read_linear(files: HFTensors, quant: HFQuantization, prefix: str, has_bias: bool) -> StoredLinear:
    algo = quant.algo_for(prefix)
    get = lambda suffix: files.get_optional(f"{prefix}.{suffix}")  # noqa: E731
    fmt = QUANT_FORMATS[algo]
    for suffix in fmt.hf_scales:
        files.get(f"{prefix}.{suffix}")  # raises CheckpointError naming the file and the tensor
    weight = files.get(f"{prefix}.weight")
    if algo is not None and weight.dtype not in fmt.hf_weight_dtypes:
        raise CheckpointError(
            f"{files.source}: tensor {prefix}.weight is {weight.dtype}, but quant_algo {algo} "
            f"stores {' or '.join(str(d) for d in fmt.hf_weight_dtypes)}"
        )
    return StoredLinear(
        prefix=prefix,
        algo=algo,
        weight=weight,
        weight_scale=get("weight_scale"),
        weight_scale_2=get("weight_scale_2"),
        input_scale=get("input_scale"),
        pre_quant_scale=get("pre_quant_scale"),
        bias=files.get(f"{prefix}.bias") if has_bias else None,
    )


def dequantized_weights(group: list[StoredLinear], quant: HFQuantization, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    """Each member's weight as the fused GEMM sees it, float32 (out, in) (QuantFormat.hf_dequantize)."""
    return QUANT_FORMATS[group[0].algo].hf_dequantize(group, quant.group_size, runtime_dtype, where)


def group_activation_quant(group: list[StoredLinear], where: Path) -> ActivationQuant | None:
    """One activation quantizer per fused GEMM: the group's largest input_scale (W4A8: must be equal)."""
    algo = group[0].algo
    for field in QUANT_FORMATS[algo].hf_equal_in_fused_group:
        same_across_group(group, field, where)
    scales = [s.input_scale for s in group if s.input_scale is not None]
    scale = torch.stack([t.float().reshape(()) for t in scales]).max() if scales else None
    return activation_quant_for(algo, scale)


def fused_group_input(group: list[StoredLinear], where: Path) -> tuple[ActivationQuant | None, torch.Tensor | None]:
    """(activation quantizer, smoothing scale) one fused GEMM applies to its single input, after checking
    that its members are quantized alike."""
    if len({s.algo for s in group}) > 1:
        names = ", ".join(s.prefix for s in group)
        raise CheckpointError(f"{where}: exclude_modules quantizes only part of a fused group ({names})")
    return group_activation_quant(group, where), same_across_group(group, "pre_quant_scale", where)


def fused_linears(group: list[StoredLinear], quant: HFQuantization, runtime_dtype: torch.dtype, where: Path) -> list[EmulatedLinear]:
    """The members of one fused GEMM as EmulatedLinears sharing its input smoothing and quantizer."""
    act, prequant = fused_group_input(group, where)
    weights = dequantized_weights(group, quant, runtime_dtype, where)
    return [EmulatedLinear(w, s.bias, prequant, act) for w, s in zip(weights, group)]


def concat_linears(parts: list[EmulatedLinear]) -> EmulatedLinear:
    """q, k, v of one fused GEMM -> the single qkv linear DecoderLayer holds ([all q; all k; all v])."""
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    return EmulatedLinear(torch.cat([p.weight for p in parts]), bias, parts[0].prequant_scale, parts[0].activation_quant)


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


class _HFLoader:
    def __init__(self, hf_dir: Path, device: torch.device, compute_dtype: torch.dtype, kv_cache_scales: KVCacheScales):
        self.hf_dir = hf_dir
        self.config = _read_json(hf_dir / "config.json")
        self.arch = check_hf_architecture(self.config, hf_dir / "config.json")
        self.quant = read_quantization(hf_dir, self.config)
        self.files = HFTensors(hf_dir)
        self.device, self.dtype = device, compute_dtype
        self.runtime_dtype = model_dtype(self.config)
        self.kv_cache_scales = kv_cache_scales
        self.where = self.files.source

    def _cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=self.device, dtype=self.dtype)

    def _finish(self, lin: EmulatedLinear) -> EmulatedLinear:
        act = lin.activation_quant.to(self.device) if lin.activation_quant is not None else None
        return EmulatedLinear(self._cast(lin.weight), self._cast(lin.bias), self._cast(lin.prequant_scale), act)

    def _group(self, prefixes: list[str], has_bias: bool) -> list[EmulatedLinear]:
        stored = [read_linear(self.files, self.quant, p, has_bias) for p in prefixes]
        return [self._finish(lin) for lin in fused_linears(stored, self.quant, self.runtime_dtype, self.where)]

    def _kv_scales(self, attn: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.quant.kv_cache_quant_algo != "FP8":
            return None, None
        if self.kv_cache_scales == "unit":
            one = torch.ones((), device=self.device)
            return one, one
        k = self.files.get(f"{attn}.k_proj.k_scale").float().to(self.device)
        v = self.files.get(f"{attn}.v_proj.v_scale").float().to(self.device)
        return k, v

    def layer(self, index: int) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        qkv_bias = ARCHITECTURES[self.arch].qkv_bias or bool(self.config.get("attention_bias"))
        mlp_bias = bool(self.config.get("mlp_bias"))
        q, k, v = self._group([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], qkv_bias)
        (dense,) = self._group([f"{attn}.o_proj"], bool(self.config.get("attention_bias")))
        gate_proj, up_proj = self._group([f"{mlp}.gate_proj", f"{mlp}.up_proj"], mlp_bias)
        (down_proj,) = self._group([f"{mlp}.down_proj"], mlp_bias)
        k_scale, v_scale = self._kv_scales(attn)
        return DecoderLayer(
            input_norm=self._cast(self.files.get(f"{prefix}.input_layernorm.weight")),
            post_norm=self._cast(self.files.get(f"{prefix}.post_attention_layernorm.weight")),
            qkv=concat_linears([q, k, v]),
            dense=dense,
            fc=gate_proj,  # TensorRT-LLM naming, as DecoderLayer uses it
            gate=up_proj,
            proj=down_proj,
            kv_cache_scale=k_scale,
            v_cache_scale=v_scale,
        )

    def _float_table(self, name: str) -> torch.Tensor:
        table = self.files.get(name)
        if not table.is_floating_point() or table.dtype == torch.float8_e4m3fn:
            raise CheckpointError(f"{self.where}: tensor {name} is {table.dtype}; the executor needs it unquantized")
        return table

    def lm_head(self, embedding: torch.Tensor) -> torch.Tensor:
        if not self.files.has("lm_head.weight") and self.config.get("tie_word_embeddings"):
            return embedding
        return self._cast(self._float_table("lm_head.weight"))

    def model(self) -> CheckpointModel:
        embedding = self._cast(self._float_table("model.embed_tokens.weight"))
        lm_head = self.lm_head(embedding)
        layers = [self.layer(i) for i in range(self.config["num_hidden_layers"])]
        shape = hf_model_shape(self.config, self.arch, self.quant, vocab_rows=lm_head.shape[0])
        final_norm = self._cast(self.files.get("model.norm.weight"))
        config = rope_config(self.config)
        window = check_attention_window(self.config, self.arch, self.hf_dir / "config.json", CheckpointError)
        if window is not None:  # in the TensorRT-LLM key CheckpointModel reads
            config[WINDOW_CONFIG_PATH[0]] = {WINDOW_CONFIG_PATH[1]: [window]}
        return CheckpointModel(config, shape, embedding, layers, final_norm, lm_head, self.device, self.dtype)


def load_hf_checkpoint_model(
    hf_dir: str | Path,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    kv_cache_scales: KVCacheScales = "checkpoint",
) -> CheckpointModel:
    """Read a unified HF checkpoint (config.json, hf_quant_config.json, safetensors) as a runtime would.

    Returns the same ``CheckpointModel`` as ``load_checkpoint_model``: ``.logits(input_ids)`` gives
    float32 [B, T, vocab]. ``kv_cache_scales="unit"`` runs an FP8 KV cache at scale 1.0 instead of
    the checkpoint's k_scale / v_scale (see the module docstring).
    """
    if kv_cache_scales not in ("checkpoint", "unit"):
        raise ValueError(f"kv_cache_scales must be 'checkpoint' or 'unit', not {kv_cache_scales!r}")
    return _HFLoader(Path(hf_dir), torch.device(device), compute_dtype, kv_cache_scales).model()
