"""A manifest checked against itself: what `verify` and `sign` can tell without re-running anything.

The artifact digest pins the payload files (checkpoint, tokenizer, engine, recipe.yaml, the plots),
and `verify` re-hashes them against the manifest. The verdict a reviewer acts on, though, lives in
manifest.json, which the digest does not cover (two builds of the same bytes record other times and
hosts). A status edited to "passed", a gate verdict, value or threshold edited by hand, was verified
(issue 23, item 6). So every link of the chain the build used to decide is checked again here:

    recipe.yaml (in the digest) -> manifest.recipe -> each gate's threshold; the gate table -> its comparator
    manifest.metrics            -> each gate's value and interval; which gates there must be
    value, interval, threshold  -> the gate's verdict (trtconv.gate.stats.decide, the build's own rule)
    verdicts, allow_inconclusive -> status

What this cannot catch: a manifest edited consistently along the whole chain (metrics, gate values
and verdicts, status moved together). The signature (`trtconv sign`, over manifest.json and
report.md) or re-running the gate (`verify --deep`) does; the README says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import yaml

from trtconv.artifact.layout import RECIPE_NAME
from trtconv.artifact.manifest import GateResult, Manifest


def manifest_problems(folder: Path, manifest: Manifest) -> list[str]:
    """Every place where the manifest contradicts itself or its recipe.yaml, each said in one line."""
    problems = _recipe_problems(Path(folder), manifest)
    problems += _gate_problems(manifest)
    problems += _status_problems(manifest)
    return [f"manifest: {p} (the manifest was edited)" for p in problems]


def _recipe_problems(folder: Path, m: Manifest) -> list[str]:
    problems = []
    canonical = json.dumps(m.recipe, sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(canonical.encode()).hexdigest() != m.recipe_sha256:
        problems.append("recipe_sha256 is not the sha256 of its recipe")
    path = folder / RECIPE_NAME
    if path.is_file():  # a missing recipe.yaml is reported by the file check
        try:
            written = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            written = None
        if written != m.recipe:
            problems.append(f"its recipe is not the one in {RECIPE_NAME}")
    return problems


def _gate_problems(m: Manifest) -> list[str]:
    evaluate = m.recipe.get("evaluate") or {}
    if evaluate.get("enabled") and not m.metrics:
        return ["evaluate.enabled is true but no metrics are recorded"]
    expected = _expected_gates(evaluate.get("gates") or {}, m.metrics)
    recorded = [g.metric for g in m.gates]
    problems = [f"gate {name} is missing" for name in expected if name not in recorded]
    problems += [f"gate {name} is not one the recipe and metrics call for" for name in recorded if name not in expected]
    problems += [f"gate {name} is recorded {recorded.count(name)} times" for name in sorted(set(recorded)) if recorded.count(name) > 1]
    for gate in m.gates:
        if gate.metric in expected:
            problems += _one_gate(gate, expected[gate.metric], evaluate["gates"])
    return problems


def _expected_gates(thresholds: dict, metrics: dict) -> dict[str, dict]:
    """Gate name -> the metric summary it judges, as the build names them (trtconv.gate.stats.apply_gates)."""
    from trtconv.gate.gates import GATES

    packs = metrics.get("packs") or {}
    expected: dict[str, dict] = {}
    for key, row in GATES.items():
        if thresholds.get(key) is None:
            continue
        if row.source == "task":
            if row.metric in (metrics.get("task") or {}):
                expected[key] = metrics["task"][row.metric]
        elif packs:
            expected.update({f"{key}[{name}]": part[row.metric] for name, part in packs.items() if row.metric in part})
        elif row.metric in metrics:
            expected[key] = metrics[row.metric]
    return expected


def _one_gate(gate: GateResult, summary: dict, thresholds: dict) -> list[str]:
    from trtconv.gate.gates import GATES
    from trtconv.gate.stats import decide

    key = gate.metric.split("[", 1)[0]
    problems = []
    if gate.comparator != GATES[key].comparator:
        problems.append(f"gate {gate.metric} compares with {gate.comparator}; the gate is {GATES[key].comparator}")
    if gate.threshold != thresholds[key]:
        problems.append(f"gate {gate.metric} threshold {gate.threshold:g} is not the recipe's evaluate.gates.{key} = {thresholds[key]:g}")
    recorded = (gate.value, gate.ci_low, gate.ci_high)
    measured = (summary.get("value"), summary.get("ci_low"), summary.get("ci_high"))
    if not all(_same(a, b) for a, b in zip(recorded, measured)):
        problems.append(f"gate {gate.metric} value/interval {_triple(recorded)} is not the metrics' {_triple(measured)}")
    verdict, _reason = decide(summary, thresholds[key], GATES[key].comparator)
    if gate.verdict != verdict:
        problems.append(f"gate {gate.metric} says {gate.verdict}, but its metrics and threshold give {verdict}")
    return problems


def _same(a, b) -> bool:
    """Equal, NaN included (a diverged candidate records NaN, and NaN != NaN)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _triple(values: tuple) -> str:
    return "(" + ", ".join("none" if v is None else f"{v:.6g}" for v in values) + ")"


def _status_problems(m: Manifest) -> list[str]:
    from trtconv.gate.stats import gates_passed

    if m.status not in ("passed", "failed"):
        return []
    allow = bool((m.recipe.get("evaluate") or {}).get("allow_inconclusive"))
    passed = gates_passed(m.gates, allow)
    if m.status == "passed" and not passed:
        failing = ", ".join(f"{g.metric} {g.verdict}" for g in m.gates if g.verdict != "pass")
        return [f"status is passed, but its gates say {failing}"]
    if m.status == "failed" and passed:
        return ["status is failed, but every gate it records passed"]
    return []
