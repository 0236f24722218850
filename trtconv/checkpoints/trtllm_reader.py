"""Run an exported TensorRT-LLM checkpoint in plain PyTorch (CPU or CUDA).

The accuracy gate must judge the files a runtime loads, not the in-memory model that produced
them: an export bug (a dropped rope theta, a wrong scale, a mis-packed int4 weight) has to show up
as an accuracy difference. So this module reads ``config.json`` + ``rank{N}.safetensors`` the way a
TensorRT-LLM loader does, reassembles tensor/pipeline-parallel shards, dequantizes the weights and
emulates the activation and KV-cache quantization the engine applies, then runs a Llama/Qwen2
decoder forward.

What it deliberately copies from TensorRT-LLM, including its traps:
- ``rotary_base`` missing -> 10000 (TensorRT-LLM's default). That is how a dropped rope theta
  becomes a measurable accuracy loss instead of silently "working".
- ``mlp.fc`` is HF gate_proj, ``mlp.gate`` is HF up_proj, ``mlp.proj`` is down_proj.
- K and V are quantized with the single ``kv_cache_scaling_factor`` after rope.
- A sliding window (``runtime_defaults.max_attention_window``, trtconv.architectures) is a banded
  causal mask: with window w, token t attends to tokens t-w+1 .. t (w tokens, itself included), as
  transformers' Mistral and TensorRT-LLM's cyclic KV cache of w tokens do. No key = full attention.

Tensor layouts come from trtconv.checkpoints.trtllm_format (measured on ModelOpt 0.47 exports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from trtconv.architectures import ROPE_KINDS
from trtconv.checkpoints.quant import (  # noqa: F401  (numerics re-exported: tests and callers import them from here)
    ACTIVATION_ROUND_TRIPS,
    FP8_E4M3_MAX,
    INT8_MAX,
    INT8_MIN,
    QUANT_FORMATS,
    dequantize_linear_weight,
    fp8_round_trip,
    int8_round_trip,
    unpack_int4_rows,
)
from trtconv.core.errors import CheckpointError
from trtconv.checkpoints.trtllm_format import (
    LAYER_LINEARS,
    ModelShape,
    attention_window,
    kv_heads_per_rank,
    linear_quant_algo,
    model_shape,
    read_config,
    stage_layers,
)

DEFAULT_ROTARY_BASE = 10000.0  # TensorRT-LLM's default when config.json has no rotary_base


# --------------------------------------------------------------------------------------------
# Quantization emulation (the numerics and the per-format table: trtconv.checkpoints.quant)
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationQuant:
    """A GEMM input's quantization with the checkpoint's activation_scaling_factor: static per-tensor
    for fp8 / int8, dynamic 16-element blocks under that static global scale for nvfp4."""

    kind: str  # a key of ACTIVATION_ROUND_TRIPS: "fp8", "int8" or "nvfp4"
    scale: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATION_ROUND_TRIPS[self.kind](x, self.scale)

    def to(self, device: torch.device) -> "ActivationQuant":
        return ActivationQuant(self.kind, self.scale.to(device))


def activation_quant_for(algo: str | None, scale: torch.Tensor | None) -> ActivationQuant | None:
    """The quantizer of a GEMM's input: the format's activation kind (QuantFormat.activation)."""
    kind = QUANT_FORMATS[algo].activation
    if kind is None:
        return None
    if scale is None:
        raise CheckpointError(f"quant_algo {algo}: a linear has no activation_scaling_factor")
    return ActivationQuant(kind, scale.float())


# --------------------------------------------------------------------------------------------
# Reading rank files
# --------------------------------------------------------------------------------------------


class RankFiles:
    """Lazy access to the tensors of every rank{N}.safetensors (safetensors only, never pickle)."""

    def __init__(self, ckpt_dir: Path, world_size: int):
        from safetensors import safe_open

        self._handles = {}
        self._names: dict[int, frozenset[str]] = {}  # keys() builds a list: look names up in a set
        for rank in range(world_size):
            path = ckpt_dir / f"rank{rank}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (mapping.world_size is {world_size})")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
            self._handles[rank] = (path, handle)
            self._names[rank] = frozenset(handle.keys())

    def has(self, rank: int, name: str) -> bool:
        return name in self._names[rank]

    def get(self, rank: int, name: str) -> torch.Tensor:
        path, handle = self._handles[rank]
        if name not in self._names[rank]:
            raise CheckpointError(f"{path}: tensor {name} missing")
        return handle.get_tensor(name)

    def get_optional(self, rank: int, name: str) -> torch.Tensor | None:
        return self.get(rank, name) if self.has(rank, name) else None


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@dataclass
class EmulatedLinear:
    """A linear as the engine computes it: smooth the input, quantize it, multiply by the
    dequantized weight. ``weight`` is (out, in) in the compute dtype, or a function giving it
    (kept as stored on a GPU, see dense())."""

    weight: torch.Tensor | Callable[[], torch.Tensor]
    bias: torch.Tensor | None = None
    prequant_scale: torch.Tensor | None = None  # SmoothQuant/AWQ smoothing, applied to the input
    activation_quant: ActivationQuant | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prequant_scale is not None:
            x = x * self.prequant_scale
        if self.activation_quant is not None:
            x = self.activation_quant(x)
        return F.linear(x, dense(self.weight), self.bias)

    def effective_weight(self) -> torch.Tensor:
        """The weight an unquantized model would need for the same output: smoothing folded back."""
        if self.prequant_scale is None:
            return dense(self.weight)
        return dense(self.weight) * self.prequant_scale[None, :]


# On a GPU a linear's weight may be kept as stored (fp8, int8, packed int4 + scales) and
# dequantized when used: a function returning the dense tensor. The whole model in float32 would
# be 4 bytes a parameter (32 GB for 8B) next to the original; dequantizing one linear at a time
# costs milliseconds per forward pass. On a CPU weights are dense tensors, as always.
def dense(weight) -> torch.Tensor:
    return weight() if callable(weight) else weight


def _lazy(fn, *parts):
    """fn(*dense parts), now if every part is a tensor, else as a function evaluated when used."""
    if not any(callable(p) for p in parts):
        return fn(*parts)
    return lambda: fn(*(dense(p) for p in parts))


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: EmulatedLinear
    dense: EmulatedLinear
    fc: EmulatedLinear  # gate_proj
    gate: EmulatedLinear  # up_proj
    proj: EmulatedLinear  # down_proj
    kv_cache_scale: torch.Tensor | None  # FP8 KV cache scale, None when the cache is not quantized
    # The unified HF checkpoint has separate k_scale / v_scale; None = V uses kv_cache_scale too
    # (TensorRT-LLM checkpoints have one kv_cache_scaling_factor for both).
    v_cache_scale: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


# --------------------------------------------------------------------------------------------
# Rope (TensorRT-LLM: rope_gpt_neox, rotary_base, rotary_scaling)
# --------------------------------------------------------------------------------------------


def rope_inverse_frequencies(rotary_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies for default, ``linear`` and ``llama3`` rotary scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise CheckpointError(
        f"config.json: rotary_scaling type {kind!r} is not supported by the reference executor; "
        f"supported: {', '.join(ROPE_KINDS)}"
    )


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by factor, blend in between.
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """GPT-NeoX rope on the first rotary_dim channels of each head; x is [B, heads, T, head]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class CheckpointModel:
    """A TensorRT-LLM checkpoint loaded for emulation. Call ``logits(input_ids)``."""

    def __init__(
        self,
        config: dict,
        shape: ModelShape,
        embedding: torch.Tensor,
        layers: list[DecoderLayer],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        device: torch.device,
        compute_dtype: torch.dtype,
    ):
        self.config = config
        self.shape = shape
        self.embedding = embedding
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.device = device
        self.compute_dtype = compute_dtype
        self.norm_epsilon = float(config.get("norm_epsilon", 1e-5))
        self.rotary_base = float(config.get("rotary_base", DEFAULT_ROTARY_BASE))
        self.rotary_scaling = config.get("rotary_scaling")
        self.rotary_dim = int(config.get("rotary_embedding_dim") or shape.head_size * float(config.get("rotary_pct", 1.0)))
        self.inv_freq = rope_inverse_frequencies(self.rotary_dim, self.rotary_base, self.rotary_scaling)
        self.attention_window = attention_window(config)  # None = full causal attention

    @property
    def vocab_size(self) -> int:
        """Logit columns: config.json vocab_size (AWQ exports pad it to a multiple of 64)."""
        return self.shape.vocab_size

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, dtype=torch.float64)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cast = dict(device=self.device, dtype=self.compute_dtype)
        return angles.cos().to(**cast), angles.sin().to(**cast)

    def _attention(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = self.shape
        batch, length, _ = x.shape
        q_size, kv_size = s.num_heads * s.head_size, s.num_kv_heads * s.head_size
        q, k, v = layer.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, length, s.num_heads, s.head_size).transpose(1, 2)
        k = k.view(batch, length, s.num_kv_heads, s.head_size).transpose(1, 2)
        v = v.view(batch, length, s.num_kv_heads, s.head_size).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.rotary_dim), apply_rope(k, cos, sin, self.rotary_dim)
        if layer.kv_cache_scale is not None:
            # K is written to the FP8 cache after rope. TensorRT-LLM checkpoints share one scale for
            # K and V; HF checkpoints (vLLM) give V its own.
            v_scale = layer.kv_cache_scale if layer.v_cache_scale is None else layer.v_cache_scale
            k, v = fp8_round_trip(k, layer.kv_cache_scale), fp8_round_trip(v, v_scale)
        repeat = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scale = 1.0 / math.sqrt(s.head_size)
        if self.attention_window is None or self.attention_window >= length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._window_mask(length), scale=scale)
        return layer.dense(out.transpose(1, 2).reshape(batch, length, q_size))

    def _window_mask(self, length: int) -> torch.Tensor:
        """Boolean [T, T] mask: query t sees keys t-w+1 .. t."""
        positions = torch.arange(length, device=self.device)
        offset = positions[:, None] - positions[None, :]  # query - key
        return (offset >= 0) & (offset < self.attention_window)

    def _mlp(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.proj(F.silu(layer.fc(x)) * layer.gate(x))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal logits [B, T, vocab_size] (float32) for positions 0..T-1."""
        input_ids = input_ids.to(self.device)
        hidden = self.embedding[input_ids]
        cos, sin = self._rope_tables(input_ids.shape[1])
        for layer in self.layers:
            hidden = self.layer_forward(layer, hidden, cos, sin)
        return self.head(self.final_hidden(hidden))

    # The pieces of `logits`, for layer-streamed evaluation (one layer of the checkpoint at a time).
    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rope_tables(length)

    def layer_forward(self, layer: DecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self._attention(layer, rms_norm(hidden, layer.input_norm, self.norm_epsilon), cos, sin)
        return hidden + self._mlp(layer, rms_norm(hidden, layer.post_norm, self.norm_epsilon))

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.final_norm, self.norm_epsilon)

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        return F.linear(normed, self.lm_head).float()


# --------------------------------------------------------------------------------------------
# Loading: reassemble shards into full tensors
# --------------------------------------------------------------------------------------------


class _Loader:
    """Reassembles TP shards (and PP stages) of one checkpoint into EmulatedLinears and tensors."""

    def __init__(self, ckpt_dir: Path, config: dict, device: torch.device, compute_dtype: torch.dtype,
                 keep_stored: bool | None = None):
        self.ckpt_dir = ckpt_dir
        self.config = config
        self.shape = model_shape(config)
        self.files = RankFiles(ckpt_dir, self.shape.world_size)
        self.device = device
        self.dtype = compute_dtype
        # Keep weights as stored and dequantize when used (see dense()): by default on a GPU.
        self.lazy = device.type != "cpu" if keep_stored is None else keep_stored

    def _cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=self.device, dtype=self.dtype)

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.shape.tp_size + t for t in range(self.shape.tp_size)]

    def local_linear(self, rank: int, prefix: str) -> EmulatedLinear:
        """One rank's shard of a linear, dequantized (in float32 until the final cast)."""
        algo = linear_quant_algo(self.shape, prefix)  # None where exclude_modules keeps it unquantized

        def get(suffix: str) -> torch.Tensor | None:  # moved first, so a GPU dequantizes, not the host
            t = self.files.get_optional(rank, f"{prefix}.{suffix}")
            return None if t is None else t.to(self.device)

        stored = self.files.get(rank, f"{prefix}.weight").to(self.device)
        wsf, wsf2 = get("weights_scaling_factor"), get("weights_scaling_factor_2")

        def weight_now() -> torch.Tensor:
            return dequantize_linear_weight(algo, weight=stored, weights_scaling_factor=wsf, weights_scaling_factor_2=wsf2,
                                            group_size=self.shape.group_size)

        weight = weight_now if self.lazy else weight_now()
        return EmulatedLinear(
            weight=weight,
            bias=get("bias"),
            prequant_scale=get("prequant_scaling_factor"),
            activation_quant=activation_quant_for(algo, get("activation_scaling_factor")),
        )

    def merged_linear(self, ranks: list[int], prefix: str, kind: str) -> EmulatedLinear:
        shards = [self.local_linear(r, prefix) for r in ranks]
        first = shards[0]
        if kind == "column":
            # Output rows are split; input smoothing and activation scale are replicated.
            weight = _lazy(lambda *w: torch.cat(w, dim=0), *[s.weight for s in shards])
            bias = torch.cat([s.bias for s in shards]) if first.bias is not None else None
            prequant = first.prequant_scale
        else:
            # Input columns are split: so are the per-input-channel smoothing scales.
            weight = _lazy(lambda *w: torch.cat(w, dim=1), *[s.weight for s in shards])
            bias = first.bias
            prequant = torch.cat([s.prequant_scale for s in shards]) if first.prequant_scale is not None else None
        return self._finish(EmulatedLinear(weight, bias, prequant, first.activation_quant))

    def merged_qkv(self, ranks: list[int], prefix: str) -> EmulatedLinear:
        """Each rank holds [q; k; v] of its own heads: regroup into [all q; all k; all v]."""
        s = self.shape
        q_rows = s.num_heads // s.tp_size * s.head_size
        kv_rows = kv_heads_per_rank(s) * s.head_size
        shards = [self.local_linear(r, prefix) for r in ranks]
        # With fewer kv heads than ranks the heads are replicated: keep one copy of each.
        kv_stride = max(s.tp_size // s.num_kv_heads, 1)

        def regroup(parts: list[torch.Tensor]) -> torch.Tensor:
            split = [p.split([q_rows, kv_rows, kv_rows], dim=0) for p in parts]
            q = [x[0] for x in split]
            k = [x[1] for x in split][::kv_stride]
            v = [x[2] for x in split][::kv_stride]
            return torch.cat(q + k + v, dim=0)

        weight = _lazy(lambda *w: regroup(list(w)), *[sh.weight for sh in shards])
        bias = regroup([sh.bias for sh in shards]) if shards[0].bias is not None else None
        first = shards[0]
        return self._finish(EmulatedLinear(weight, bias, first.prequant_scale, first.activation_quant))

    def _finish(self, lin: EmulatedLinear) -> EmulatedLinear:
        if lin.activation_quant is not None:
            lin.activation_quant = lin.activation_quant.to(self.device)
        return EmulatedLinear(_lazy(self._cast, lin.weight), self._cast(lin.bias), self._cast(lin.prequant_scale), lin.activation_quant)

    def layer(self, pp_rank: int, local_index: int) -> DecoderLayer:
        ranks = self.stage_ranks(pp_rank)
        prefix = f"transformer.layers.{local_index}"
        linears = {"attention.qkv": self.merged_qkv(ranks, f"{prefix}.attention.qkv")}
        for name, kind in LAYER_LINEARS.items():
            if name != "attention.qkv":
                linears[name] = self.merged_linear(ranks, f"{prefix}.{name}", kind)
        kv_scale = None
        if self.shape.kv_cache_quant_algo == "FP8":
            kv_scale = self.files.get(ranks[0], f"{prefix}.attention.kv_cache_scaling_factor").float().to(self.device)
        return DecoderLayer(
            input_norm=self._cast(self.files.get(ranks[0], f"{prefix}.input_layernorm.weight")),
            post_norm=self._cast(self.files.get(ranks[0], f"{prefix}.post_layernorm.weight")),
            qkv=linears["attention.qkv"],
            dense=linears["attention.dense"],
            fc=linears["mlp.fc"],
            gate=linears["mlp.gate"],
            proj=linears["mlp.proj"],
            kv_cache_scale=kv_scale,
        )

    def embedding(self) -> torch.Tensor:
        ranks = self.stage_ranks(0)
        name = "transformer.vocab_embedding.weight"
        s = self.shape
        if not s.use_parallel_embedding or s.tp_size == 1:
            table = self.files.get(ranks[0], name)
        elif s.embedding_sharding_dim == 0:
            table = torch.cat([self.files.get(r, name) for r in ranks], dim=0)[: s.vocab_size]
        else:
            table = torch.cat([self.files.get(r, name) for r in ranks], dim=1)
        return self._cast(table)

    def lm_head(self, embedding: torch.Tensor) -> torch.Tensor:
        ranks = self.stage_ranks(self.shape.pp_size - 1)
        if not self.files.has(ranks[0], "lm_head.weight"):
            if self.shape.shares_embedding:
                return embedding
            self.files.get(ranks[0], "lm_head.weight")  # raises CheckpointError naming the file
        # Vocab was zero-padded to a multiple of tp before the split: drop the padding rows.
        table = torch.cat([self.files.get(r, "lm_head.weight") for r in ranks], dim=0)
        return self._cast(table[: self.shape.vocab_size])

    def layer_positions(self) -> list[tuple[int, int]]:
        """(pp rank, local index) of every decoder layer, in model order."""
        s = self.shape
        return [(pp_rank, local) for pp_rank in range(s.pp_size) for local, _ in enumerate(stage_layers(s, pp_rank))]

    def model(self, with_layers: bool = True) -> CheckpointModel:
        """The whole model; `with_layers=False` leaves the layers out (layer-streamed evaluation loads them one by one)."""
        s = self.shape
        layers = [self.layer(pp, local) for pp, local in self.layer_positions()] if with_layers else []
        embedding = self.embedding()
        final_norm = self._cast(self.files.get(self.stage_ranks(s.pp_size - 1)[0], "transformer.ln_f.weight"))
        return CheckpointModel(
            self.config, s, embedding, layers, final_norm, self.lm_head(embedding), self.device, self.dtype
        )


def load_checkpoint_model(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32,
    keep_stored: bool | None = None,
) -> CheckpointModel:
    """Read config.json + every rank{N}.safetensors as a TensorRT-LLM loader would.

    It does not require validate_checkpoint to pass: a checkpoint without rotary_base still loads
    (with TensorRT-LLM's default 10000), so the accuracy gate can measure what that costs.
    ``keep_stored``: keep linear weights as stored and dequantize each when used (default: on a
    GPU, where a float32 copy of an 8B model is 32 GB); the logits are the same either way.
    """
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    return _Loader(ckpt_dir, config, torch.device(device), compute_dtype, keep_stored).model()


# --------------------------------------------------------------------------------------------
# Per-layer weight error against the original model
# --------------------------------------------------------------------------------------------

# DecoderLayer field -> HF module name (qkv is split into q/k/v separately).
_HF_LINEARS = {
    "dense": "self_attn.o_proj",
    "fc": "mlp.gate_proj",  # TensorRT-LLM's fc is HF gate_proj
    "gate": "mlp.up_proj",  # and its gate is HF up_proj
    "proj": "mlp.down_proj",
}


def _hf_weight(hf_layer: torch.nn.Module, dotted: str, device: torch.device) -> torch.Tensor:
    module = hf_layer
    for part in dotted.split("."):
        module = getattr(module, part)
    return module.weight.detach().to(device=device, dtype=torch.float32)


# Weights larger than this many values are compared a block of rows at a time (_rel_error).
ERROR_CHUNK_VALUES = 1 << 24


def _rel_error(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||candidate - reference|| / ||reference|| in float32, either one in any float dtype, as a 0-d tensor on the
    weights' device: reading it (float()) waits for the device, so callers that loop over layers read them all at
    the end, not once per linear. A weight of more than ERROR_CHUNK_VALUES values (an lm_head: Qwen3's 151936 x
    4096) is upcast and compared a block of rows at a time, the squares summed in float64: whole, the float32
    copies and their difference took 7 GiB, and the evaluation of an 8B model under a 10 GiB cap ran out of memory
    (run G3, H100). Smaller weights give the same number as before to the bit."""
    if reference.dim() < 2 or reference.numel() <= ERROR_CHUNK_VALUES:
        reference = reference.float()
        return (candidate.float() - reference).norm() / reference.norm().clamp_min(1e-30)
    rows = max(1, ERROR_CHUNK_VALUES // reference[0].numel())
    diff = norm = torch.zeros((), dtype=torch.float64, device=reference.device)
    for k in range(0, reference.shape[0], rows):
        r = reference[k:k + rows].float()
        diff = diff + (candidate[k:k + rows].float() - r).square().sum(dtype=torch.float64)
        norm = norm + r.square().sum(dtype=torch.float64)
    return (diff.sqrt() / norm.sqrt().clamp_min(1e-30)).float()


def weight_quantization_errors(ckpt_dir: str | Path, hf_model: torch.nn.Module) -> list[tuple[str, float]]:
    """(HF linear name, relative Frobenius error) for every linear, in model order.

    Compares the checkpoint's dequantized weight, with its smoothing scale folded back in, to the
    weight of ``hf_model``, which must be the ORIGINAL unquantized model (ModelOpt's SmoothQuant and
    AWQ rewrite the weights of the model they calibrate in place).

    Layer by layer, on the device ``hf_model`` is on: one decoder layer of the checkpoint is
    dequantized at a time (float32), never the whole model, and nothing moves to host memory.
    """
    ckpt_dir = Path(ckpt_dir)
    device = next(hf_model.parameters()).device
    loader = _Loader(ckpt_dir, read_config(ckpt_dir), device, torch.float32)
    s = loader.shape
    errors: list[tuple[str, float]] = []
    hf_layers = list(hf_model.model.layers)
    positions = [(pp_rank, local) for pp_rank in range(s.pp_size) for local, _ in enumerate(stage_layers(s, pp_rank))]
    with torch.no_grad():
        for index, ((pp_rank, local), hf_layer) in enumerate(zip(positions, hf_layers)):
            layer = loader.layer(pp_rank, local)
            errors += layer_weight_errors(index, layer, hf_layer, s, device)
            del layer
    return read_errors(errors)


def read_errors(errors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, float]]:
    """The errors as floats, copied off the device in one transfer (the same values as one by one)."""
    if not errors:
        return []
    values = torch.stack([e for _, e in errors]).cpu().tolist()
    return [(name, float(v)) for (name, _), v in zip(errors, values)]


def layer_weight_errors(index: int, layer: DecoderLayer, hf_layer: torch.nn.Module, s: ModelShape,
                        device: torch.device | None = None) -> list[tuple[str, torch.Tensor]]:
    """weight_quantization_errors for one decoder layer, computed on ``device`` (default: the
    original layer's device), as 0-d tensors (read_errors makes them floats); what layer-streamed
    evaluation calls."""
    if device is None:
        device = next(hf_layer.parameters()).device
    q_rows, kv_rows = s.num_heads * s.head_size, s.num_kv_heads * s.head_size
    prefix = f"model.layers.{index}"
    errors: list[tuple[str, float]] = []
    q, k, v = layer.qkv.effective_weight().float().to(device).split([q_rows, kv_rows, kv_rows], dim=0)
    for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        errors.append((f"{prefix}.self_attn.{name}", _rel_error(part, _hf_weight(hf_layer, f"self_attn.{name}", device))))
    for field_name, hf_name in _HF_LINEARS.items():
        weight = getattr(layer, field_name).effective_weight().float().to(device)
        errors.append((f"{prefix}.{hf_name}", _rel_error(weight, _hf_weight(hf_layer, hf_name, device))))
    return errors
