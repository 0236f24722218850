"""Stage 5, evaluate: the original model against the artifact that ships, on held-out text.

The candidate is the exported checkpoint read back from disk (trtconv's reference executor for the
TensorRT-LLM format), not the in-memory model: export is where bugs live, so the gate must judge
the files a runtime loads. Both models see the same tokens; per document we sum next-token NLL of
each, KL(original || candidate) and top-1 agreement. Gates decide on a paired bootstrap interval
over documents, not on the point estimate: a gate passes when the whole interval is on the right
side of the threshold, fails when the whole interval is on the wrong side, and is *inconclusive*
otherwise (the sample is too small to decide), which fails unless the recipe allows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable

import numpy as np

from trtconv.artifact.manifest import GateResult
from trtconv.gate.gates import gates_from
from trtconv.recipe.schema import EvaluateSection
from trtconv.data.samples import TokenSet

N_RESAMPLES = 2000
CONFIDENCE = 0.95

if TYPE_CHECKING:  # torch is imported where logits are computed, so the gate rule loads without it
    import torch

LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]  # input_ids [B,T] -> logits [B,T,V] (float32)


@dataclass
class DocumentStats:
    """Per-document sums; every metric is a ratio of sums over documents, so resampling is paired."""

    n_tokens: np.ndarray
    nll_baseline: np.ndarray
    nll_candidate: np.ndarray
    kl: np.ndarray
    top1_agree: np.ndarray
    token_kl: np.ndarray = field(default_factory=lambda: np.zeros(0))  # every token's KL, for the report


# The per-document arrays a bootstrap resamples together (one entry per document; token_kl is per token).
RESAMPLED_FIELDS: tuple[str, ...] = ("n_tokens", "nll_baseline", "nll_candidate", "kl", "top1_agree")
# Every array of DocumentStats, as the stage cache stores them.
STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DocumentStats))


def per_document_stats(tokens: TokenSet, baseline: LogitsFn, candidate: LogitsFn, batch_size: int, device: str, advance) -> DocumentStats:
    import torch

    n, nb, nc, kl, agree, token_kl = [], [], [], [], [], []
    rows = torch.tensor(tokens.rows, dtype=torch.long)
    lengths = tokens.lengths
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size].to(device)
            lb = torch.log_softmax(baseline(batch).float(), dim=-1)
            lc = torch.log_softmax(candidate(batch).float(), dim=-1)
            for j in range(batch.shape[0]):
                t = lengths[start + j] - 1  # positions that predict a real next token
                target = batch[j, 1 : t + 1]
                b, c = lb[j, :t], lc[j, :t]
                kl_tok = (b.exp() * (b - c)).sum(-1).clamp_min(0)
                n.append(t)
                nb.append(-b.gather(-1, target[:, None]).sum().item())
                nc.append(-c.gather(-1, target[:, None]).sum().item())
                kl.append(kl_tok.sum().item())
                agree.append((b.argmax(-1) == c.argmax(-1)).sum().item())
                token_kl.append(kl_tok.cpu().numpy())
            advance(1)
    return DocumentStats(
        n_tokens=np.asarray(n, dtype=np.float64),
        nll_baseline=np.asarray(nb),
        nll_candidate=np.asarray(nc),
        kl=np.asarray(kl),
        top1_agree=np.asarray(agree, dtype=np.float64),
        token_kl=np.concatenate(token_kl) if token_kl else np.zeros(0),
    )


# Each metric as a function of per-document sums (the arrays may be a bootstrap resample).
def _ppl_baseline(s: DocumentStats) -> float:
    return math.exp(s.nll_baseline.sum() / s.n_tokens.sum())


def _ppl_candidate(s: DocumentStats) -> float:
    return math.exp(s.nll_candidate.sum() / s.n_tokens.sum())


def _ppl_increase_pct(s: DocumentStats) -> float:
    return (math.exp((s.nll_candidate.sum() - s.nll_baseline.sum()) / s.n_tokens.sum()) - 1.0) * 100.0


def _mean_kl(s: DocumentStats) -> float:
    return s.kl.sum() / s.n_tokens.sum()


def _top1(s: DocumentStats) -> float:
    return s.top1_agree.sum() / s.n_tokens.sum()


# metric name -> fn(DocumentStats); the names are what gates (trtconv.gate.gates) and the manifest use.
METRICS: dict[str, Callable[[DocumentStats], float]] = {
    "ppl_baseline": _ppl_baseline,
    "ppl_candidate": _ppl_candidate,
    "ppl_increase_pct": _ppl_increase_pct,
    "mean_kl": _mean_kl,
    "top1_agreement": _top1,
}


def _resampled(arrays: tuple[np.ndarray, ...]) -> DocumentStats:
    return DocumentStats(**dict(zip(RESAMPLED_FIELDS, arrays)))


def paired_interval(samples: tuple[np.ndarray, ...], statistic, seed: int, vectorized: bool = False) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic` over paired samples (the same resampled units
    for every array), or None when it cannot be formed (fewer than 2 units, non-finite bounds)."""
    from scipy.stats import bootstrap

    if len(samples[0]) < 2:
        return None
    res = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=vectorized,
        n_resamples=N_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return lo, hi


def bootstrap_interval(stats: DocumentStats, metric: str, seed: int) -> tuple[float, float] | None:
    """Paired percentile bootstrap over documents (same resampled documents for both models)."""
    arrays = tuple(getattr(stats, name) for name in RESAMPLED_FIELDS)
    fn = METRICS[metric]
    return paired_interval(arrays, lambda *a: fn(_resampled(a)), seed)


def pack_stats(stats: DocumentStats, first_row: int, rows: int) -> DocumentStats:
    """The documents of one pack (rows first_row .. first_row + rows - 1)."""
    part = slice(first_row, first_row + rows)
    return DocumentStats(**{name: getattr(stats, name)[part] for name in RESAMPLED_FIELDS})


def summarize(stats: DocumentStats, seed: int, packs: list[dict] | None = None) -> dict:
    """Every metric with its interval over all documents; with several packs (evaluation's
    extra["packs"]) also each pack's own, under summary["packs"][name], which the gates judge."""
    out = _summarize(stats, seed)
    if packs:
        out["packs"] = {p["name"]: _summarize(pack_stats(stats, p["first_row"], p["rows"]), seed) for p in packs}
    return out


def _summarize(stats: DocumentStats, seed: int) -> dict:
    out = {"num_documents": int(len(stats.n_tokens)), "num_tokens": int(stats.n_tokens.sum())}
    for name, fn in METRICS.items():
        ci = bootstrap_interval(stats, name, seed)
        out[name] = {"value": float(fn(stats)), "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None}
    out["confidence_level"] = CONFIDENCE
    out["bootstrap_resamples"] = N_RESAMPLES
    return out


def decide(metric_summary: dict, threshold: float, comparator: str) -> tuple[str, str]:
    value, lo, hi = metric_summary["value"], metric_summary["ci_low"], metric_summary["ci_high"]
    if lo is None or hi is None:
        return "inconclusive", "no confidence interval (fewer than 2 documents)"
    if comparator == "<=":
        if hi <= threshold:
            return "pass", f"the {CONFIDENCE:.0%} interval [{lo:.4g}, {hi:.4g}] is at or below {threshold:g}"
        if lo > threshold:
            return "fail", f"the {CONFIDENCE:.0%} interval [{lo:.4g}, {hi:.4g}] is above {threshold:g}"
    else:
        if lo >= threshold:
            return "pass", f"the {CONFIDENCE:.0%} interval [{lo:.4g}, {hi:.4g}] is at or above {threshold:g}"
        if hi < threshold:
            return "fail", f"the {CONFIDENCE:.0%} interval [{lo:.4g}, {hi:.4g}] is below {threshold:g}"
    return "inconclusive", (
        f"the {CONFIDENCE:.0%} interval [{lo:.4g}, {hi:.4g}] straddles {threshold:g} (point estimate {value:.4g}): "
        "too few evaluation documents to decide; raise evaluate.num_samples"
    )


def apply_gates(summary: dict, section: EvaluateSection) -> list[GateResult]:
    """The document gates (trtconv.gate.gates, source "documents") whose threshold is set, in table
    order, on the pooled metrics, or, when the evaluation has several packs, on every pack's own
    (named `max_kl[eval-prose]`): a precision that is fine on code but breaks prose must fail."""
    if summary.get("packs"):
        return [g.model_copy(update={"metric": f"{g.metric}[{name}]"})
                for name, part in summary["packs"].items() for g in _gates(part, section)]
    return _gates(summary, section)


def _gates(summary: dict, section: EvaluateSection) -> list[GateResult]:
    results = []
    for gate in gates_from("documents"):
        threshold = getattr(section.gates, gate.key)
        if threshold is None or gate.metric not in summary:
            continue
        verdict, reason = decide(summary[gate.metric], threshold, gate.comparator)
        if verdict == "inconclusive" and section.allow_inconclusive:
            reason += " (allowed by evaluate.allow_inconclusive)"
        m = summary[gate.metric]
        results.append(
            GateResult(
                metric=gate.key,
                comparator=gate.comparator,
                threshold=threshold,
                value=m["value"],
                ci_low=m["ci_low"],
                ci_high=m["ci_high"],
                verdict=verdict,
                reason=reason,
            )
        )
    return results


def gates_passed(results: list[GateResult], allow_inconclusive: bool) -> bool:
    ok = {"pass", "inconclusive"} if allow_inconclusive else {"pass"}
    return all(r.verdict in ok for r in results)


def worst_documents(stats: DocumentStats, doc_ids: list[str], k: int = 5) -> list[dict]:
    mean_kl = stats.kl / np.maximum(stats.n_tokens, 1)
    order = np.argsort(-mean_kl)[:k]
    return [{"document": doc_ids[i], "mean_kl": float(mean_kl[i]), "tokens": int(stats.n_tokens[i])} for i in order]
