"""Per-layer sensitivity from the SHIPPED checkpoint: one decoder layer's shipped tensors at a time, the rest original.

Why the shipped files, not a second calibration (issue 21 item 4): the build has already calibrated and
exported; calibrating the original again (in float32, next to nothing else) doubled the GPU peak of an
8B run, ran AWQ's search a second time (369 of 1076 s on SmolLM2-135M int4_awq, CPU) and could not
run at all where the build had streamed under a memory cap. The checkpoint on disk holds every
quantized layer already, exactly as it ships, and the gate's reference executors can run any one
of its layers (trtllm_reader for the legacy TensorRT-LLM checkpoint, hf_executor for the unified HF
checkpoint). So "only layer i quantized" is: the original layers, except layer i read from the
shipped files. Nothing is calibrated, the numbers are those of the bytes a runtime loads (the
alternative, keeping ModelOpt's calibrated quantizer state, would judge the in-memory model again
and does not exist when the export comes back from the stage cache), and it works the same whether
the export was built now or restored.

How it runs: each decoder layer is visited once per pass, and several hidden-state streams go
through it (the rows are few: SENSITIVITY_EVAL_ROWS):
- pass 1: the original stream (all layers original), the fully shipped stream (all layers shipped),
  and one stream per layer i, started at layer i from the original stream's state (layers before i
  compute exactly the original's) — N(N+1)/2 layer forwards, N layer loads, instead of N^2;
- pass 2: one stream per candidate exclude list (its layers original, all others shipped), so the
  suggestion is measured, never only estimated; streams that have not parted yet share their work.
The original's decoder layers are either resident (the whole model in its compute dtype, as
calibration held it) or read one at a time from the memory-mapped safetensors (`streamed`: the memory
plan's choice, as for calibration and evaluation); the shipped layer is always read one at a time.
Both ways run the same operations in the same order, so they give the same KLs
(tests/contract/test_advice.py). Embedding, final norm, lm_head (and any final soft-capping) are
the original's in every stream: what an exclude list changes is decoder layers. The per-layer
keyword arguments (masks, rotary tables) of both models are captured by running each model's own
forward with its decoder layers replaced by recorders (capture_layer_calls), so families with mixed
full and sliding-window layers get each layer's own mask.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trtconv.checkpoints.hf_layers import first_output


class _Stop(Exception):
    pass


def decoder_layers(model) -> list:
    return list(model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers)


def capture_layer_calls(model, **forward_kwargs) -> list[tuple[tuple, dict]]:
    """Every decoder layer's (args, kwargs) as the model's own forward passes them, without running any
    layer: each layer's forward is replaced by a recorder that returns its input (the forward stops after
    the last layer). Works on a model whose decoder layers are on the meta device."""
    layers = decoder_layers(model)
    calls: list[tuple[tuple, dict]] = []

    def recorder(last: bool):
        def forward(*args, **kwargs):
            calls.append((args, dict(kwargs)))
            if last:
                raise _Stop
            return args[0]
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i == len(layers) - 1)
    try:
        with torch.no_grad():
            model(use_cache=False, **forward_kwargs)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward
    if len(calls) != len(layers):
        raise RuntimeError(f"sensitivity: captured {len(calls)} layer calls for {len(layers)} decoder layers")
    return calls


def logits_of_final(model, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final decoder hidden states: its own forward with every decoder layer passing
    its input on and the last one returning `hidden`, so the final norm, lm_head and any soft-capping are
    the family's own code."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.forward = (lambda *a, **k: hidden) if i == len(layers) - 1 else (lambda *a, **k: a[0])
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for layer in layers:
            del layer.forward


def move_buffers(model, device: str) -> None:
    """Real (non-meta) buffers onto the device, parameters untouched (they may be on meta)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)


# ---------------------------------------------------------------------------------------------
# The original model: resident, or its decoder layers read one at a time


class OriginalLayers:
    """The original model in its compute dtype; `streamed`: its decoder layers stay on the meta device
    and are read from the safetensors when asked for (the embedding, final norm and lm_head are real)."""

    def __init__(self, model_dir: Path, dtype: str, device: str, streamed: bool, trust_remote_code: bool = False):
        from trtconv.checkpoints.hf_model import load_hf_model, torch_dtype

        self.model_dir, self.device, self.streamed = Path(model_dir), device, streamed
        self.dtype = torch_dtype(dtype)
        self.model = self._outer() if streamed else load_hf_model(model_dir, dtype, trust_remote_code, device)
        self.layers = decoder_layers(self.model)

    def _outer(self):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from trtconv.checkpoints.hf_layers import WeightIndex
        from trtconv.checkpoints.hf_model import family_attention

        self.index = WeightIndex(self.model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rope tables) made as from_pretrained makes them
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, **family_attention(self.model_dir))
        model.load_state_dict(self.index.outer(self.dtype, self.device), strict=False, assign=True)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        move_buffers(model, self.device)
        return model.eval()

    def layer(self, i: int):
        if not self.streamed:
            return self.layers[i]
        from trtconv.checkpoints.hf_layers import load_layer

        return load_layer(type(self.layers[i]), self.model.config, self.index, i, self.dtype, self.device)


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint, one decoder layer at a time


class ShippedTrtllmLayers:
    """Layer i of the legacy TensorRT-LLM checkpoint through trtllm_reader's forward (float32, as the gate)."""

    def __init__(self, checkpoint_dir: Path, device: str):
        from trtconv.checkpoints.trtllm_format import read_config
        from trtconv.checkpoints.trtllm_reader import CheckpointModel, _Loader

        config = read_config(checkpoint_dir)
        self.loader = _Loader(Path(checkpoint_dir), config, torch.device(device), torch.float32)
        self.forward = CheckpointModel(config, self.loader.shape, None, [], None, None, torch.device(device), torch.float32)
        self.positions = self.loader.layer_positions()
        self.num_layers = len(self.positions)

    def prepare(self, ids: torch.Tensor) -> None:
        self.rope = self.forward.rope_tables(ids.shape[1])

    def layer(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        quantized = self.loader.layer(*self.positions[i])
        return lambda h: self.forward.layer_forward(quantized, h.float(), *self.rope)


class ShippedHFLayers:
    """Layer i of the unified HF checkpoint: the family's own decoder layer with the shipped numerics swapped
    in (hf_executor's ShippedLinear / ShippedExperts, its FP8 KV attention), called with the keyword
    arguments the shipped model itself passes that layer (its attention implementation's masks)."""

    def __init__(self, checkpoint_dir: Path, device: str):
        from trtconv.checkpoints import hf_executor as hx

        self.hx, self.device = hx, device
        self.loader = hx._Loader(Path(checkpoint_dir), torch.device(device), torch.float32, "checkpoint")
        where = self.loader.hf_dir / "config.json"
        cls = hx.model_class(self.loader.arch, self.loader.config, where)
        self.shell = hx.build_shell(cls, hx.transformers_config(cls, self.loader.config, self.loader.vocab_rows(), where),
                                    torch.float32, where)
        move_buffers(self.shell, device)
        names = {id(m): n for n, m in self.shell.named_modules()}
        self.prefixes = [names[id(layer)] for layer in decoder_layers(self.shell)]
        self.num_layers = len(self.prefixes)

    def prepare(self, ids: torch.Tensor) -> None:
        hidden = self.shell.config.hidden_size
        embeds = torch.zeros(*ids.shape, hidden, dtype=torch.float32, device=self.device)
        self.calls = capture_layer_calls(self.shell, inputs_embeds=embeds)

    def layer(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        layer = copy.deepcopy(decoder_layers(self.shell)[i])  # on meta: the shell keeps its own
        root = torch.nn.Module()
        _place(root, self.prefixes[i], layer)
        self.loader.swap_experts(root)
        self.loader.swap_linears(root)
        self.loader.load_rest(root)
        root.to(self.device)
        self.loader.attach_kv_scales(root)
        args, kwargs = self.calls[i]

        def run(h: torch.Tensor) -> torch.Tensor:
            return first_output(layer(h.float(), *args[1:], **kwargs))

        run.module = layer  # per_expert takes the shipped experts from it
        return run


class OneExpertShipped(torch.nn.Module):
    """The original's fused experts (transformers 5's call: hidden states, top-k indices, top-k weights) with expert
    `e` alone computed from the shipped tensors: the original module runs with e's routing weights zeroed and the
    shipped expert (hf_executor.ShippedExperts, in float32 as the gate computes it) adds its own weighted output.
    `tokens` counts the tokens routed to e."""

    def __init__(self, original: torch.nn.Module, shipped: torch.nn.Module, e: int):
        super().__init__()
        self.original, self.shipped, self.e, self.tokens = original, shipped, e, 0

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = self.original(hidden_states, top_k_index, top_k_weights.masked_fill(top_k_index == self.e, 0))
        own = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        self.tokens = self.shipped.add_expert(own, self.e, hidden_states.float(), top_k_index, top_k_weights.float())
        return out + own.to(out.dtype)


def _place(root: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    """root.<dotted> = module, with plain containers on the way (names as in the whole model)."""
    *parents, leaf = dotted.split(".")
    here = root
    for part in parents:
        if not hasattr(here, part):
            here.add_module(part, torch.nn.Module())
        here = getattr(here, part)
    here.add_module(leaf, module)


def can_stream(trust_remote_code: bool) -> bool:
    """Whether the original's decoder layers can be read one at a time (trtconv.checkpoints.hf_layers): not for
    models with their own code, which hold the original in memory. A mixture-of-experts family's layer is read as
    the streamed calibration reads it (its per-expert files folded into transformers 5's fused experts:
    hf_layers.fold_layer_experts); before that folding existed MoE families held the original in memory too, and a
    streamed MoE build's advice could only end in "no layer advice" for lack of memory."""
    return not trust_remote_code


def shipped_layers(checkpoint_dir: Path, device: str):
    from trtconv.stages.evaluate import is_hf_checkpoint

    return (ShippedHFLayers if is_hf_checkpoint(Path(checkpoint_dir)) else ShippedTrtllmLayers)(checkpoint_dir, device)


# ---------------------------------------------------------------------------------------------
# The streams


@dataclass
class Streams:
    """Hidden states of the sensitivity rows under several mixtures of original and shipped layers."""

    original: OriginalLayers
    shipped: object  # ShippedTrtllmLayers | ShippedHFLayers
    ids: torch.Tensor
    lengths: list[int]
    progress: Callable = lambda n=1: None
    seconds: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shipped.num_layers != len(self.original.layers):
            raise RuntimeError(f"sensitivity: the checkpoint has {self.shipped.num_layers} decoder layers, the original "
                               f"{len(self.original.layers)}")
        self.calls = capture_layer_calls(self.original.model, input_ids=self.ids)
        self.shipped.prepare(self.ids)
        self.base_logp = None

    def _original(self, layer, i: int, h: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.calls[i]
        return first_output(layer(h.to(self.original.dtype), *args[1:], **kwargs))

    def _pass(self, step, shipped_at: set[int] | None = None) -> None:
        """step(i, original layer i, shipped layer i) for every layer, each loaded once (the shipped one only
        at `shipped_at` when given, else None)."""
        with torch.no_grad():
            for i in range(len(self.original.layers)):
                original = self.original.layer(i)
                shipped = self.shipped.layer(i) if shipped_at is None or i in shipped_at else None
                step(i, original, shipped)
                del original, shipped
                self.progress(1)

    def per_layer(self) -> tuple[list[float], float]:
        """(KL with only layer i shipped, for each i; KL with every layer shipped)."""
        h0 = self.calls[0][0][0]
        base, full, variants = h0, h0, []

        def step(i, original, shipped):
            nonlocal base, full
            variants.append(shipped(base))
            for j in range(i):
                variants[j] = self._original(original, i, variants[j])
            full = shipped(full)
            base = self._original(original, i, base)

        self._pass(step)
        # On the host: a large vocabulary's log-probabilities (8B: 0.8 GB for 6 x 256 tokens) need not stay on the GPU.
        self.base_logp = [self._logp(j, base).cpu() for j in range(len(self.lengths))]
        return [self.kl(h) for h in variants], self.kl(full)

    def with_original(self, keep: list[set[int]]) -> list[float]:
        """KL with the layers of each set original and every other layer shipped (one stream per set)."""
        h0 = self.calls[0][0][0]
        hidden = [h0 for _ in keep]

        def step(i, original, shipped):
            inputs, done = list(hidden), {}  # streams not yet apart (the same tensor) that choose alike are computed once
            for k, layers in enumerate(keep):
                key = (id(inputs[k]), i in layers)
                if key not in done:
                    done[key] = self._original(original, i, inputs[k]) if i in layers else shipped(inputs[k])
                hidden[k] = done[key]

        self._pass(step)
        return [self.kl(h) for h in hidden]

    def per_expert(self, layers: set[int], experts: str) -> list[dict]:
        """For each decoder layer i in `layers` (after per_layer): KL with only expert e of layer i shipped, every
        other expert and layer original, for each expert the rows route tokens to (the others change nothing).
        `experts` is the fused experts module's path inside a decoder layer (mlp.experts). The unified HF
        checkpoint only: the TensorRT-LLM checkpoint's reader has no per-expert module to swap in."""
        if self.base_logp is None:
            raise RuntimeError("sensitivity: per_expert runs after per_layer (it needs the original's log-probabilities)")
        base, streams, found = self.calls[0][0][0], {}, []

        def step(i, original, shipped):
            nonlocal base
            for key in streams:
                streams[key] = self._original(original, i, streams[key])
            if i in layers:
                own, theirs = original.get_submodule(experts), shipped.module.get_submodule(experts)
                for e in range(len(theirs)):
                    hybrid = OneExpertShipped(own, theirs, e)
                    original.set_submodule(experts, hybrid)
                    try:
                        h = self._original(original, i, base)
                    finally:
                        original.set_submodule(experts, own)
                    if hybrid.tokens:
                        streams[(i, e)] = h
                        found.append((i, e, hybrid.tokens))
            base = self._original(original, i, base)

        self._pass(step, shipped_at=set(layers))
        return [{"layer": i, "expert": e, "tokens": t, "kl": self.kl(streams[(i, e)])} for i, e, t in found]

    def _logp(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = logits_of_final(self.original.model, self.ids[j : j + 1], hidden[j : j + 1].to(self.original.dtype))
        return torch.log_softmax(logits[0, : self.lengths[j] - 1], -1)

    def kl(self, hidden: torch.Tensor) -> float:
        """Mean KL(original || this stream) per predicted token, row by row (one row's logits at a time)."""
        total, n = 0.0, 0
        for j, length in enumerate(self.lengths):
            c = self._logp(j, hidden)
            b = self.base_logp[j].to(c.device)
            total += (b.exp() * (b - c)).sum(-1).clamp_min(0).sum().item()
            n += length - 1
        return total / max(n, 1)
