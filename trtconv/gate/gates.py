"""The accuracy gates trtconv offers: one explicit table, read by everything that names a gate.

A gate is a threshold on one metric with a direction. Its row says which metric it judges (a key
of ``trtconv.gate.stats.METRICS`` for the held-out documents, or of the task summary for the
multiple-choice task), how (``<=`` or ``>=``), and how to show and document it. The recipe's
``evaluate.gates`` section, the per-precision defaults (trtconv.precisions), the gate stage and
the renderers read this table, so a new gate is one row here (plus its metric, and a default in
each precision row; tests/test_registries.py checks they agree).

This module is plain data on purpose: the recipe schema imports it, and must not pull in numpy,
scipy or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Comparator = Literal["<=", ">="]
Source = Literal["documents", "task"]


@dataclass(frozen=True)
class Gate:
    key: str  # the recipe key under evaluate.gates, and GateResult.metric in the manifest
    metric: str  # the metric it judges: METRICS key ("documents") or task-summary key ("task")
    comparator: Comparator  # "<=": the metric must stay at or below the threshold; ">=": at or above
    source: Source  # "documents": held-out text (always); "task": evaluate.multiple_choice (when given)
    label: str  # how a human reads the metric
    unit: str  # the threshold's unit
    description: str  # the recipe field's help (JSON Schema description)
    max_threshold: float | None = None  # upper bound of a valid threshold (fractions: 1); lower bound is 0


GATES: dict[str, Gate] = {
    g.key: g
    for g in (
        Gate(
            "max_ppl_increase_pct",
            "ppl_increase_pct",
            "<=",
            "documents",
            "perplexity increase",
            "%",
            "Max perplexity increase over the original, in %.",
        ),
        Gate("max_kl", "mean_kl", "<=", "documents", "mean KL per token", "nats", "Max mean KL(original || candidate) per token."),
        Gate(
            "min_top1_agreement",
            "top1_agreement",
            ">=",
            "documents",
            "top-1 agreement",
            "fraction of tokens",
            "Min fraction of tokens whose argmax agrees.",
            max_threshold=1,
        ),
        Gate(
            "max_task_accuracy_drop_pp",
            "accuracy_drop_pp",
            "<=",
            "task",
            "multiple-choice accuracy drop",
            "pp",
            "Max drop of multiple-choice accuracy, in percentage points (with evaluate.multiple_choice).",
        ),
    )
}


def gates_from(source: Source) -> list[Gate]:
    """The gates that judge one source, in table order (the order results are reported in)."""
    return [g for g in GATES.values() if g.source == source]
