"""A failed gate comes with a way forward: which decoder layers hurt most, and what to exclude.

When a gate fails, a FAILED verdict alone leaves the user guessing. This pass measures how much each
decoder layer contributes to the damage, from the checkpoint that ships: with only layer i's shipped
tensors (the rest original) the KL(original || mixed) is measured on a few evaluation rows
(SENSITIVITY_EVAL_ROWS, spread over the packs). Nothing is calibrated again: the build's calibration is
in the shipped files, read by the gate's reference executors (gate/layer_streams.py says why this and
not ModelOpt's in-memory quantizer state, and how the layers are run: resident or layer-streamed,
each layer loaded once per pass, several small hidden-state streams through it). Layers are ranked
by that KL; the fewest worst layers whose removal brings the estimated gate KL under TARGET_FRACTION x
the gate become the first candidate `quantization.exclude`, and that candidate and a few larger and
smaller ones are then measured for real (those layers original, all others shipped); the smallest
one measured to reach the target is suggested, and when none does the advice says so. It runs only
when a gate failed and `evaluate.sensitivity` is on; its time, peak memory and what it reused are
recorded.

Per-layer KLs add up only approximately (layers interact), which is why the candidates are measured
and why the report states both numbers. Precisions with more bits are named as the other way out.
LayerInputs and the quantizer switches below are the earlier in-memory method (ModelOpt quantizers
turned on one layer at a time), kept for scripts/sensitivity_speed.py and other callers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SENSITIVITY_EVAL_ROWS = 6
# MoE: how many of the worst layers holding experts get their experts measured one by one (one stream per expert
# the rows route tokens to: 128 for Qwen3-30B-A3B).
EXPERT_LAYERS = 1
# Aim below the gate, not at it: the estimate is from few rows and per-layer KLs only roughly add.
TARGET_FRACTION = 0.7


@dataclass
class Sensitivity:
    layers: list[tuple[str, float]]  # (decoder layer, KL with only it shipped quantized), worst first
    full_kl: float  # every decoder layer shipped, on the same rows
    gate_kl: float  # what the gate measured (the worst pack's mean KL)
    estimated_kl: float  # the gate's KL expected with the suggestion applied (scaled from its measurement)
    exclude: list[str]  # suggested additions to quantization.exclude
    kl_with_exclude: float | None  # measured with the suggestion applied
    num_layers: int
    rows: int
    tokens: int
    wall_s: float
    precisions_to_try: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)  # every exclude list measured: layers, kl, estimated_gate_kl
    passes: bool | None = None  # the suggestion's estimated gate KL is within the KL gate (None: nothing suggested)
    path: str = "in_memory"  # in_memory | streamed: how the original's decoder layers were held
    checkpoint: str = ""  # which shipped checkpoint the layers were read from
    reused: dict = field(default_factory=dict)  # what the pass took from the build instead of computing it again
    peak_gpu_mib: float | None = None
    seconds: dict = field(default_factory=dict)
    experts: list[dict] = field(default_factory=list)  # MoE: layer, expert, tokens, kl with only it shipped; worst first

    def record(self) -> dict:
        return {
            "method": f"the shipped checkpoint's decoder layers one at a time, the rest original (no calibration: "
                      f"{self.checkpoint}); KL(original || mixed) on {self.rows} evaluation rows ({self.tokens} tokens)",
            "full_kl": self.full_kl,
            "gate_kl": self.gate_kl,
            "estimated_gate_kl_with_suggested_exclude": self.estimated_kl,
            "layers": [{"layer": n, "kl": k} for n, k in self.layers],
            "suggested_exclude": self.exclude,
            "kl_with_suggested_exclude": self.kl_with_exclude,
            "suggestion_passes_kl_gate": self.passes,
            "exclude_candidates": self.candidates,
            "experts": self.experts,
            "num_layers": self.num_layers,
            "precisions_to_try": self.precisions_to_try,
            "path": self.path,
            "reused": self.reused,
            "peak_gpu_mib": self.peak_gpu_mib,
            "seconds": self.seconds,
            "wall_s": round(self.wall_s, 1),
        }


def layer_prefixes(model) -> list[str]:
    """Names of the decoder layers (model.layers.N), in order."""
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def exclude_pattern(prefix: str) -> str:
    """A quantization.exclude pattern for one decoder layer ('model.layers.3' -> '*layers.3.*')."""
    return "*" + prefix.split(".", 1)[-1] + ".*" if prefix.startswith("model.") else prefix + ".*"


def _set_quantizers(model, enabled) -> None:
    """Switch every ModelOpt TensorQuantizer on or off by `enabled(name)`."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer):
            if enabled(name):
                mod.enable()
            else:
                mod.disable()


def _kl(model, rows: torch.Tensor, lengths: list[int], base_logp: torch.Tensor) -> float:
    with torch.no_grad():
        return _kl_of(model(input_ids=rows, use_cache=False).logits, lengths, base_logp)


class LayerInputs:
    """Every decoder layer's inputs on the sensitivity rows with all quantizers off, as the model
    passes them (hidden states, and the mask and rotary tables, per layer: Qwen2 mixes full and
    sliding-window layers). With only layer i's quantizers on, layers before i compute exactly what
    they compute here, so layer i's KL can start at layer i: the pass runs N(N+1)/2 layer forwards
    instead of N², with the same operations on the same tensors, hence the same KLs."""

    def __init__(self, model, rows: torch.Tensor):
        self.model = model
        self.layers = list(model.get_decoder().layers)
        self.calls: list[tuple[tuple, dict]] = []
        handles = [layer.register_forward_pre_hook(self._keep, with_kwargs=True) for layer in self.layers]
        try:
            with torch.no_grad():
                model(input_ids=rows, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if len(self.calls) != len(self.layers):
            raise RuntimeError(f"sensitivity: captured {len(self.calls)} layer calls for {len(self.layers)} decoder layers")

    def _keep(self, _mod, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def kl_from(self, start: int, lengths: list[int], base_logp: torch.Tensor) -> float:
        """KL of the model run from decoder layer `start`'s captured input (its norm and lm_head as the model applies them)."""
        args, kwargs = self.calls[start]
        hidden = args[0]
        with torch.no_grad():
            for layer, (layer_args, layer_kwargs) in zip(self.layers[start:], self.calls[start:]):
                out = layer(hidden, *layer_args[1:], **layer_kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
            decoder = self.model.get_decoder()
            logits = self.model.get_output_embeddings()(decoder.norm(hidden))
        return _kl_of(logits, lengths, base_logp)


def _kl_of(logits: torch.Tensor, lengths: list[int], base_logp: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    total, n = 0.0, 0
    for j, length in enumerate(lengths):
        b, c = base_logp[j, : length - 1], logp[j, : length - 1]
        total += (b.exp() * (b - c)).sum(-1).clamp_min(0).sum().item()
        n += length - 1
    return total / max(n, 1)


def _spread_rows(tokens, k: int) -> list[int]:
    """k evaluation rows spread over the packs (evenly over the row range)."""
    n = len(tokens.rows)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})


def suggest(layers: list[tuple[str, float]], full_kl: float, max_kl: float, measured_kl: float) -> tuple[list[str], float]:
    """The fewest worst layers whose removal brings the gate's KL under TARGET_FRACTION x max_kl (or, when
    another metric failed with the KL under its gate, halves it); returns them and the estimated KL.

    The per-layer KLs come from a few rows; they are scaled to the gate's own measurement
    (measured_kl / full_kl) and treated as additive, which is an estimate, hence measured afterwards."""
    target = min(TARGET_FRACTION * max_kl, 0.5 * measured_kl)
    scale = measured_kl / full_kl if full_kl > 0 else 0.0
    estimate, chosen = measured_kl, []
    for name, layer_kl in layers:
        if estimate <= target:
            break
        chosen.append(name)
        estimate -= layer_kl * scale
    return chosen, max(estimate, 0.0)


def higher_precisions(precision: str) -> list[str]:
    """What to try when excluding layers is not enough (or too costly): the precisions on higher rungs of
    the accuracy ladder (trtconv.precisions, Precision.ladder_rung), lowest rung first."""
    from trtconv.precisions import PRECISIONS

    rung = PRECISIONS[precision].ladder_rung
    return [p.name for p in sorted(PRECISIONS.values(), key=lambda p: p.ladder_rung) if p.ladder_rung > rung]


def candidate_sizes(first: int, n: int) -> list[int]:
    """How many of the worst layers each measured exclude list keeps original: the estimate's `first`,
    two smaller (the additive estimate can be pessimistic) and three larger up to all n (it can be optimistic)."""
    if first <= 0:
        return []
    smaller = {max(1, round(first * f)) for f in (0.5, 0.75)}
    larger = {min(n, first + math.ceil((n - first) * f)) for f in (1 / 3, 2 / 3, 1.0)}
    return sorted(smaller | {first} | larger)


def choose(candidates: list[dict], target: float, max_kl: float | None) -> tuple[dict | None, bool | None]:
    """The smallest measured candidate whose estimated gate KL reaches the target, else the smallest within
    the KL gate, else the best measured one (which then does not pass: the advice says so)."""
    if not candidates:
        return None, None
    limit = max_kl if max_kl is not None else target
    for bound in (target, limit):
        within = [c for c in candidates if c["estimated_gate_kl"] <= bound]
        if within:
            return min(within, key=lambda c: c["layers"]), True
    return min(candidates, key=lambda c: (c["estimated_gate_kl"], c["layers"])), False


def run(model_dir, checkpoint_dir, recipe, eval_tokens, measured_kl: float, device: str, reporter,
        streamed: bool = False, reused: dict | None = None) -> Sensitivity:
    """The sensitivity pass (see the module docstring) over the shipped checkpoint in `checkpoint_dir`;
    `measured_kl` is the gate's KL (the worst pack's) that the suggestion must bring down; `streamed`
    reads the original's decoder layers one at a time (the memory plan's choice)."""
    from trtconv.stages.evaluate import gpu_matmuls

    with gpu_matmuls(device):  # the shipped layers' float32 products as the gate computes them
        return _run(model_dir, checkpoint_dir, recipe, eval_tokens, measured_kl, device, reporter, streamed, reused)


def _run(model_dir, checkpoint_dir, recipe, eval_tokens, measured_kl: float, device: str, reporter, streamed: bool,
         reused: dict | None) -> Sensitivity:
    from trtconv.checkpoints.hf_model import compute_dtype
    from trtconv.gate.layer_streams import OriginalLayers, Streams, shipped_layers

    t0, cpu0 = time.monotonic(), time.process_time()  # CPU seconds too: on a shared host they do not grow with its load
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    picked = _spread_rows(eval_tokens, SENSITIVITY_EVAL_ROWS)
    ids = torch.tensor([eval_tokens.rows[i] for i in picked], dtype=torch.long, device=device)
    lengths = [eval_tokens.lengths[i] for i in picked]
    original = OriginalLayers(model_dir, compute_dtype(recipe.model.dtype, device), device, streamed, recipe.model.trust_remote_code)
    shipped = shipped_layers(checkpoint_dir, device)
    prefixes = layer_prefixes(original.model)
    n = len(prefixes)
    seconds = {"load": round(time.monotonic() - t0, 2)}
    with reporter.progress("sensitivity: layers (one layer of the checkpoint at a time)", total=n) as advance:
        streams = Streams(original, shipped, ids, lengths, advance)
        kls, full_kl = streams.per_layer()
    seconds["per_layer"] = round(time.monotonic() - t0 - seconds["load"], 2)
    per_layer = sorted(zip(prefixes, kls), key=lambda x: -x[1])
    max_kl = recipe.evaluate.gates.max_kl
    first, estimate = suggest(per_layer, full_kl, max_kl or measured_kl, measured_kl)
    target = min(TARGET_FRACTION * (max_kl or measured_kl), 0.5 * measured_kl)
    sizes = candidate_sizes(len(first), n)
    candidates = []
    if sizes:
        order = [prefixes.index(name) for name, _ in per_layer]
        partial = [k for k in sizes if k < n]  # with every layer original the stream is the original: KL 0, not computed
        with reporter.progress("sensitivity: exclude lists measured", total=n) as advance:
            streams.progress = advance
            measured = streams.with_original([set(order[:k]) for k in partial]) if partial else []
        measured += [0.0] * (len(sizes) - len(partial))
        scale = measured_kl / full_kl if full_kl > 0 else 0.0
        candidates = [{"layers": k, "kl": kl, "estimated_gate_kl": kl * scale} for k, kl in zip(sizes, measured)]
    seconds["exclude_lists"] = round(time.monotonic() - t0 - sum(seconds.values()), 2)
    experts = expert_sensitivity(streams, model_dir, prefixes, per_layer, reporter)
    if experts:
        seconds["experts"] = round(time.monotonic() - t0 - sum(seconds.values()), 2)
    seconds["cpu"] = round(time.process_time() - cpu0, 1)
    chosen, passes = choose(candidates, target, max_kl)
    worst = [name for name, _ in per_layer[: chosen["layers"]]] if chosen else []
    return Sensitivity(
        layers=per_layer, full_kl=full_kl, gate_kl=measured_kl, estimated_kl=chosen["estimated_gate_kl"] if chosen else estimate,
        exclude=[exclude_pattern(p) for p in worst], kl_with_exclude=chosen["kl"] if chosen else None,
        num_layers=n, rows=len(picked), tokens=int(sum(lengths) - len(lengths)), wall_s=time.monotonic() - t0,
        precisions_to_try=higher_precisions(recipe.quantization.precision), candidates=candidates, passes=passes,
        path="streamed" if streamed else "in_memory", checkpoint=Path(checkpoint_dir).name, reused=reused or {},
        peak_gpu_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if device != "cpu" else None, seconds=seconds,
        experts=experts,
    )


def expert_sensitivity(streams, model_dir, prefixes: list[str], per_layer: list[tuple[str, float]], reporter) -> list[dict]:
    """MoE families judged from the unified HF checkpoint: the EXPERT_LAYERS worst layers that hold experts, each of
    their experts shipped alone (gate.layer_streams.Streams.per_expert), worst first, named as the files name them
    (model.layers.N.mlp.experts.E). Nothing for dense families or the TensorRT-LLM checkpoint."""
    from trtconv.architectures import row_for_folder
    from trtconv.checkpoints.hf_executor import is_fused_experts
    from trtconv.gate.layer_streams import ShippedHFLayers

    row = row_for_folder(Path(model_dir))
    if row is None or row.experts is None or not isinstance(streams.shipped, ShippedHFLayers):
        return []
    path = f"{row.experts.module_block}.experts"
    layers = streams.original.model.get_decoder().layers
    worst_first = [prefixes.index(name) for name, _ in per_layer]
    with_experts = [i for i in worst_first if is_fused_experts(_submodule(layers[i], path))]
    chosen = set(with_experts[:EXPERT_LAYERS])
    if not chosen:
        return []
    with reporter.progress("sensitivity: experts of the worst layer, one at a time", total=len(prefixes)) as advance:
        streams.progress = advance
        found = streams.per_expert(chosen, path)
    named = [{**d, "layer": prefixes[d["layer"]], "expert": f"{prefixes[d['layer']]}.{row.experts.file_block}.experts.{d['expert']}"}
             for d in found]
    return sorted(named, key=lambda d: -d["kl"])


def _submodule(layer, path: str):
    """layer.<path>, or None where the layer has none (Qwen3-MoE's dense layers: mlp_only_layers)."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _enabled_quantizers(model) -> set[str]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def advice_lines(record: dict, recipe_exclude: list[str], max_kl: float) -> list[str]:
    """What to try, in words, for the console and report.md."""
    worst = ", ".join(f"{d['layer']} (KL {d['kl']:.3g})" for d in record["layers"][:5])
    lines = [f"most sensitive decoder layers ({record['method']}; full model KL {record['full_kl']:.3g}): {worst}"]
    if record.get("experts"):
        top = record["experts"][:5]
        lines.append(f"most sensitive experts of {top[0]['layer']} (each shipped alone, the rest original; tokens routed to it): "
                     + ", ".join(f"{d['expert'].rsplit('.', 1)[-1]} (KL {d['kl']:.3g}, {d['tokens']} tokens)" for d in top))
    if record["suggested_exclude"]:
        exclude = list(recipe_exclude) + record["suggested_exclude"]
        k, n = len(record["suggested_exclude"]), record["num_layers"]
        measured = (f"measured on the sensitivity rows {record['full_kl']:.3g} -> {record['kl_with_suggested_exclude']:.3g}, "
                    f"so the gate's KL {record['gate_kl']:.3g} -> about {record['estimated_gate_kl_with_suggested_exclude']:.3g} "
                    f"(gate {max_kl:g})")
        if record.get("suggestion_passes_kl_gate") is False:
            lines.append(f"no exclude list measured reaches the KL gate: even quantization.exclude: {exclude}, keeping {k} of {n} "
                         f"decoder layers in 16-bit, is still above it ({measured})")
        else:
            lines.append(f"try quantization.exclude: {exclude} — keeps {k} of {n} decoder layers ({k / max(n, 1):.0%} of their "
                         f"weights) in 16-bit; {measured}")
    if record["num_layers"] and len(record["suggested_exclude"]) > record["num_layers"] // 2:
        lines.append("the damage is spread over most layers, not a few: excluding them gives back most of the "
                     "size saving, so a precision with more bits (or a larger model) is the better way")
    if record["precisions_to_try"]:
        lines.append(f"or a precision with more bits: {', '.join(record['precisions_to_try'])} "
                     "(see docs/accuracy.md for what each costs and measured)")
    reused = record.get("reused") or {}
    reused = f"; no calibration: it read the shipped {reused['checkpoint']}/, {reused['export']}" if reused else ""
    lines.append(f"(this advice took {record['wall_s']:.0f} s{reused}; turn it off with evaluate.sensitivity: false)")
    return lines
