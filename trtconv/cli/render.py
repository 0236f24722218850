"""What a finished build looks like on a terminal, in a CI log, and as `--json`."""

from __future__ import annotations

import json
import shlex

def summary(outcome) -> dict:
    m = outcome.manifest
    return {
        "status": m.status,
        "status_reason": m.status_reason,
        "artifact": str(outcome.path),
        "artifact_digest": m.artifact_digest,
        "recipe": m.recipe.get("name"),
        "precision": m.recipe["quantization"]["precision"],
        "kv_cache": m.recipe["quantization"]["kv_cache"],
        "engine": {k: m.engine.get(k) for k in ("target", "status", "reason")},
        "metrics": {k: v for k, v in m.metrics.items() if isinstance(v, dict)},
        "gates": [g.model_dump(mode="json") for g in m.gates],
        "stages": [{"name": s.name, "status": s.status, "wall_s": s.wall_s, "peak_rss_mib": s.peak_rss_mib,
                    "peak_gpu_mib": s.peak_gpu_mib} for s in m.stages],
    }


def print_result(outcome, reporter, json_mode: bool) -> None:
    """The gates (each once, with its own verdict), perplexity, engine, time; then the one result
    line. With --quiet only the result line (and errors, printed by the caller)."""
    m = outcome.manifest
    if json_mode:
        print(json.dumps(summary(outcome), indent=2))
        return
    if reporter.quiet:
        reporter.line(f"{m.status}: {outcome.path}  artifact_digest: {m.artifact_digest}")
        return
    if m.gates:
        print_gates(m.gates, reporter)
    if m.metrics:
        ppl_b, ppl_c = m.metrics["ppl_baseline"]["value"], m.metrics["ppl_candidate"]["value"]
        reporter.line(f"perplexity: original {ppl_b:.4f} -> artifact {ppl_c:.4f}")
    eng = m.engine
    if eng.get("target") not in (None, "none"):
        reporter.line(f"engine ({eng.get('target')}): {eng.get('status')} {eng.get('reason') or ''}".rstrip())
        if eng.get("command"):
            reporter.line("engine command: " + shlex.join(eng["command"]))
    for line in time_lines(m.stages, reporter.elapsed()):
        reporter.line(line)
    reporter.line(f"{m.status}: {outcome.path}")
    reporter.line(f"artifact_digest: {m.artifact_digest}")


def gate_line(g) -> str:
    """One gate as one log line that starts with its own verdict."""
    ci = f"[{g.ci_low:.4g}, {g.ci_high:.4g}]" if g.ci_low is not None else "n/a"
    return f"gate {g.verdict.upper()}: {g.metric} = {g.value:.4g}, 95% interval {ci}, threshold {g.comparator} {g.threshold:g}"


def print_gates(gates, reporter) -> None:
    """A table on a terminal; in a log one line per gate, each with its own verdict."""
    if not reporter.plain:
        rows = [[g.metric, f"{g.value:.4g}", f"[{g.ci_low:.4g}, {g.ci_high:.4g}]" if g.ci_low is not None else "n/a",
                 f"{g.comparator} {g.threshold:g}", g.verdict] for g in gates]
        reporter.table("accuracy gates", ["gate", "value", "95% interval", "threshold", "verdict"], rows)
        return
    for g in gates:
        reporter.line(gate_line(g))


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f} GiB"


def time_lines(stages, elapsed: float | None = None) -> list[str]:
    """Where the time went: one line per stage (time, peak host RSS, peak GPU), then the total, and
    the time since the run started (the rest is start-up: Python, torch, and the checks before the
    load stage's clock). A stage reused from the cache shows the time it took when it ran."""
    lines = ["where the time went:"]
    for s in stages:
        note = ""
        if s.status == "reused":
            note = "  (reused from the cache)"
        elif s.status not in ("ok",):
            note = f"  ({s.status})"
        spent = 0.0 if s.status == "reused" else s.wall_s
        lines.append(f"  {s.name:<10} {spent:>8.1f} s   peak RSS {_gib(s.peak_rss_mib):>10}   peak GPU {_gib(s.peak_gpu_mib):>10}{note}")
    total = sum(s.wall_s for s in stages if s.status != "reused")
    lines.append(f"  {'total':<10} {total:>8.1f} s" + (f"   ({elapsed:.1f} s since the run started)" if elapsed is not None else ""))
    return lines


