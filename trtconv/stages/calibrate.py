"""Stage 2, calibrate: ModelOpt `mtq.quantize` with the precision's own preset.

We call ModelOpt's API directly (not its `hf_ptq.py` example, which refuses to run without a GPU)
and reuse its logic: the preset from `QUANT_CFG_CHOICES`, the KV-cache entries merged with
`update_quant_cfg_with_kv_cache_quant`, the AWQ block size patched into the weight quantizers.
After calibration a census checks that quantization really happened (no silent no-ops, no zero or
non-finite amax), because a quantizer that never saw data exports garbage scales.

Mixture-of-experts models: the router of every MoE layer is watched during calibration and the
tokens each expert received are counted (the manifest's calibrate record). ModelOpt 0.47 holds a
layer's experts fused (one input quantizer for all of them, one weight quantizer per expert) and
computes every expert's weight amax from the weights themselves, data-free; the input scale is the
layer's, which is also what runtimes use (the largest over the experts). An expert that received no
calibration token is therefore calibrated by that method, and recorded as such; if any of its
quantizers has no usable amax even so, the build stops (exit 2), naming the experts.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trtconv.core import interrupts
from trtconv.core.imports import import_modelopt
from trtconv.core.errors import DataError, UncalibratedExperts, UserError
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS
from trtconv.recipe.schema import QuantizationSection
from trtconv.data.samples import TokenSet
from trtconv.core.ui import quiet_dependency

NAME = "calibrate"
# Cached together with export, as one unit, under export.export_key (see there).
CACHE_KEY_COVERS: tuple[str, ...] = ()


@dataclass
class CalibrationResult:
    quant_config: dict  # what was handed to mtq.quantize, JSON-able
    census: dict  # enabled quantizers by kind, excluded modules
    dependency_output: list[str] = field(default_factory=list)  # what ModelOpt printed/warned
    experts: dict | None = None  # MoE: calibration tokens per expert (ExpertTokens.record); None: no experts


def build_quant_config(section: QuantizationSection) -> dict:
    """The ModelOpt config for the recipe: preset + group size + exclusions + KV cache (later entries win)."""
    mtq = import_modelopt()  # first: see trtconv.core.imports
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES

    precision = PRECISIONS[section.precision]
    cfg = copy.deepcopy(QUANT_CFG_CHOICES[precision.modelopt_preset])
    entries = cfg["quant_cfg"]
    if precision.uses_group_size:
        if section.awq_group_size is None:
            raise ValueError("build_quant_config needs a resolved awq_group_size (see choose_group_size)")
        _set_awq_group_size(entries, section.awq_group_size)
    for pattern in section.exclude:
        entries.append({"quantizer_name": pattern if pattern.endswith("*") else pattern + "*", "enable": False})
    kv = KV_CACHE_FORMATS[section.kv_cache]
    if kv.modelopt_preset is not None:
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, KV_QUANT_CFG_CHOICES[kv.modelopt_preset]["quant_cfg"])
    return cfg


def _set_awq_group_size(entries: list[dict], group: int) -> None:
    for entry in entries:
        if entry.get("quantizer_name") != "*weight_quantizer":
            continue
        cfgs = entry["cfg"] if isinstance(entry.get("cfg"), list) else [entry.get("cfg")]
        for c in cfgs:
            if isinstance(c, dict) and isinstance(c.get("block_sizes"), dict) and c["num_bits"] == 4:
                c["block_sizes"][-1] = group  # ModelOpt keys the block dim by int (-1 = input dim)


# AWQ group sizes trtconv offers, largest first: a larger group stores fewer scales (smaller, faster),
# a smaller one fits more shapes (hidden 576 = 9 x 64 takes 64, not 128) and is a little more accurate.
AWQ_GROUP_SIZES = (128, 64, 32)


@dataclass(frozen=True)
class GroupSizeChoice:
    size: int | None  # None: the precision has no groups
    source: str  # "pinned" (the recipe's), "auto", or "n/a"
    note: str  # what the output says

    def record(self) -> dict:
        return {"awq_group_size": self.size, "awq_group_size_source": self.source}


def _group_input_dims(model, section: QuantizationSection, tp_size: int) -> list[tuple[str, int, bool]]:
    """(name, input dim per rank, split across TP ranks) of every quantized Linear."""
    dims = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or _excluded(name, section.exclude):
            continue
        # Row-parallel layers (o_proj, down_proj) are split along the input dim across TP ranks.
        row_parallel = name.endswith(("o_proj", "down_proj"))
        dims.append((name, mod.in_features // tp_size if row_parallel else mod.in_features, row_parallel and tp_size > 1))
    return dims


def _not_dividing(dims: list[tuple[str, int, bool]], group: int) -> list[str]:
    return [f"{name} (input dim {d}{' per TP rank' if split else ''})" for name, d, split in dims if d % group]


def choose_group_size(model, section: QuantizationSection, tp_size: int) -> GroupSizeChoice:
    """int4 AWQ quantizes weights in groups along the input dim: every quantized Linear must divide evenly.

    A pinned `awq_group_size` that does not divide is refused, naming the layers; unpinned (null),
    the largest of AWQ_GROUP_SIZES that divides every layer is taken, and the output says why.
    """
    if not PRECISIONS[section.precision].uses_group_size:
        return GroupSizeChoice(None, "n/a", "")
    dims = _group_input_dims(model, section, tp_size)
    pinned = section.awq_group_size
    if pinned is not None:
        bad = _not_dividing(dims, pinned)
        if bad:
            fits = [g for g in AWQ_GROUP_SIZES if not _not_dividing(dims, g)]
            raise UserError(
                f"quantization.precision {section.precision} with awq_group_size {pinned}: these layers' input "
                f"dimension is not a multiple of {pinned}: {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; "
                + (f"use awq_group_size {fits[0]} (or null: the largest that fits), " if fits else "")
                + "exclude them (quantization.exclude), or another precision"
            )
        return GroupSizeChoice(pinned, "pinned", f"AWQ group size {pinned} (pinned by the recipe)")
    why = ""
    for group in AWQ_GROUP_SIZES:
        bad = _not_dividing(dims, group)
        if not bad:
            return GroupSizeChoice(group, "auto", f"AWQ group size {group} (auto: the largest of "
                                   f"{', '.join(map(str, AWQ_GROUP_SIZES))} that divides every quantized layer{why})")
        why = f"; {group} does not divide {bad[0]}"
    raise UserError(
        f"quantization.precision {section.precision}: no AWQ group size ({', '.join(map(str, AWQ_GROUP_SIZES))}) divides "
        f"every quantized layer's input dimension ({', '.join(bad[:5])}); exclude those layers (quantization.exclude) "
        "or use another precision"
    )


def _excluded(module_name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(module_name, p.rstrip("*") + "*") or fnmatch.fnmatch(module_name, p) for p in patterns)


# What each of ModelOpt's calibration algorithms does with the forward loop, pass by pass: the
# progress names each pass (AWQ's scale search is one of them and takes minutes on a large model).
CALIBRATION_PASSES: dict[str, tuple[str, ...]] = {
    "max": ("calibration",),
    "smoothquant": ("SmoothQuant statistics",),
    "awq_lite": ("AWQ activation statistics", "AWQ scale search"),
    "awq_clip": ("AWQ clip search",),
    "awq_full": ("AWQ activation statistics", "AWQ scale search", "AWQ clip search"),
}


def calibration_passes(cfg: dict) -> tuple[str, ...]:
    """The pass names of a ModelOpt config's algorithm (its "algorithm" is a name or {"method": name, ...})."""
    algorithm = cfg.get("algorithm") or "max"
    method = algorithm.get("method", "max") if isinstance(algorithm, dict) else str(algorithm)
    return CALIBRATION_PASSES.get(method, ("calibration",))


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def make_forward_loop(tokens: TokenSet, batch_size: int, device: str, progress: Callable, passes: tuple[str, ...] = ("calibration",),
                      announce: Callable[[str], None] = lambda line: None):
    """ModelOpt's forward_loop. Every call (an algorithm runs it once per pass) is one progress bar
    named after its pass, advanced per decoder layer and batch: with one batch a pass still shows
    where it is (`progress(description, total)` is the Reporter's context manager). `announce`
    says when a pass starts (a log's first progress line of a slow pass comes only at 25 %)."""
    rows = torch.tensor(tokens.rows, dtype=torch.long)
    n_batches = math.ceil(len(rows) / batch_size)
    calls = [0]

    def forward_loop(model) -> None:
        calls[0] += 1
        name = passes[calls[0] - 1] if calls[0] <= len(passes) else f"calibration pass {calls[0]}"
        layers = _decoder_layers(model)
        per_batch = max(1, len(layers))
        label = f"calibrate: {name} (pass {calls[0]} of {max(len(passes), calls[0])}), decoder layer x batch"
        announce(f"{label}: starting, {n_batches * per_batch} steps")
        with progress(label, total=n_batches * per_batch) as advance, torch.no_grad():
            hooks = [layer.register_forward_hook(lambda *_: advance(1)) for layer in layers]
            try:
                for start in range(0, len(rows), batch_size):
                    interrupts.point("calibration-batch")  # tests: a Ctrl-C inside ModelOpt's calibration
                    model(input_ids=rows[start : start + batch_size].to(device), use_cache=False)
                    if not layers:
                        advance(1)
            finally:
                for hook in hooks:
                    hook.remove()

    return forward_loop


def _quantizer_kind(name: str) -> str:
    """weight_quantizer, input_quantizer, k_bmm_quantizer, ... of a quantizer's module name. W4A8 weight
    quantizers are sequential ("...weight_quantizer.0"): named by their parent; fused experts' are
    "experts.gate_up_proj_weight_quantizers.3" / "experts.down_proj_input_quantizer": by their kind."""
    part = next((p for p in reversed(name.split(".")) if p.endswith(("quantizer", "quantizers"))), name)
    for kind in ("weight_quantizer", "input_quantizer", "output_quantizer"):
        if kind in part:
            return kind
    return part


def quantizer_census(model) -> dict:
    """Which quantizers are on, and whether their calibrated amax is usable."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    counts: dict[str, int] = {}
    bad: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, TensorQuantizer) or not mod.is_enabled:
            continue
        kind = _quantizer_kind(name)
        counts[kind] = counts.get(kind, 0) + 1
        amax = getattr(mod, "amax", None)
        if amax is not None and not getattr(mod, "_dynamic", False):
            a = amax.detach().float()
            if not torch.isfinite(a).all() or (a <= 0).all():
                bad.append(name)
    return {"enabled": dict(sorted(counts.items())), "invalid_amax": bad}


def recipe_quant_config(section: QuantizationSection, log: list[str]) -> dict:
    """The ModelOpt config for a section that quantizes something (KV-cache-only included)."""
    mtq = import_modelopt()
    with quiet_dependency(log):  # ModelOpt prints the merged config to stdout
        if section.precision == "none":
            # KV-cache-only quantization: everything else off.
            from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES

            cfg: dict[str, Any] = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
            return mtq.update_quant_cfg_with_kv_cache_quant(cfg, KV_QUANT_CFG_CHOICES["fp8"]["quant_cfg"])
        return build_quant_config(section)


def check_census(census: dict, section: QuantizationSection) -> None:
    """No silent no-op, no unusable scale: the checks every calibration path ends with."""
    if section.precision != "none" and not census["enabled"].get("weight_quantizer"):
        raise UserError(
            f"ModelOpt enabled no weight quantizer for precision {section.precision}: "
            "check quantization.exclude (it may exclude every layer)"
        )
    if census["invalid_amax"]:
        raise DataError(
            f"calibration left {len(census['invalid_amax'])} quantizers without a usable scale "
            f"(zero or non-finite amax), e.g. {census['invalid_amax'][:3]}; the calibration data may be too "
            "short or degenerate: raise calibration.num_samples or use other text"
        )


class ExpertTokens:
    """Counts the calibration tokens each expert of each MoE layer receives, from its router's top-k
    indices (transformers 5 routers return (logits, weights, indices); the router stays unquantized)."""

    def __init__(self, model):
        from trtconv.architectures import by_hf_name

        row = by_hf_name((getattr(model.config, "architectures", None) or [None])[0])
        self.moe = row.experts if row is not None else None
        self.counts: dict[str, torch.Tensor] = {}
        self._hooks = []
        if self.moe is None:
            return
        suffix = f".{self.moe.module_block}.{self.moe.router}"
        for name, module in model.named_modules():
            if name.endswith(suffix):
                block = name[: -len(self.moe.router) - 1]
                self.counts[block] = torch.zeros(int(module.num_experts), dtype=torch.long)
                self._hooks.append(module.register_forward_hook(self._counter(block)))

    def _counter(self, block: str):
        def hook(module, args, output) -> None:
            indices = output[2].reshape(-1)
            self.counts[block] += torch.bincount(indices.cpu(), minlength=len(self.counts[block]))
        return hook

    def __enter__(self) -> "ExpertTokens":
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    def without_tokens(self) -> list[str]:
        return [f"{block}.experts.{e}" for block, c in self.counts.items() for e in (c == 0).nonzero().flatten().tolist()]

    def record(self) -> dict | None:
        if self.moe is None:
            return None
        return {"tokens": {block: c.tolist() for block, c in self.counts.items()}, "without_tokens": self.without_tokens(),
                "method_without_tokens": "weight amax from the expert's own weights (data-free), input scale of the layer's experts"}


def check_experts(model, experts: ExpertTokens) -> None:
    """Every expert that received no calibration token has usable weight and input amaxes, or the build stops
    naming it (the method: module docstring)."""
    refuse_uncalibrated(uncalibrated_experts(model, experts), experts.counts)


def uncalibrated_experts(model, experts: ExpertTokens) -> list[str]:
    """The experts without a calibration token whose enabled quantizers have no usable amax."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    bad = []
    for expert in experts.without_tokens():
        fused, _, e = expert.rpartition(".")
        quantizers = [m for n, m in model.get_submodule(fused).named_modules() if isinstance(m, TensorQuantizer)
                      and m.is_enabled and (n.endswith(f"quantizers.{e}") or n.endswith("input_quantizer"))]
        if any(not _usable(q) for q in quantizers):  # none enabled (KV-cache-only): nothing to calibrate
            bad.append(expert)
    return bad


def refuse_uncalibrated(bad: list[str], counts: dict) -> None:
    if bad:
        tokens = {b: c.tolist() for b, c in counts.items()}
        raise UncalibratedExperts(
            f"calibration left {len(bad)} experts without a usable scale (they received no calibration token and "
            f"ModelOpt gave them no amax): {', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}; tokens per expert: "
            f"{tokens}; raise calibration.num_samples or use text that reaches these experts"
        )


def _usable(quantizer) -> bool:
    amax = getattr(quantizer, "amax", None)
    if amax is None:
        return False
    a = amax.detach().float()
    return bool(torch.isfinite(a).all() and (a > 0).any())


def run(model, section: QuantizationSection, tokens: TokenSet, batch_size: int, device: str, reporter) -> CalibrationResult:
    if not section.quantizes:
        return CalibrationResult(quant_config={}, census={"enabled": {}, "invalid_amax": []})
    from trtconv.engine.plan import check_cuda_forward
    from trtconv.precisions import PRECISIONS

    check_cuda_forward(PRECISIONS[section.precision], device)  # the pipeline checked already; direct callers too
    mtq = import_modelopt()
    log: list[str] = []
    cfg = recipe_quant_config(section, log)
    passes = calibration_passes(cfg)
    reporter.stage("calibrate", f"ModelOpt: {len(passes)} pass{'es' if len(passes) > 1 else ''} over the {len(tokens.rows)} "
                   f"sequences: {', then '.join(passes)}")
    with quiet_dependency(log), ExpertTokens(model) as experts:
        mtq.quantize(model, cfg, make_forward_loop(tokens, batch_size, device, reporter.progress, passes, reporter.info))
    census = quantizer_census(model)
    check_census(census, section)
    check_experts(model, experts)
    if experts.without_tokens():
        reporter.warn(f"{len(experts.without_tokens())} experts received no calibration token ({', '.join(experts.without_tokens()[:4])}); "
                      "their weight scales come from their own weights, their input scale is their layer's (manifest: calibrate.experts)")
    return CalibrationResult(quant_config=_jsonable(cfg), census=census, dependency_output=log, experts=experts.record())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)
