"""`quantization.precision: auto`: the per-GEMM (or per-layer) mix of formats with the fewest weight bits that passes the gates.

Why this shape:
- A unit takes one format. `search.granularity: gemm` (the default): one GEMM the runtime
  runs fused (architectures.fused_groups: q/k/v, gate/up; o_proj and down_proj alone; Phi-3 ships q/k/v
  and gate/up fused already; linears reading one input, architectures.shared_input_groups), or a mixture-of-experts block
  as a whole (its router, experts and shared expert read one input; ModelOpt's export unifies the input
  scales of linears that share an input, so they must share a format). A unit's linears share an
  activation quantizer and, in FP8, one weight scale, so they can only share a format. The attention's
  KV-cache quantizers go with the unit of its key projection (the keys and values come out of it). lm_head and
  embeddings stay as the recipe says. `layer`: a decoder layer, the unit `quantization.exclude` and the
  failed-gate advice speak (`model.layers.N.*`), a quarter of the sensitivity forwards. Why gemm is the default
  (docs/accuracy.md, SmolLM2-135M, int4_awq / fp8 / none, fp8's gates): per GEMM the search shipped 13.91 bits
  whose every pack's KL was lower than the per-layer mix's at 13.87 bits (a layer whose down_proj alone is
  sensitive costs all of its linears' bits), in 19 min on a 2-core CPU; on all 96 gate documents its KL upper
  bound, 0.0055, was below mtq.auto_quantize's at the same bits, 0.0060.
- Every candidate format is calibrated once, with real ModelOpt, on its own copy of the model
  (stages.calibrate.run with that format's config, group size chosen as for any build). A mixed
  model is then assembled from those copies' units: unit u taken from the model calibrated at format f
  carries f's quantizers with their calibrated state (amax, AWQ and SmoothQuant's pre_quant_scale and
  the weights they rescaled, all held by the linear itself), so ModelOpt's own export_hf_checkpoint
  writes it, and writes `quant_algo: MIXED_PRECISION` with `quantized_layers` when units differ
  (export/quant_utils.process_layer_quant_config). This is what mtq.auto_quantize does as well (each
  format calibrated with every layer at that format, then one chosen per group); its scales of a unit came
  from inputs of a model quantized throughout at that format, a small mismatch the measured trials absorb.
  `none` is a candidate like the others (a copy converted with every weight/activation quantizer off,
  the KV-cache quantizers as the recipe says). A linear no candidate quantizes (a router, a
  quantization.exclude match) is no unit: it stays 16-bit and counts so in the bits.
- Per-unit sensitivity per format: KL(original || only that unit at that format), with
  gate.sensitivity's helpers (LayerInputs: the run starts at the unit's layer; the same numbers as a whole
  forward), on SENSITIVITY_EVAL_ROWS calibration rows. Four units a dense layer: four times the per-layer
  pass's forwards, each from the unit's layer on.
- Threshold path: a threshold on the per-unit estimate falls from above every estimate to below the last;
  at each value every unit takes the cheapest format whose estimated KL is under it (the lowest-KL one when
  none is). No unit's own loss may pass the threshold, whatever its size: the minimax rule of ModelOpt's
  kl_div auto_quantize. It replaced a greedy path (the move removing the most estimated KL per added bit),
  which put the big gate/up GEMMs in fp8 because their KL per bit was lowest; their KL on one unseen document
  then compounded past the gate (docs/accuracy.md). Each step of the path is a mix with more bits than the
  one before; the search finds where along it the gates start to pass, with measured
  trials: the mixed fake-quant model against the original, with the gate's own statistics and rule
  (gate.stats, per pack), gates tightened by SEARCH_MARGIN, on evaluation-pack documents the gate does not
  use (VALIDATION_ROWS; the search must not tune on the documents that judge it, so it sees other documents
  of the same text and keeps a margin).
  - Trial 1 is the cheapest mix. It also scales the estimate: per-unit KLs summed, times measured over
    summed.
  - Until a trial passes, the next is the first step whose estimate is under a target: TARGET_FRACTION x
    max_kl, then halved after each failure.
  - Once one passes, the rest bisect between the last failing step and the cheapest passing one. Stopping
    at the first pass shipped SmolLM2-135M at 14.7 bits, where the estimate (scaled from the all-int4 mix)
    had overshot.
  - The search ends when the two are neighbours, or when search.max_trials or search.time_budget_s runs out.
    The cheapest passing trial is exported.
  The shipped files are then judged by the same gate as any build; when no trial passed, the closest one
  is exported, judged and marked failed (exit 1).
- Memory: the original plus one copy of the weights per candidate whose calibration rewrites them (AWQ,
  SmoothQuant: precisions.Precision.rewrites_weights); fp8 and 16-bit copies share the original's parameters,
  guarded (SharedWeights). An 8B in bf16 with int4_awq, fp8 and none is about 32 GB of weights on the GPU
  (scripts/bench_auto.py measures it).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from trtconv.precisions import PRECISIONS
from trtconv.recipe.schema import GRANULARITIES

NAME = "search"
SENSITIVITY_EVAL_ROWS = 8
# Each trial is measured on VALIDATION_ROWS evaluation-pack documents the gate does not use (samples.validation_rows:
# the same text as the gate's, other documents), judged per pack as the gate judges: enough documents for the
# bootstrap intervals, few enough that a trial costs a forward of a few batches. Measured on 16 calibration rows
# instead, SmolLM2-135M's chosen mix read KL 0.0064 there and 0.011 on the gate's "eval" pack (it failed). 96 (the
# gate's count) did not catch the one document that failed the per-GEMM mixes (module docstring) and doubled the
# trials' time, so 48 stays. Where the packs hold no documents beyond the gate's, MEASURE_ROWS calibration rows.
VALIDATION_ROWS = 48
MEASURE_ROWS = 16
# The search judges its trials with gates this much tighter (max gates x, min gates 1 - (1 - t) x).
SEARCH_MARGIN = 0.8
TARGET_FRACTION = 0.7  # the first trial aims its estimated KL at this fraction of max_kl
EXPORT_DTYPE_BITS = 16


def format_bits(precision: str) -> float:
    """Stored bits per weight of a format, scales included (precisions.Precision.linear_weight_bytes)."""
    b = PRECISIONS[precision].linear_weight_bytes
    return EXPORT_DTYPE_BITS if b is None else 8 * b


@dataclass
class Trial:
    index: int
    formats: dict[str, str]  # unit (Unit.name) -> precision
    effective_bits: float
    estimated_kl: float
    metrics: dict  # gate.stats summary (mean_kl, top1_agreement, ... with intervals)
    gates: list  # GateResult, the search's (margined) gates
    verdict: str  # pass | fail
    wall_s: float

    def record(self) -> dict:
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        pick = lambda m: {k: self.metrics[m][k] for k in ("value", "ci_low", "ci_high")}  # noqa: E731
        return {"trial": self.index, "effective_bits": round(self.effective_bits, 4), "estimated_kl": self.estimated_kl if math.isfinite(self.estimated_kl) else None,
                "units_per_format": dict(sorted(counts.items())), "formats": self.formats,
                "mean_kl": pick("mean_kl"), "top1_agreement": pick("top1_agreement"),
                "gates": [g.model_dump(mode="json") for g in self.gates], "verdict": self.verdict, "wall_s": round(self.wall_s, 1)}


@dataclass
class SearchResult:
    model: object  # the chosen mix, calibrated, ready for export
    chosen: Trial
    passed: bool
    trials: list[Trial]
    sensitivity: dict[str, dict[str, float]]  # format -> unit -> KL
    candidates: list[str]
    group_size: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""
    measured_on: str = ""  # which rows the trials were measured on (validation_for)
    granularity: str = "gemm"

    def record(self) -> dict:
        closest = "" if self.passed else f"no trial passed; closest: trial {self.chosen.index} ({self.chosen.effective_bits:.2f} bits)"
        return {"candidates": self.candidates, "method": __doc__.split("\n")[0], "granularity": GRANULARITIES[self.granularity], "margin": SEARCH_MARGIN,
                "measured_on": self.measured_on, "chosen_trial": self.chosen.index, "passed": self.passed, "stop_reason": self.stop_reason or closest,
                "effective_bits": round(self.chosen.effective_bits, 4), "awq_group_size": self.group_size,
                "trials": [t.record() for t in self.trials], "sensitivity": self.sensitivity,
                "seconds": {k: round(v, 1) for k, v in self.seconds.items()}}


def candidates_of(section) -> list[str]:
    """The recipe's candidate formats, cheapest first (resolved recipes always name them)."""
    names = section.search.candidates if section.search and section.search.candidates else default_candidates()
    return sorted(dict.fromkeys(names), key=lambda p: (format_bits(p), -PRECISIONS[p].ladder_rung))


def default_candidates(model=None) -> list[str]:
    """Every precision a build can calibrate on any host (not CUDA-only), 16-bit `none` included. For a family
    whose row converts only some (a mixture of experts: architectures.Experts.precisions), only those: a MoE model
    with `precision: auto` and no candidates named searches over what its family converts instead of being refused
    for a default it never asked for. `model` is the recipe's model section; its row comes from its config.json
    (a Hub model's fetched at its pinned revision, as plan and build fetch it: the answer must not depend on what
    a cache happens to hold; a reference model is trained by nobody here, it is a dense Llama)."""
    row = _row_of(model) if model is not None else None
    allowed = row.experts.precisions if row is not None and row.experts is not None else None
    return [p.name for p in PRECISIONS.values() if not p.needs_cuda and (allowed is None or p.name in allowed)]


def _row_of(model):
    """The architectures row of a model section, from the config.json plan and build read
    (memory_plan.model_config: a local folder's, or a Hub model's fetched at its revision; offline from the cache);
    None where there is none to read (then nothing can be built either: the load stage says why) or the section is
    a reference model (a dense Llama, not trained here to be looked at)."""
    from trtconv.architectures import row_for_config
    from trtconv.core.errors import UserError
    from trtconv.memory_plan import model_config

    if model.reference is not None:
        return None
    try:
        return row_for_config(model_config(model)[0])
    except UserError:
        return None


def _section_for(section, precision: str, group_size: int | None):
    return section.model_copy(update={"precision": precision, "search": None,
                                      "awq_group_size": group_size if PRECISIONS[precision].uses_group_size else None})


class SharedWeights:
    """The original's parameters, as they were before any candidate copy shared them. A copy whose format does not
    rewrite weights (precisions.Precision.rewrites_weights False: fp8, none) holds the original's parameters
    themselves, not copies: an 8B model's five default candidates then need the original + 3 copies, not + 5. A
    copy that changed one in place (its version counter) or swapped its storage (`.data =`) would change the
    original every trial is measured against: check() refuses to go on."""

    def __init__(self, model):
        self.seen = {n: (t, t.data_ptr(), t._version, _fingerprint(t)) for n, t in model.named_parameters()}

    def memo(self) -> dict:
        return {id(t): t for t, *_ in self.seen.values()}

    def check(self, after: str) -> None:
        """Storage, version counter and values (ModelOpt rewrites weights through `.data.mul_` / `.data.copy_`, which
        move no version counter of the parameter's own)."""
        changed = [n for n, (t, ptr, version, values) in self.seen.items()
                   if t.data_ptr() != ptr or t._version != version or not torch.equal(_fingerprint(t), values)]
        if changed:
            raise RuntimeError(f"precision auto: {after} changed the original model's {', '.join(changed[:3])} "
                               f"({len(changed)} parameters), which candidate copies share; its format must set "
                               "rewrites_weights in trtconv/precisions.py")


def _fingerprint(t: torch.Tensor, block: int = 1 << 24) -> torch.Tensor:
    """Sum and sum of squares of a tensor's values in float64, a block at a time (no float64 copy of a whole
    vocabulary matrix), on its own device."""
    flat, out = t.detach().reshape(-1), torch.zeros(2, dtype=torch.float64, device=t.device)
    for i in range(0, flat.numel(), block):
        b = flat[i:i + block].double()
        out += torch.stack([b.sum(), (b * b).sum()])
    return out


def calibrate_candidates(model, recipe, candidates: list[str], calib_tokens, device: str, reporter) -> tuple[dict, int | None]:
    """One calibrated copy of the model per candidate format (the original is left untouched; formats that do not
    rewrite weights share its parameters, SharedWeights)."""
    from trtconv.stages import calibrate

    models, group = {}, None
    shared = SharedWeights(model)
    for precision in candidates:
        m = copy.deepcopy(model, memo=None if PRECISIONS[precision].rewrites_weights else shared.memo())
        section = _section_for(recipe.quantization, precision, recipe.quantization.awq_group_size)  # a pinned size holds
        if PRECISIONS[precision].uses_group_size:
            choice = calibrate.choose_group_size(m, section, recipe.export.tp_size)
            group = choice.size
            section = _section_for(recipe.quantization, precision, group)
        reporter.stage(NAME, f"calibrating the candidate {precision}")
        if section.quantizes:
            calibrate.run(m, section, calib_tokens, recipe.calibration.batch_size, device, reporter)
        else:
            _convert_unquantized(m, calib_tokens, device)
        shared.check(f"calibrating the candidate {precision}")
        models[precision] = m
    return models, group


def _convert_unquantized(model, calib_tokens, device: str) -> None:
    """`none` without a KV-cache format: ModelOpt's wrappers with every quantizer off, so its layers sit in a mix."""
    from trtconv.core.imports import import_modelopt
    from trtconv.core.ui import quiet_dependency

    mtq = import_modelopt()
    rows = torch.tensor(calib_tokens.rows[:1], dtype=torch.long, device=device)
    with quiet_dependency([]), torch.no_grad():
        mtq.quantize(model, {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"},
                     lambda m: m(input_ids=rows, use_cache=False))


def layer_weights(model, prefixes: list[str]) -> dict[str, int]:
    """Weight elements of each decoder layer's matrices (what the formats store): every module's 2-D weight, and a
    mixture-of-experts layer's fused experts (transformers 5: gate_up_proj and down_proj, 3-D, no `weight`; left
    out, a Qwen3-MoE layer counted its attention alone and its bits were a few percent of the truth)."""
    from trtconv.checkpoints.hf_executor import is_fused_experts

    counts = {p: 0 for p in prefixes}
    for name, mod in model.named_modules():
        weights = [mod.gate_up_proj, mod.down_proj] if is_fused_experts(mod) else [getattr(mod, "weight", None)]
        size = sum(w.numel() for w in weights if isinstance(w, torch.Tensor) and w.dim() >= 2)
        for p in prefixes:
            if size and name.startswith(p + "."):
                counts[p] += size
    return counts


@dataclass(frozen=True)
class Unit:
    """What the search gives one format: linears one fused GEMM runs, or a mixture-of-experts block."""

    name: str  # "model.layers.3.self_attn.q_proj+k_proj+v_proj", "model.layers.3.mlp" (a MoE block)
    layer: int  # its decoder layer's index (the sensitivity pass starts there)
    modules: tuple[str, ...]  # module paths moved together from a format's copy
    quantizers: tuple[str, ...] = ()  # quantizers outside those modules that go with them (the KV cache's)
    weights: int = 0  # weight elements the format stores

    @property
    def paths(self) -> tuple[str, ...]:
        return self.modules + self.quantizers


def search_units(models: dict, row, granularity: str) -> tuple[list[Unit], int]:
    """The units of the candidates' calibrated copies at `granularity` (module docstring), and the weight elements of
    decoder-layer matrices no unit holds (no candidate quantizes them: a router, an excluded linear; 16-bit)."""
    from trtconv.gate import sensitivity as s

    some = next(iter(models.values()))
    enabled = set().union(*(s._enabled_quantizers(m) for m in models.values()))
    prefixes = s.layer_prefixes(some)
    units: list[Unit] = []
    for i, prefix in enumerate(prefixes):
        layer = some.get_submodule(prefix)
        if granularity == "gemm":
            units += _layer_units(layer, prefix, i, enabled, row)
        elif weights := _block_weights(layer, prefix, enabled):
            units.append(Unit(prefix, i, (prefix,), (), weights))
    total = sum(layer_weights(some, prefixes).values())
    return units, total - sum(u.weights for u in units)


def _layer_units(layer, prefix: str, index: int, enabled: set[str], row) -> list[Unit]:
    """One decoder layer's units, in module order (q/k/v, o, gate/up, down)."""
    from trtconv.architectures import Architecture
    from trtconv.checkpoints.hf_executor import is_fused_experts

    groups = _input_groups(row or Architecture("", "", ""))
    block = row.experts.module_block if row is not None and row.experts is not None else None
    found: dict[tuple, list[tuple[str, int]]] = {}  # (parent, group) -> [(path, weights)]
    taken: list[str] = []
    for name, mod in layer.named_modules():
        path = f"{prefix}.{name}" if name else prefix
        if any(path.startswith(t + ".") for t in taken) or not any(q.startswith(path + ".") for q in enabled):
            continue
        if (name == block and hasattr(mod, "experts")) or is_fused_experts(getattr(mod, "experts", None)):
            found[(path, ())] = [(path, _block_weights(mod, path, enabled))]
            taken.append(path)
        elif hasattr(mod, "weight_quantizer") and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
            parent, leaf = path.rsplit(".", 1)
            group = next((g for g in groups if leaf in g), (leaf,))
            found.setdefault((parent, group), []).append((path, mod.weight.numel()))
            taken.append(path)
    units = [Unit(f"{parent}.{'+'.join(p.rsplit('.', 1)[1] for p, _ in members)}" if group else parent, index,
                  tuple(p for p, _ in members), (), sum(w for _, w in members)) for (parent, group), members in found.items()]
    return _with_leftover_quantizers(units, prefix, enabled)


def _input_groups(row) -> list[tuple[str, ...]]:
    """The row's fused GEMMs and linears sharing an input, merged where they overlap (DeepSeek-V3's kv_a_proj_with_mqa
    is fused with q_a_proj, and shares its input with q_proj when there is no q_a_proj): one format each."""
    merged: list[set[str]] = []
    for group in row.fused_groups + row.shared_input_groups:
        joined = set(group).union(*(m for m in merged if m & set(group)))
        merged = [m for m in merged if not m & set(group)] + [joined]
    return [tuple(sorted(m)) for m in merged]


def _block_weights(block, path: str, enabled: set[str]) -> int:
    """A MoE block's stored weights: its fused experts, and each linear a candidate quantizes (not the router)."""
    from trtconv.checkpoints.hf_executor import is_fused_experts

    count = 0
    for name, mod in block.named_modules():
        sub = f"{path}.{name}" if name else path
        if is_fused_experts(mod):
            count += mod.gate_up_proj.numel() + mod.down_proj.numel()
        elif getattr(mod, "weight", None) is not None and mod.weight.dim() == 2 and any(q.startswith(sub + ".") for q in enabled):
            count += mod.weight.numel()
    return count


def _with_leftover_quantizers(units: list[Unit], prefix: str, enabled: set[str]) -> list[Unit]:
    """Quantizers of the layer outside every unit (the attention's k/v cache quantizers) join a unit with a module
    under their nearest parent, the one holding the key projection first (k_proj, Phi-3's qkv_proj: the keys and
    values come out of it; registration order puts Phi-3's o_proj first), else the layer's first unit."""
    def nearness(q: str, u: Unit) -> tuple[int, bool]:  # the deepest parent of u's modules that holds q (-1: none)
        depth = max((len(m) - len(m.rsplit(".", 1)[1]) for m in u.modules if q.startswith(m.rsplit(".", 1)[0] + ".")), default=-1)
        return depth, any("k" in m.rsplit(".", 1)[1] for m in u.modules)

    extra: dict[int, list[str]] = {}
    for q in sorted(n for n in enabled if n.startswith(prefix + ".")):
        if units and not any(q.startswith(m + ".") for u in units for m in u.modules):
            near = [nearness(q, u) for u in units]
            extra.setdefault(near.index(max(near)), []).append(q)
    return [Unit(u.name, u.layer, u.modules, tuple(extra.get(k, ())), u.weights) for k, u in enumerate(units)]


def unit_sensitivity(model, units: list[Unit], rows, lengths, base_logp) -> dict[str, float]:
    """KL with only one unit's quantizers on, per unit (gate.sensitivity's LayerInputs: from the unit's layer on)."""
    from trtconv.gate import sensitivity as s

    enabled = s._enabled_quantizers(model)
    s._set_quantizers(model, lambda n: False)
    try:
        inputs = s.LayerInputs(model, rows)
        out = {}
        for u in units:
            s._set_quantizers(model, lambda n, u=u: n in enabled and any(n == p or n.startswith(p + ".") for p in u.paths))
            out[u.name] = inputs.kl_from(u.layer, lengths, base_logp)
        return out
    finally:
        s._set_quantizers(model, lambda n: n in enabled)


def effective_bits(formats: dict[str, str], weights: dict[str, int], fixed: int = 0) -> float:
    """Stored bits per decoder-layer weight: each unit at its format, `fixed` weights (no unit's) at 16 bits."""
    total = sum(weights.values()) + fixed
    return (sum(format_bits(f) * weights[p] for p, f in formats.items()) + EXPORT_DTYPE_BITS * fixed) / max(total, 1)


def threshold_path(sens: dict[str, dict[str, float]], candidates: list[str], names: list[str]) -> list[dict[str, str]]:
    """Every mix a falling threshold visits (module docstring): at each threshold every unit takes the cheapest
    candidate whose estimated KL is under it, the lowest-KL one (the cheapest of equals) when none is. The
    threshold starts above every estimate (every unit at the first candidate) and steps down through them, so
    each step moves at least one unit to a format with more bits and less estimated KL. Of candidates with equal
    weight bits (w4a8_awq, int4_awq) only the first listed takes part, as on the greedy path before: no mix of
    the two is exported. A non-finite estimate (a NaN from a broken forward) counts as infinite: never chosen
    while another format is under the threshold."""
    formats = _one_per_bits(candidates)
    est = estimates(sens, formats, names)
    scores = sorted({v for f in formats for v in est[f].values() if v != math.inf}, reverse=True)
    path: list[dict[str, str]] = []
    for t in [math.inf, *scores]:
        mix = {n: _cheapest_under(est, formats, n, t) for n in names}
        if not path or mix != path[-1]:
            path.append(mix)
    return path


def estimates(sens: dict[str, dict[str, float]], formats: list[str], names: list[str]) -> dict[str, dict[str, float]]:
    """The per-unit estimates the path and its KL sums read: a NaN or infinite one as math.inf."""
    return {f: {n: sens[f][n] if math.isfinite(sens[f][n]) else math.inf for n in names} for f in formats}


def _one_per_bits(candidates: list[str]) -> list[str]:
    seen: set[float] = set()
    kept = []
    for f in candidates:
        if format_bits(f) not in seen:
            seen.add(format_bits(f))
            kept.append(f)
    return kept


def _cheapest_under(est, formats: list[str], name: str, threshold: float) -> str:
    under = [f for f in formats if est[f][name] < threshold]
    if not under:
        return min(formats, key=lambda f: (est[f][name], format_bits(f)))
    return min(under, key=format_bits)


def next_step(path_kl: list[float], scale: float, target: float, failed: int, passed: int | None) -> int:
    """The next step of the path to measure: bisect once one passed; before, the first step past the last
    failure whose estimate is under the target (the last step when none is)."""
    if passed is not None:
        return (failed + passed) // 2
    return next((k for k in range(failed + 1, len(path_kl)) if scale * path_kl[k] <= target), len(path_kl) - 1)


def sources_of(models: dict, units: list[Unit]) -> dict[str, dict[str, torch.nn.Module]]:
    """format -> every unit's modules and quantizers in that format's copy (taken before any is moved)."""
    return {f: {p: m.get_submodule(p) for u in units for p in u.paths} for f, m in models.items()}


def assemble(skeleton, sources: dict[str, dict], formats: dict[str, str], units: list[Unit]):
    """The skeleton (the cheapest candidate's model) with each unit's modules taken from its format's copy."""
    for u in units:
        for p in u.paths:
            skeleton.set_submodule(p, sources[formats[u.name]][p])
    return skeleton


def _margined(evaluate):
    """The document gates (gate.gates table) tightened by SEARCH_MARGIN: an upper bound scaled down, a lower
    bound on a fraction (top-1 agreement) moved towards 1 by the same share of what it allows to be lost."""
    from trtconv.gate.gates import gates_from

    gates = evaluate.gates.model_copy()
    for gate in gates_from("documents"):
        t = getattr(gates, gate.key, None)
        if t is not None:
            setattr(gates, gate.key, t * SEARCH_MARGIN if gate.comparator == "<=" else 1 - (1 - t) * SEARCH_MARGIN)
    return evaluate.model_copy(update={"gates": gates})


class Baseline:
    """The original's logits on the trial rows, every trial: its last decoder layer's output is kept from the first
    trial (rows x tokens x hidden: for SmolLM2's 48 rows of 256 tokens, 28 MB in float32), and later trials
    run only its tail (final norm, lm_head, soft-capping: hf_model.head_logits, the same operations, the
    same numbers) instead of the whole model again: a trial costs the mix's forward and the heads."""

    def __init__(self, model):
        self.model, self.kept = model, {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from trtconv.checkpoints.hf_model import head_logits

        key = (tuple(ids.shape), ids.cpu().numpy().tobytes())
        if key in self.kept:
            return head_logits(self.model, self.kept[key])
        seen = []
        handle = self.model.get_decoder().layers[-1].register_forward_hook(
            lambda mod, args, out: seen.append(out[0] if isinstance(out, (tuple, list)) else out))
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        self.kept[key] = seen[-1]
        return logits


def measure(original, mixed, tokens, recipe, device: str, reporter) -> tuple[dict, list, bool]:
    """The gate's statistics and rule (gate.stats), per pack where the rows say which pack is whose, mixed
    fake-quant model against the original (a Baseline, or the model itself)."""
    from trtconv.gate import stats

    section = _margined(recipe.evaluate)
    size = recipe.evaluate.batch_size
    base = original if isinstance(original, Baseline) else (lambda ids: original(input_ids=ids, use_cache=False).logits)
    with reporter.progress("search: measuring a trial", total=-(-len(tokens.rows) // size)) as advance:
        doc = stats.per_document_stats(tokens, base, lambda ids: mixed(input_ids=ids, use_cache=False).logits, size, device, advance)
    summary = stats.summarize(doc, recipe.evaluate.seed, packs=tokens.extra.get("packs"))
    gates = stats.apply_gates(summary, section)
    return summary, gates, stats.gates_passed(gates, recipe.evaluate.allow_inconclusive)


def _subset(tokens, picked: list[int]):
    from trtconv.data.samples import TokenSet

    return TokenSet([tokens.rows[i] for i in picked], [tokens.lengths[i] for i in picked], tokens.doc_ids, tokens.data_path,
                    tokens.data_sha256, tokens.seed)


def validation_for(recipe, tokenizer, calib_tokens=None) -> tuple[object | None, str]:
    """The rows trials are measured on (VALIDATION_ROWS), or None and why not (then calibration rows)."""
    from trtconv.core.errors import DataError
    from trtconv.data import samples
    from trtconv.stages.load import data_packs

    ev = recipe.evaluate
    try:
        rows = samples.validation_rows(data_packs(ev.data, "evaluation"), tokenizer, VALIDATION_ROWS, ev.seq_len, ev.seed, ev.num_samples)
        if calib_tokens is not None:
            samples.check_disjoint(calib_tokens, rows)  # the same file for both: they would be calibration text
    except DataError as exc:
        return None, f"{MEASURE_ROWS} calibration rows: no evaluation-pack documents beyond the gate's to use ({exc})"
    return rows, (f"{VALIDATION_ROWS} evaluation-pack documents the gate does not use (after its {ev.num_samples} in the "
                  f"same seeded order), judged per pack")


def validation_key(recipe) -> dict:
    """What the validation rows depend on beyond the evaluation packs' bytes (export.export_key holds it for auto)."""
    ev = recipe.evaluate
    return {"rows": VALIDATION_ROWS, "after": ev.num_samples, "seq_len": ev.seq_len, "seed": ev.seed, "batch_size": ev.batch_size}


def run(model, recipe, calib_tokens, device: str, reporter, validation=None, measured_on: str = "", arch: str | None = None) -> SearchResult:
    """The search (module docstring); `model` is the original, loaded, of the architectures row named `arch`;
    returns the chosen mix. Trials are measured on `validation` (validation_for), else on calibration rows."""
    from trtconv.architectures import by_hf_name
    from trtconv.gate import sensitivity as s

    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    search = recipe.quantization.search
    candidates = candidates_of(recipe.quantization)
    model.eval()
    picked = s._spread_rows(calib_tokens, SENSITIVITY_EVAL_ROWS)
    rows = torch.tensor([calib_tokens.rows[i] for i in picked], dtype=torch.long, device=device)
    lengths = [calib_tokens.lengths[i] for i in picked]
    with torch.no_grad():
        base_logp = torch.log_softmax(model(input_ids=rows, use_cache=False).logits.float(), -1)
    models, group = calibrate_candidates(model, recipe, candidates, calib_tokens, device, reporter)
    seconds["calibrate_candidates"] = time.monotonic() - t0
    units, fixed = search_units(models, by_hf_name(arch), search.granularity)
    sens = {}
    with reporter.progress(f"search: sensitivity of {len(units)} units, per format", total=len(candidates)) as advance:
        for f in candidates:
            sens[f] = unit_sensitivity(models[f], units, rows, lengths, base_logp) if PRECISIONS[f].modelopt_preset else {u.name: 0.0 for u in units}
            advance(1)
    seconds["sensitivity"] = time.monotonic() - t0 - seconds["calibrate_candidates"]
    measured = validation if validation is not None else _subset(calib_tokens, s._spread_rows(calib_tokens, MEASURE_ROWS))
    weights = {u.name: u.weights for u in units}
    cheapest = candidates[0]
    skeleton = models[cheapest]
    sources = sources_of(models, units)
    names = [u.name for u in units]
    path = threshold_path(sens, candidates, names)
    est = estimates(sens, candidates, names)
    path_kl = [sum(est[f][p] for p, f in mix.items()) for mix in path]
    max_kl = recipe.evaluate.gates.max_kl or 0.01
    target, scale = TARGET_FRACTION * max_kl, 1.0
    baseline = Baseline(model)
    failed, passed, step = 0, None, 0  # the last failing and the cheapest passing step measured; the next one
    trials: list[Trial] = []
    stop = ""
    for index in range(1, search.max_trials + 1):
        t = time.monotonic()
        formats = path[step]
        mixed = assemble(skeleton, sources, formats, units)
        summary, gates, ok = measure(baseline, mixed, measured, recipe, device, reporter)
        kl = summary["mean_kl"]["value"]
        if index == 1:  # the cheapest mix calibrates the estimate's scale
            scale = kl / path_kl[0] if 0 < path_kl[0] < math.inf else 1.0
        trial = Trial(index, dict(formats), effective_bits(formats, weights, fixed), scale * path_kl[step], summary, gates,
                      "pass" if ok else "fail", time.monotonic() - t)
        trials.append(trial)
        reporter.stage(NAME, f"trial {index}: {trial.effective_bits:.2f} bits (step {step} of {len(path) - 1}), KL {kl:.4g} "
                       f"[{summary['mean_kl']['ci_low']:.4g}, {summary['mean_kl']['ci_high']:.4g}], top-1 "
                       f"{summary['top1_agreement']['value']:.3f}: {trial.verdict}")
        if ok:
            passed = step
        else:
            failed = step
            target = min(target, scale * path_kl[step]) * 0.5
        if passed == 0 or (passed is not None and passed - failed <= 1):
            break  # the cheapest passing step along the path is found
        if passed is None and step == len(path) - 1:
            stop = "the path's most accurate mix failed too"
            break
        if time.monotonic() - t0 > search.time_budget_s:
            stop = f"search.time_budget_s {search.time_budget_s:g} s spent"
            break
        step = next_step(path_kl, scale, target, failed, passed)
    else:
        stop = f"search.max_trials {search.max_trials} tried"
    passing = [t for t in trials if t.verdict == "pass"]
    chosen = min(passing, key=lambda t: t.effective_bits) if passing else min(trials, key=lambda t: t.metrics["mean_kl"]["ci_high"] or 0)
    mixed = assemble(skeleton, sources, chosen.formats, units)
    del sources, models, baseline  # the mix holds the units it took; the other copies go with these
    seconds["trials"] = time.monotonic() - t0 - seconds["calibrate_candidates"] - seconds["sensitivity"]
    return SearchResult(model=mixed, chosen=chosen, passed=bool(passing), trials=trials, sensitivity=sens,
                        candidates=candidates, group_size=group, seconds=seconds, stop_reason=stop,
                        measured_on=measured_on or f"{MEASURE_ROWS} calibration rows", granularity=search.granularity)


def run_unit(recipe, model_dir, arch: str, tokenizer, calib_tokens, root, device: str, reporter, model=None):
    """pipeline.run_calibrate_and_export for precision auto: search (calibrating every candidate), then
    export the chosen mix as the unified HF checkpoint. Returns (exported, calibration record, stages)."""
    from trtconv.checkpoints.hf_model import compute_dtype, load_hf_model
    from trtconv.stages import calibrate, export
    from trtconv.stages.base import StageMeter

    with StageMeter(NAME) as m:
        dtype = compute_dtype(recipe.model.dtype, device)
        if model is None:
            reporter.stage(NAME, f"loading the model from {model_dir}")
            model = load_hf_model(model_dir, dtype, recipe.model.trust_remote_code, device)
        candidates = candidates_of(recipe.quantization)
        reporter.stage(NAME, f"{arch}: precision auto over {', '.join(candidates)} (kv cache {recipe.quantization.kv_cache}), "
                       f"at most {recipe.quantization.search.max_trials} trials or {recipe.quantization.search.time_budget_s:g} s")
        validation, measured_on = validation_for(recipe, tokenizer, calib_tokens)
        if validation is None:
            reporter.warn(f"precision auto: trials measured on {measured_on}")
        result = run(model, recipe, calib_tokens, device, reporter, validation, measured_on, arch)
        del model
        census = calibrate.quantizer_census(result.model)
    record = result.record()
    stages = [m.record(status="ok" if result.passed else "failed", trials=len(result.trials), chosen_trial=result.chosen.index,
                       effective_bits=round(result.chosen.effective_bits, 4), seconds=record["seconds"], compute_dtype=dtype)]
    quantization = recipe.quantization.model_copy(update={"awq_group_size": result.group_size})
    with StageMeter("export") as m:
        reporter.stage("export", f"unified HF checkpoint, per-unit mix of trial {result.chosen.index}")
        exported = export.run(result.model, tokenizer, result.model.config, arch, recipe.export, quantization, root)
    stages.append(m.record(repairs=len(exported.repairs), seconds=exported.seconds))
    return exported, {"quant_config": {}, "census": census, "compute_dtype": dtype, "awq_group_size": result.group_size,
                      "awq_group_size_source": "pinned" if recipe.quantization.awq_group_size else "auto", "path": "in_memory", "search": record}, stages
