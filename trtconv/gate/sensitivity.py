"""A failed gate comes with a way forward: which decoder layers hurt most, and what to exclude.

When a gate fails, a FAILED verdict alone leaves the user guessing. This pass measures, with
ModelOpt itself, how much each decoder layer contributes to the damage: the original model is
calibrated once with the recipe's own quantization config (on the first SENSITIVITY_CALIB_ROWS
calibration rows: the ranking needs scales of the right size, not the build's exact ones), then
every quantizer is switched off except one layer's, and the KL(original || quantized) is measured
on a few evaluation rows (SENSITIVITY_EVAL_ROWS, spread over the packs). Layers are ranked by that
KL; the smallest set of the worst layers whose removal brings the estimated KL under the gate
becomes the suggested `quantization.exclude`, and that suggestion is then measured for real (all
other quantizers on). The cost is one small calibration plus, per layer, a short forward from
that layer on (LayerInputs: about half a forward on average), and it is recorded; it runs only
when a gate failed and `evaluate.sensitivity` is on.

Per-layer KLs add up only approximately (layers interact), which is why the suggestion is measured
and why the report states both numbers. Precisions with more bits are named as the other way out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

SENSITIVITY_CALIB_ROWS = 16
SENSITIVITY_EVAL_ROWS = 6
# Aim below the gate, not at it: the estimate is from few rows and per-layer KLs only roughly add.
TARGET_FRACTION = 0.7


@dataclass
class Sensitivity:
    layers: list[tuple[str, float]]  # (decoder layer, KL with only it quantized), worst first
    full_kl: float  # every quantizer on, on the same rows
    gate_kl: float  # what the gate measured (the worst pack's mean KL)
    estimated_kl: float  # the gate's KL expected with the suggestion applied
    exclude: list[str]  # suggested additions to quantization.exclude
    kl_with_exclude: float | None  # measured with the suggestion applied
    num_layers: int
    rows: int
    tokens: int
    wall_s: float
    precisions_to_try: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {
            "method": f"ModelOpt: calibrate on {SENSITIVITY_CALIB_ROWS} rows, then one decoder layer's quantizers on at a "
                      f"time; KL(original || quantized) on {self.rows} evaluation rows ({self.tokens} tokens)",
            "full_kl": self.full_kl,
            "gate_kl": self.gate_kl,
            "estimated_gate_kl_with_suggested_exclude": self.estimated_kl,
            "layers": [{"layer": n, "kl": k} for n, k in self.layers],
            "suggested_exclude": self.exclude,
            "kl_with_suggested_exclude": self.kl_with_exclude,
            "num_layers": self.num_layers,
            "precisions_to_try": self.precisions_to_try,
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


def run(model_dir, recipe, calib_tokens, eval_tokens, measured_kl: float, device: str, reporter) -> Sensitivity:
    """The sensitivity pass (see the module docstring); `recipe` is the resolved recipe with the build's
    group size, `measured_kl` the gate's KL (the worst pack's) that the suggestion must bring down."""
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.data.samples import TokenSet
    from trtconv.stages import calibrate

    t0 = time.monotonic()
    model = load_hf_model(model_dir, "float32", recipe.model.trust_remote_code, device)
    picked = _spread_rows(eval_tokens, SENSITIVITY_EVAL_ROWS)
    rows = torch.tensor([eval_tokens.rows[i] for i in picked], dtype=torch.long, device=device)
    lengths = [eval_tokens.lengths[i] for i in picked]
    with torch.no_grad():
        base_logp = torch.log_softmax(model(input_ids=rows, use_cache=False).logits.float(), -1)
    small = TokenSet(calib_tokens.rows[:SENSITIVITY_CALIB_ROWS], calib_tokens.lengths[:SENSITIVITY_CALIB_ROWS],
                     calib_tokens.doc_ids, calib_tokens.data_path, calib_tokens.data_sha256, calib_tokens.seed)
    calibrate.run(model, recipe.quantization, small, recipe.calibration.batch_size, device, reporter)
    enabled_at_start = _enabled_quantizers(model)
    full_kl = _kl(model, rows, lengths, base_logp)
    prefixes = layer_prefixes(model)
    _set_quantizers(model, lambda n: False)
    inputs = LayerInputs(model, rows)
    per_layer = []
    with reporter.progress("sensitivity: layers", total=len(prefixes)) as advance:
        for i, prefix in enumerate(prefixes):
            _set_quantizers(model, lambda n, p=prefix: n in enabled_at_start and n.startswith(p + "."))
            per_layer.append((prefix, inputs.kl_from(i, lengths, base_logp)))
            advance(1)
    del inputs
    per_layer.sort(key=lambda x: -x[1])
    chosen, estimate = suggest(per_layer, full_kl, recipe.evaluate.gates.max_kl or measured_kl, measured_kl)
    kl_with = None
    if chosen:
        _set_quantizers(model, lambda n: n in enabled_at_start and not any(n.startswith(p + ".") for p in chosen))
        kl_with = _kl(model, rows, lengths, base_logp)
    return Sensitivity(
        layers=per_layer, full_kl=full_kl, gate_kl=measured_kl, estimated_kl=estimate, exclude=[exclude_pattern(p) for p in chosen], kl_with_exclude=kl_with,
        num_layers=len(prefixes), rows=len(picked), tokens=int(sum(lengths) - len(lengths)),
        wall_s=time.monotonic() - t0, precisions_to_try=higher_precisions(recipe.quantization.precision),
    )


def _enabled_quantizers(model) -> set[str]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def advice_lines(record: dict, recipe_exclude: list[str], max_kl: float) -> list[str]:
    """What to try, in words, for the console and report.md."""
    worst = ", ".join(f"{d['layer']} (KL {d['kl']:.3g})" for d in record["layers"][:5])
    lines = [f"most sensitive decoder layers ({record['method']}; full model KL {record['full_kl']:.3g}): {worst}"]
    if record["suggested_exclude"]:
        exclude = list(recipe_exclude) + record["suggested_exclude"]
        share = len(record["suggested_exclude"]) / max(record["num_layers"], 1)
        measured = record["kl_with_suggested_exclude"]
        lines.append(
            f"try quantization.exclude: {exclude} — keeps {len(record['suggested_exclude'])} of {record['num_layers']} "
            f"decoder layers ({share:.0%} of their weights) in 16-bit; gate KL {record['gate_kl']:.3g} -> about "
            f"{record['estimated_gate_kl_with_suggested_exclude']:.3g} estimated (gate {max_kl:g}); measured on the "
            f"sensitivity rows {record['full_kl']:.3g} -> {measured:.3g}"
        )
    if record["num_layers"] and len(record["suggested_exclude"]) > record["num_layers"] // 2:
        lines.append("the damage is spread over most layers, not a few: excluding them gives back most of the "
                     "size saving, so a precision with more bits (or a larger model) is the better way")
    if record["precisions_to_try"]:
        lines.append(f"or a precision with more bits: {', '.join(record['precisions_to_try'])} "
                     "(see docs/accuracy.md for what each costs and measured)")
    lines.append(f"(this advice took {record['wall_s']:.0f} s; turn it off with evaluate.sensitivity: false)")
    return lines
