"""The gate's decision rule, pinned at its boundaries with synthetic intervals and arrays.

A gate passes when the whole confidence interval is on the right side of its threshold, fails
when the whole interval is on the wrong side, and is inconclusive when the interval straddles the
threshold (or cannot be formed); inconclusive fails the build unless evaluate.allow_inconclusive.
No model, no ModelOpt: this file runs in about a second.
"""

from __future__ import annotations

import numpy as np
import pytest

from trtconv.artifact.manifest import GateResult
from trtconv.gate.gates import GATES, gates_from
from trtconv.gate.stats import (
    CONFIDENCE,
    METRICS,
    DocumentStats,
    apply_gates,
    bootstrap_interval,
    decide,
    gates_passed,
    summarize,
)
from trtconv.recipe.schema import EvaluateSection


def _m(lo, hi, value=None):
    value = (lo + hi) / 2 if value is None and lo is not None else value
    return {"value": value, "ci_low": lo, "ci_high": hi}


# -- decide: one metric, one threshold ------------------------------------------------------------

# (interval, threshold, comparator) -> verdict
CASES = [
    # "<=": the metric must stay at or below the threshold
    ((0.1, 0.4), 0.5, "<=", "pass"),  # entirely below
    ((0.6, 0.9), 0.5, "<=", "fail"),  # entirely above
    ((0.4, 0.6), 0.5, "<=", "inconclusive"),  # straddles
    ((0.3, 0.5), 0.5, "<=", "pass"),  # upper end exactly at the threshold: at or below passes
    ((0.5, 0.7), 0.5, "<=", "inconclusive"),  # lower end exactly at the threshold: not entirely above
    ((0.5, 0.5), 0.5, "<=", "pass"),  # a point interval on the threshold
    # ">=": the metric must stay at or above the threshold
    ((0.96, 0.99), 0.95, ">=", "pass"),
    ((0.80, 0.90), 0.95, ">=", "fail"),
    ((0.90, 0.97), 0.95, ">=", "inconclusive"),
    ((0.95, 0.99), 0.95, ">=", "pass"),  # lower end exactly at the threshold: at or above passes
    ((0.90, 0.95), 0.95, ">=", "inconclusive"),  # upper end exactly at the threshold: not entirely below
    ((0.95, 0.95), 0.95, ">=", "pass"),
]


@pytest.mark.parametrize(("interval", "threshold", "comparator", "verdict"), CASES)
def test_decide_at_the_boundaries(interval, threshold, comparator, verdict):
    got, reason = decide(_m(*interval), threshold, comparator)
    assert got == verdict
    assert f"{CONFIDENCE:.0%} interval" in reason and f"{threshold:g}" in reason


def test_the_point_estimate_does_not_decide():
    # A point estimate well inside the threshold does not pass while the interval straddles it.
    assert decide(_m(0.1, 0.6, value=0.11), 0.5, "<=")[0] == "inconclusive"
    assert decide(_m(0.1, 0.6, value=0.59), 0.5, "<=")[0] == "inconclusive"


def test_no_interval_is_inconclusive():
    verdict, reason = decide(_m(None, None, value=0.0), 0.5, "<=")
    assert verdict == "inconclusive" and "fewer than 2 documents" in reason


def test_inconclusive_reason_says_what_to_do():
    _, reason = decide(_m(0.4, 0.6, value=0.5), 0.5, "<=")
    assert "straddles 0.5" in reason and "evaluate.num_samples" in reason


# -- apply_gates + gates_passed: the recipe's thresholds over a summary ------------------------------


def _summary(**intervals) -> dict:
    return {metric: _m(*interval) for metric, interval in intervals.items()}


def _section(allow_inconclusive=False, **gates) -> EvaluateSection:
    return EvaluateSection(allow_inconclusive=allow_inconclusive, gates=gates)


def test_apply_gates_judges_each_document_gate_in_table_order():
    summary = _summary(ppl_increase_pct=(0.5, 1.5), mean_kl=(0.02, 0.03), top1_agreement=(0.90, 0.99))
    section = _section(max_ppl_increase_pct=2.0, max_kl=0.01, min_top1_agreement=0.95)
    results = apply_gates(summary, section)
    assert [r.metric for r in results] == [g.key for g in gates_from("documents")]
    assert [r.verdict for r in results] == ["pass", "fail", "inconclusive"]
    assert [r.comparator for r in results] == [GATES[r.metric].comparator for r in results]
    assert results[1].threshold == 0.01 and (results[1].ci_low, results[1].ci_high) == (0.02, 0.03)


def test_apply_gates_skips_unset_thresholds_and_missing_metrics():
    summary = _summary(mean_kl=(0.001, 0.002))
    results = apply_gates(summary, _section(max_kl=0.01, min_top1_agreement=0.9))  # no top1 metric, no ppl threshold
    assert [(r.metric, r.verdict) for r in results] == [("max_kl", "pass")]


@pytest.mark.parametrize(
    ("verdicts", "allow", "passed"),
    [
        (["pass", "pass"], False, True),
        (["pass", "inconclusive"], False, False),
        (["pass", "inconclusive"], True, True),
        (["pass", "fail"], False, False),
        (["inconclusive", "fail"], True, False),  # allowing inconclusive never lets a failure through
        ([], False, True),
    ],
)
def test_gates_passed(verdicts, allow, passed):
    results = [GateResult(metric="max_kl", comparator="<=", threshold=0.1, value=0.0, ci_low=0.0, ci_high=0.0, verdict=v, reason="") for v in verdicts]
    assert gates_passed(results, allow_inconclusive=allow) is passed


def test_allow_inconclusive_is_written_into_the_reason():
    summary = _summary(mean_kl=(0.005, 0.02))
    strict = apply_gates(summary, _section(max_kl=0.01))[0]
    allowed = apply_gates(summary, _section(allow_inconclusive=True, max_kl=0.01))[0]
    assert strict.verdict == allowed.verdict == "inconclusive"
    assert "allowed by evaluate.allow_inconclusive" in allowed.reason and "allowed" not in strict.reason
    assert not gates_passed([strict], allow_inconclusive=False) and gates_passed([allowed], allow_inconclusive=True)


# -- the statistics behind the intervals -------------------------------------------------------------


def _stats(seed: int = 0, docs: int = 24) -> DocumentStats:
    rng = np.random.default_rng(seed)
    n = rng.integers(20, 60, size=docs).astype(np.float64)
    nll_b = n * rng.uniform(2.0, 3.0, size=docs)
    return DocumentStats(
        n_tokens=n,
        nll_baseline=nll_b,
        nll_candidate=nll_b + n * rng.uniform(0.0, 0.05, size=docs),
        kl=n * rng.uniform(0.001, 0.01, size=docs),
        top1_agree=np.floor(n * rng.uniform(0.9, 1.0, size=docs)),
    )


def test_metrics_are_ratios_of_sums():
    s = _stats()
    assert METRICS["mean_kl"](s) == pytest.approx(s.kl.sum() / s.n_tokens.sum())
    assert METRICS["top1_agreement"](s) == pytest.approx(s.top1_agree.sum() / s.n_tokens.sum())
    expected_pct = (np.exp((s.nll_candidate.sum() - s.nll_baseline.sum()) / s.n_tokens.sum()) - 1) * 100
    assert METRICS["ppl_increase_pct"](s) == pytest.approx(expected_pct)
    assert METRICS["ppl_candidate"](s) >= METRICS["ppl_baseline"](s)


def test_summary_is_reproducible_for_a_seed():
    s = _stats()
    summary = summarize(s, seed=7)
    assert summary["num_documents"] == 24 and summary["num_tokens"] == int(s.n_tokens.sum())
    for metric in METRICS:
        m = summary[metric]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], metric
    again = bootstrap_interval(s, "mean_kl", seed=7)
    assert again == (summary["mean_kl"]["ci_low"], summary["mean_kl"]["ci_high"])  # same seed, same bytes
    assert bootstrap_interval(s, "mean_kl", seed=8) != again  # another seed resamples other documents


def test_interval_needs_two_documents():
    s = _stats(docs=1)
    assert bootstrap_interval(s, "mean_kl", seed=0) is None
    assert decide(summarize(s, seed=0)["mean_kl"], 1.0, "<=")[0] == "inconclusive"


def test_identical_models_pass_every_document_gate():
    s = _stats()
    same = DocumentStats(n_tokens=s.n_tokens, nll_baseline=s.nll_baseline, nll_candidate=s.nll_baseline.copy(),
                         kl=np.zeros_like(s.kl), top1_agree=s.n_tokens.copy())
    results = apply_gates(summarize(same, seed=0), _section(max_ppl_increase_pct=0.0, max_kl=0.0, min_top1_agreement=1.0))
    assert [r.verdict for r in results] == ["pass", "pass", "pass"]
