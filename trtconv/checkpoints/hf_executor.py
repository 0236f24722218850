"""Run ModelOpt's unified HF checkpoint through transformers' own modeling code, with the shipped bytes.

A family's structure (q/k norms, (1+w) norms, scaled embeddings, soft-capping, interleaved local and
global layers with their own rope bases, LongRoPE, fused qkv_proj) is what transformers' modeling
classes already compute for every architecture; what the gate must judge is the numbers that ship.
So, as vLLM's and transformers' quantization integrations do, this executor takes the structure from
the family's own class and swaps the numerics in:

- the model is built from the checkpoint's own config.json (on the meta device: no weights);
- every ``nn.Linear`` becomes a ``ShippedLinear``: the dequantized weight read from the checkpoint,
  the activation quantizer and smoothing the runtime applies, with the runtime's fused-group rules
  (q/k/v and gate/up share one GEMM: trtconv.checkpoints.hf_reader.fused_linears; the groups are
  the family's row in trtconv.architectures);
- every other tensor (norms, embeddings, biases, persistent buffers such as DeepSeek-V3's router
  e_score_correction_bias) is loaded from the checkpoint as stored;
- an FP8 KV cache is the one attention hook: a registered transformers attention function rounds K
  (after rope and any k-norm) and V through FP8 with the checkpoint's k_scale / v_scale, then runs
  the family's own eager attention (which keeps soft-capping and sliding windows exact).

- a mixture-of-experts layer (transformers 5 fuses its experts into 3-D parameters) gets the one second
  swap-in: ``ShippedExperts`` replaces the fused experts module with one ``ShippedLinear`` per expert
  projection (``...experts.3.gate_proj``), read from the per-expert tensors ModelOpt writes. The
  family's router stays as it is (unquantized, loaded as stored), so routing, top-k and each family's
  normalisation are the model's own code; only the expert computation is swapped. The runtime's rules
  for FP8 experts: gate and up of an expert are one GEMM (the dense fused-group rule), and one
  activation scale serves every expert of a layer: the largest input_scale over the experts, for
  gate/up and for down separately (vLLM's FP8 MoE: "Using the maximum across experts for each layer").

A new dense family therefore costs a row of trtconv.architectures, not a forward pass. The
hand-written forward (trtconv.checkpoints.trtllm_reader) stays for the legacy TensorRT-LLM
checkpoint, whose tensor layout transformers does not know; docs/accuracy.md says how far the two
agree on the families both run.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch

from trtconv.architectures import ARCHITECTURES
from trtconv.checkpoints.hf_reader import (
    HFTensors,
    KVCacheScales,
    StoredLinear,
    _read_json,
    check_hf_architecture,
    dequantized_weights,
    fused_linears,
    fused_group_input,
    model_dtype,
    read_linear,
    read_quantization,
)
from trtconv.checkpoints.quant import fp8_round_trip
from trtconv.checkpoints.trtllm_reader import EmulatedLinear, dense
from trtconv.core.errors import CheckpointError

ATTENTION = "trtconv_shipped_kv"  # the attention implementation this executor registers with transformers
_KV_SCALES = "_trtconv_kv_scales"  # attribute an attention module carries when its KV cache is FP8


class ShippedLinear(torch.nn.Module):
    """An ``nn.Linear`` of the family's model, computing what the runtime computes from the shipped tensors."""

    def __init__(self, name: str, emulated: EmulatedLinear, dtype: torch.dtype):
        super().__init__()
        self.name, self.emulated, self.dtype = name, emulated, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emulated(x.to(self.dtype)).to(x.dtype)

    def effective_weight(self) -> torch.Tensor:
        return self.emulated.effective_weight()


class ShippedExperts(torch.nn.ModuleList):
    """transformers 5's fused experts module (same call: hidden states, top-k indices, top-k weights),
    each expert computed from its shipped linears; child ``e`` holds gate_proj, up_proj, down_proj."""

    def __init__(self, experts: list[torch.nn.ModuleDict], act_fn):
        super().__init__(experts)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(len(self)):
            self.add_expert(out, e, hidden_states, top_k_index, top_k_weights)
        return out

    def add_expert(self, out: torch.Tensor, e: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> int:
        """out += expert e's weighted output for the tokens routed to it; returns how many were (the
        per-expert sensitivity, gate/layer_streams.OneExpertShipped, runs one expert alone)."""
        token_idx, top_k_pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            return 0
        expert = self[e]
        x = hidden_states[token_idx]
        y = expert["down_proj"](self.act_fn(expert["gate_proj"](x)) * expert["up_proj"](x))
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return int(token_idx.numel())


def is_fused_experts(module: torch.nn.Module) -> bool:
    """transformers 5's fused experts module: every expert's gate/up projection in one 3-D parameter (Phi-3's MLP
    has a gate_up_proj too: a Linear, not experts)."""
    fused = getattr(module, "gate_up_proj", None)
    return isinstance(fused, torch.Tensor) and fused.dim() == 3


def shared_expert_input_scales(stored: list[list[StoredLinear]]) -> list[list[StoredLinear]]:
    """Every expert's [gate, up, down] with one input_scale per layer: the largest over the experts for
    gate/up (one fused GEMM input) and for down, as vLLM's FP8 MoE loads them."""
    def top(column: tuple[int, ...]) -> torch.Tensor | None:
        scales = [e[i].input_scale.float().reshape(()) for e in stored for i in column if e[i].input_scale is not None]
        return torch.stack(scales).max() if scales else None

    w13, w2 = top((0, 1)), top((2,))
    return [[dataclasses.replace(s, input_scale=scale if s.input_scale is not None else None)
             for s, scale in zip(expert, (w13, w13, w2))] for expert in stored]


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    """K and V through the FP8 cache (where the checkpoint says so), then the family's eager attention."""
    scales = getattr(module, _KV_SCALES, None)
    if scales is not None:
        key, value = fp8_round_trip(key, scales[0]), fp8_round_trip(value, scales[1])
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:  # sdpa would drop soft-capping silently: a family without eager attention needs its own rule
        raise CheckpointError(f"{type(module).__name__}: its module has no eager_attention_forward for the executor to run")
    return eager(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, _kv_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def model_class(arch: str, config: dict, where: Path):
    """The class config.json's architectures names (as vLLM and TensorRT-LLM pick it), whose config class must be
    the one model_type names: a model_type of another family would silently run that family's structure."""
    import transformers

    cls = getattr(transformers, arch)
    expected = cls.config_class.model_type
    if config.get("model_type") != expected:
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} does not match architectures [{arch!r}]; "
                              f"allowed for {arch}: {expected!r}")
    return cls


def transformers_config(cls, config: dict, vocab_rows: int, where: Path):
    """The family's config from config.json, without the quantization (the executor supplies it)."""
    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    fields["vocab_size"] = vocab_rows  # ModelOpt's AWQ export pads the vocabulary rows
    try:
        return cls.config_class.from_dict(fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: transformers cannot read this {cls.__name__} config: {exc!r}") from None


def build_shell(cls, config, dtype: torch.dtype, where: Path) -> torch.nn.Module:
    """The family's model with every parameter on the meta device (buffers such as rope tables are real)."""
    from accelerate import init_empty_weights

    register_attention()
    config._attn_implementation = ATTENTION
    try:
        with init_empty_weights(include_buffers=False):
            model = cls(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: transformers cannot build {cls.__name__} from it: {exc!r}") from None
    return model.to(dtype).eval()


def everywhere(_name: str) -> bool:
    """Every module name (the whole model); a layer-streamed load passes one layer's names instead."""
    return True


class _Loader:
    def __init__(self, hf_dir: Path, device: torch.device, dtype: torch.dtype, kv_cache_scales: KVCacheScales,
                 keep_stored: bool | None = None):
        self.hf_dir, self.device, self.dtype = hf_dir, device, dtype
        self.keep_stored = device.type == "cuda" if keep_stored is None else keep_stored
        self.config = _read_json(hf_dir / "config.json")
        self.arch = check_hf_architecture(self.config, hf_dir / "config.json")
        self.row = ARCHITECTURES[self.arch]
        self.quant = read_quantization(hf_dir, self.config)
        self.files = HFTensors(hf_dir)
        self.where = self.files.source
        self.runtime_dtype = model_dtype(self.config)
        self.kv_cache_scales = kv_cache_scales

    def vocab_rows(self) -> int:
        return int(self.files.get("model.embed_tokens.weight").shape[0])

    def linear_groups(self, model: torch.nn.Module, within=everywhere) -> list[list[tuple[str, torch.nn.Linear]]]:
        """Every nn.Linear the checkpoint holds, in fused GEMMs (the row's fused_groups) or alone."""
        tied = bool(self.config.get("tie_word_embeddings"))  # runtimes take the embedding then, whatever the file holds
        linears = [(n, m) for n, m in model.named_modules() if within(n) and isinstance(m, torch.nn.Linear)
                   and self.files.has(f"{n}.weight") and not (tied and n == "lm_head")]
        by_name = dict(linears)
        groups, seen = [], set()
        for name, module in linears:
            if name in seen:
                continue
            parent, _, leaf = name.rpartition(".")
            members = next((g for g in self.row.fused_groups if leaf in g), (leaf,))
            group = [(f"{parent}.{m}" if parent else m) for m in members]
            group = [n for n in group if n in by_name] or [name]
            seen.update(group)
            groups.append([(n, by_name[n]) for n in group])
        return groups

    def swap_linears(self, model: torch.nn.Module, within=everywhere) -> None:
        for group in self.linear_groups(model, within):
            stored = [read_linear(self.files, self.quant, n, m.bias is not None) for n, m in group]
            for (name, meta), lin in zip(group, self._emulated(stored)):
                self._check_shape(name, dense(lin.weight), meta)
                model.set_submodule(name, ShippedLinear(name, lin, self.dtype))

    def _check_shape(self, name: str, weight: torch.Tensor, meta: torch.nn.Linear) -> None:
        """The dequantized weight against the linear config.json's model has (once, at load)."""
        if tuple(weight.shape) != (meta.out_features, meta.in_features):
            raise CheckpointError(f"{self.where}: {name}.weight dequantizes to shape {list(weight.shape)}; config.json's "
                                  f"{self.arch} needs {[meta.out_features, meta.in_features]}")

    def _emulated(self, stored: list[StoredLinear]) -> list[EmulatedLinear]:
        """One fused GEMM's members as the runtime computes them (kept as stored on a GPU)."""
        if self.keep_stored:
            return self._kept_stored(stored)
        return [self._on_device(lin) for lin in fused_linears(stored, self.quant, self.runtime_dtype, self.where)]

    def file_name(self, name: str) -> str:
        """A module or parameter name of transformers 5 -> the name the files carry (Mixtral: block_sparse_moe)."""
        moe = self.row.experts
        if moe is None or moe.module_block == moe.file_block:
            return name
        return name.replace(f".{moe.module_block}.", f".{moe.file_block}.")

    def fused_experts(self, model: torch.nn.Module, within=everywhere) -> list[tuple[str, torch.nn.Module]]:
        moe = self.row.experts
        if moe is None:
            return []
        return [(n, m) for n, m in model.named_modules()
                if within(n) and n.endswith(f".{moe.module_block}.experts") and is_fused_experts(m)]

    def swap_experts(self, model: torch.nn.Module, within=everywhere) -> None:
        """Each fused experts module -> ShippedExperts, from the per-expert tensors of the files."""
        leaves = self.row.experts.file_leaves if self.row.experts else ()
        for name, fused in self.fused_experts(model, within):
            prefix = self.file_name(name)
            stored = [[read_linear(self.files, self.quant, f"{prefix}.{e}.{leaf}", False) for leaf in leaves]
                      for e in range(fused.num_experts)]
            experts = []
            for e, (gate, up, down) in enumerate(shared_expert_input_scales(stored)):
                linears = [*self._emulated([gate, up]), *self._emulated([down])]
                experts.append(torch.nn.ModuleDict({proj: ShippedLinear(f"{name}.{e}.{proj}", lin, self.dtype)
                                                    for proj, lin in zip(("gate_proj", "up_proj", "down_proj"), linears)}))
            model.set_submodule(name, ShippedExperts(experts, fused.act_fn))

    def _kept_stored(self, stored: list[StoredLinear]) -> list[EmulatedLinear]:
        """On a GPU the weights stay as stored and a fused group is dequantized when used: the whole
        model in float32 would be 4 bytes a parameter (32 GB for 8B) beside the original (as the
        TensorRT-LLM checkpoint reader does: trtconv.checkpoints.trtllm_reader.dense)."""
        moved = [StoredLinear(s.prefix, s.algo, *(None if t is None else t.to(self.device) for t in (
            s.weight, s.weight_scale, s.weight_scale_2, s.input_scale, s.pre_quant_scale, s.bias))) for s in stored]
        act, prequant = fused_group_input(moved, self.where)
        prequant = self._cast(prequant)

        def member(i: int):
            return lambda: dequantized_weights(moved, self.quant, self.runtime_dtype, self.where)[i].to(self.dtype)

        return [EmulatedLinear(member(i), self._cast(s.bias), prequant, act) for i, s in enumerate(moved)]

    def _cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=self.device, dtype=self.dtype)

    def _on_device(self, lin: EmulatedLinear) -> EmulatedLinear:
        act = lin.activation_quant.to(self.device) if lin.activation_quant is not None else None
        return EmulatedLinear(self._cast(dense(lin.weight)), self._cast(lin.bias), self._cast(lin.prequant_scale), act)

    def load_rest(self, model: torch.nn.Module, within=everywhere) -> None:
        """Every parameter still on the meta device and every persistent buffer (DeepSeek-V3's router
        e_score_correction_bias: the shell made it zeros), from the checkpoint as stored (tied heads tied)."""
        tied = bool(self.config.get("tie_word_embeddings"))
        missing = []
        for name, param, is_param in stored_state(model):
            if not within(name):
                continue
            stored_name = self.file_name(name)
            if not self.files.has(stored_name):
                missing.append(stored_name)
                continue
            stored = self.files.get(stored_name)
            if not stored.is_floating_point() or stored.dtype == torch.float8_e4m3fn:
                raise CheckpointError(f"{self.where}: tensor {name} is {stored.dtype}; the executor needs it unquantized")
            if tuple(stored.shape) != tuple(param.shape):
                raise CheckpointError(f"{self.where}: tensor {name} has shape {list(stored.shape)}; config.json's "
                                      f"{self.arch} needs {list(param.shape)}")
            owner, _, leaf = name.rpartition(".")
            value = self._cast(stored)
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(value, requires_grad=False) if is_param else value)
        # Not on one decoder layer's container (gate/layer_streams.py), which has no embedding to tie to.
        if tied and within("lm_head.weight") and hasattr(model, "get_input_embeddings"):
            model.get_submodule("lm_head").weight = model.get_input_embeddings().weight
            missing = [n for n in missing if n != "lm_head.weight"]
        if missing:
            raise CheckpointError(f"{self.where}: tensors missing for {self.arch}: {', '.join(missing[:5])}")

    def attach_kv_scales(self, model: torch.nn.Module, within=everywhere) -> None:
        """k_scale / v_scale onto the attention modules (ModelOpt writes them under k_proj / v_proj, or qkv_proj)."""
        if self.quant.kv_cache_quant_algo != "FP8":
            return
        for name, module in model.named_modules():
            if not within(name) or not name.endswith(self.row.attention_module):
                continue
            setattr(module, _KV_SCALES, (self._scale(name, "k_scale"), self._scale(name, "v_scale")))

    def _scale(self, attention: str, which: str) -> torch.Tensor:
        if self.kv_cache_scales == "unit":
            return torch.ones((), device=self.device)
        candidates = [f"{attention}.{p}.{which}" for p in ("k_proj" if which == "k_scale" else "v_proj", "qkv_proj")]
        found = next((c for c in candidates if self.files.has(c)), None)
        if found is None:
            raise CheckpointError(f"{self.where}: kv_cache_quant_algo FP8 but no {candidates[0]} (nor {candidates[1]})")
        return self.files.get(found).float().to(self.device)

    def empty_model(self) -> torch.nn.Module:
        """The family's model from config.json, every parameter on the meta device."""
        where = self.hf_dir / "config.json"
        cls = model_class(self.arch, self.config, where)
        return build_shell(cls, transformers_config(cls, self.config, self.vocab_rows(), where), self.dtype, where)

    def load_part(self, model: torch.nn.Module, within) -> None:
        """The shipped numerics swapped in and the rest loaded, for the modules `within` names (one decoder
        layer, or everything around the layers), placed on the device."""
        self.swap_experts(model, within)
        self.swap_linears(model, within)
        self.load_rest(model, within)
        place(model, self.device, within)
        self.attach_kv_scales(model, within)

    def model(self) -> "ShippedModel":
        model = self.empty_model()
        self.swap_experts(model)
        self.swap_linears(model)
        self.load_rest(model)
        model.to(self.device)
        self.attach_kv_scales(model)
        return ShippedModel(model, self.arch, self.device)


def stored_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is a parameter) of what the executor reads from the files as stored: the parameters still on
    the meta device (not swapped in) and the persistent buffers (the state_dict's; rope tables are not)."""
    params = [(n, p, True) for n, p in model.named_parameters() if p.is_meta]
    buffers = [(f"{owner}.{leaf}" if owner else leaf, b, False) for owner, m in model.named_modules()
               for leaf, b in m._buffers.items() if b is not None and leaf not in m._non_persistent_buffers_set]
    return params + buffers


def place(model: torch.nn.Module, device: torch.device, within) -> None:
    """The real (non-meta) parameters and buffers of the modules `within` names, moved to the device."""
    for name, module in model.named_modules():
        if not within(name):
            continue
        for key, t in module._parameters.items():
            if t is not None and not t.is_meta and t.device != device:
                module._parameters[key] = torch.nn.Parameter(t.to(device), requires_grad=False)
        for key, t in module._buffers.items():
            if t is not None and not t.is_meta and t.device != device:
                module._buffers[key] = t.to(device)


class ShippedLayers:
    """The checkpoint as its family's model, one decoder layer at a time (layer-streamed evaluation):
    the modules around the layers are loaded once; `layer(i)` swaps layer i's shipped numerics in and
    loads it (the same ShippedLinear / ShippedExperts / FP8-KV attention as the whole ShippedModel),
    `drop(i)` frees it. `logits(hidden)` runs the family's own tail (final norm, lm_head, Gemma 2's
    soft-capping) on the last layer's output."""

    def __init__(self, hf_dir: str | Path, device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32,
                 keep_stored: bool | None = None):
        self.loader = _Loader(Path(hf_dir), torch.device(device), compute_dtype, "checkpoint", keep_stored)
        self.model = self.loader.empty_model()
        self.device = self.loader.device
        self.tied = bool(self.loader.config.get("tie_word_embeddings"))
        self.loader.load_part(self.model, lambda n: not n.startswith("model.layers."))

    @property
    def config(self):
        return self.model.config

    def layer(self, i: int) -> torch.nn.Module:
        prefix = f"model.layers.{i}."
        self.loader.load_part(self.model, lambda n: n.startswith(prefix))
        return self.model.model.layers[i]

    def drop(self, i: int) -> None:
        self.model.model.layers[i] = torch.nn.Identity()

    def linears(self, i: int | None = None) -> list[ShippedLinear]:
        """Layer i's shipped linears, or (None) the ones around the layers (an untied lm_head)."""
        root = self.model.model.layers[i] if i is not None else self.model.lm_head
        return [m for m in root.modules() if isinstance(m, ShippedLinear)]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the whole model's forward makes of the last decoder layer's output (float32 [B, T, rows])."""
        layers, self.model.model.layers = self.model.model.layers, torch.nn.ModuleList()
        try:
            return self.model(inputs_embeds=hidden, use_cache=False).logits.float()
        finally:
            self.model.model.layers = layers


class ShippedModel:
    """The checkpoint as the family's transformers model; ``logits(input_ids)`` is float32 [B, T, rows]."""

    def __init__(self, model: torch.nn.Module, arch: str, device: torch.device):
        self.model, self.arch, self.device = model, arch, device

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()

    def linears(self) -> list[ShippedLinear]:
        return [m for m in self.model.modules() if isinstance(m, ShippedLinear)]


def load_shipped_model(hf_dir: str | Path, device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32,
                       kv_cache_scales: KVCacheScales = "checkpoint", keep_stored: bool | None = None) -> ShippedModel:
    """A unified HF checkpoint run by its family's transformers class with the shipped numerics.

    ``kv_cache_scales="unit"`` runs an FP8 KV cache at scale 1.0 (a runtime that ignores the scales).
    ``keep_stored``: keep weights as stored and dequantize each fused group when used (default: on a GPU);
    the logits are the same either way.
    """
    if kv_cache_scales not in ("checkpoint", "unit"):
        raise ValueError(f"kv_cache_scales must be 'checkpoint' or 'unit', not {kv_cache_scales!r}")
    return _Loader(Path(hf_dir), torch.device(device), compute_dtype, kv_cache_scales, keep_stored).model()


@torch.no_grad()
def shipped_weight_errors(shipped: ShippedModel, original) -> list[tuple[str, float]]:
    """(module name, relative Frobenius error) of every shipped linear against the original's same-named weight.

    The names are the HF module names both share, so this holds for every family; smoothing is
    folded back (effective_weight). ``original`` is the unquantized model, or a function from a
    module name to its original weight (None where there is none, e.g. a tied lm_head): original_weights.
    """
    from trtconv.checkpoints.trtllm_reader import read_errors

    weight_of = original if callable(original) and not isinstance(original, torch.nn.Module) else _module_weights(original)
    return read_errors(linear_errors(shipped.linears(), weight_of, shipped.device))


def linear_errors(linears: list[ShippedLinear], weight_of, device) -> list[tuple[str, torch.Tensor]]:
    """(name, relative error as a 0-d tensor) of each shipped linear that has an original weight."""
    from trtconv.checkpoints.trtllm_reader import _rel_error

    errors = []
    for lin in linears:
        reference = weight_of(lin.name)
        if reference is None:
            continue
        ref = reference.detach().to(device)  # moved as stored (bf16: half the bytes), upcast there by _rel_error
        errors.append((lin.name, _rel_error(lin.effective_weight().to(ref.device), ref)))
    return errors


def _module_weights(model: torch.nn.Module):
    return lambda name: original_weight(model, name)


def original_weights(model_dir: Path):
    """Module name -> the original checkpoint's weight, read from its safetensors (no model on any device).

    An expert's module name (transformers 5: ``<block>.experts.<e>.gate_proj``) is read under the
    family's file names (architectures.Experts: Mixtral's ``block_sparse_moe.experts.<e>.w1``), so the
    weight errors of a sequential (GPU) evaluation name every expert, as the in-memory one does."""
    from trtconv.architectures import row_for_folder

    files = HFTensors(Path(model_dir))
    row = row_for_folder(model_dir)
    experts = row.experts if row is not None else None

    def weight(name: str):
        found = files.get_optional(f"{name}.weight")
        if found is not None or experts is None:
            return found
        return files.get_optional(f"{expert_file_name(name, experts)}.weight")

    return weight


def expert_file_name(name: str, experts) -> str:
    """One expert's linear under the family's file names (Experts.file_block, file_leaves); other names unchanged."""
    match = _EXPERT.match(name)
    if match is None:
        return name
    fused = match["fused"]
    block = f".{experts.module_block}.experts"
    if fused.endswith(block):
        fused = fused[: -len(block)] + f".{experts.file_block}.experts"
    leaf = experts.file_leaves[("gate_proj", "up_proj", "down_proj").index(match["proj"])]
    return f"{fused}.{match['e']}.{leaf}"


_EXPERT = re.compile(r"^(?P<fused>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def original_weight(original: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The original model's weight of a shipped linear: its own nn.Linear, or one expert's slice of
    transformers 5's fused experts (gate_up_proj [E, 2I, H]: gate rows first, then up; down_proj [E, H, I])."""
    try:
        return original.get_submodule(name).weight
    except AttributeError:
        pass
    match = _EXPERT.match(name)
    if match is None:
        return None
    try:
        fused = original.get_submodule(match["fused"])
    except AttributeError:
        return None
    e = int(match["e"])
    if match["proj"] == "down_proj":
        return fused.down_proj[e]
    gate_up = fused.gate_up_proj[e]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if match["proj"] == "gate_proj" else gate_up[half:]
