"""The human report (report.md + PNG plots) and the JUnit file CI systems display.

When a gate fails, the report names the worst layers by weight quantization error and the worst
documents by KL, so the user knows what to exclude or recalibrate. The plots are written with
no timestamp metadata, so the same numbers give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from trtconv.artifact.manifest import GateResult, Manifest

REPORT_NAME = "report.md"
WEIGHT_PLOT = "report_weight_error.png"
KL_PLOT = "report_token_kl.png"
WORST_K = 5


def _fmt_ci(m: dict) -> str:
    if m.get("ci_low") is None:
        return f"{m['value']:.5g}"
    return f"{m['value']:.5g} [{m['ci_low']:.5g}, {m['ci_high']:.5g}]"


def plot_weight_errors(errors: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n.removeprefix("model.layers.") for n, _ in errors]
    values = [e for _, e in errors]
    fig, ax = plt.subplots(figsize=(max(6, len(values) * 0.18), 3.2), dpi=100)
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("relative weight error")
    ax.set_title("per-layer weight quantization error (checkpoint vs original)")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_token_kl(token_kl: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    values = np.clip(token_kl, 1e-9, None)
    ax.hist(np.log10(values), bins=60, color="#55a868")
    ax.set_xlabel("log10 KL(original || artifact) per token")
    ax.set_ylabel("tokens")
    ax.set_title("distribution of per-token KL")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_report(root: Path, manifest: Manifest, weight_errors: list[tuple[str, float]] | None, token_kl: np.ndarray | None) -> None:
    """report.md (and the plots) from the manifest's content; stage times make it a run record."""
    lines = [f"# trtconv report: {manifest.recipe['name']}", ""]
    lines.append(f"**Status: {manifest.status.upper()}**" + (f" — {manifest.status_reason}" if manifest.status_reason else ""))
    lines.append("")
    q = manifest.recipe["quantization"]
    lines.append(
        f"Precision `{q['precision']}`, KV cache `{q['kv_cache']}`; made by trtconv {manifest.trtconv_version} "
        f"on {manifest.device.get('name')} ({manifest.device.get('kind')})."
    )
    lines.append("")
    if manifest.metrics:
        m = manifest.metrics
        lines += [
            f"## Accuracy: original vs artifact ({m['num_documents']} held-out documents, {m['num_tokens']} tokens)",
            "",
            f"Candidate: {manifest.evaluation.get('candidate')}. Intervals: paired bootstrap over documents, "
            f"{m['confidence_level']:.0%}, {m['bootstrap_resamples']} resamples.",
            "",
            "| metric | original | artifact | change [95% CI] |",
            "|---|---|---|---|",
            f"| perplexity | {m['ppl_baseline']['value']:.4f} | {m['ppl_candidate']['value']:.4f} | {_fmt_ci(m['ppl_increase_pct'])} % |",
            f"| mean KL per token | – | – | {_fmt_ci(m['mean_kl'])} |",
            f"| top-1 agreement | – | – | {_fmt_ci(m['top1_agreement'])} |",
        ]
        if "task" in m:
            t = m["task"]
            lines.append(
                f"| multiple-choice accuracy ({t['num_items']} items) | {t['accuracy_baseline']['value']:.4f} | "
                f"{t['accuracy_candidate']['value']:.4f} | {_fmt_ci(t['accuracy_difference_pp'])} pp |"
            )
        lines += _pack_table(m.get("packs") or {})
        lines += [
            "",
            "| gate | value | 95% interval | threshold | verdict |",
            "|---|---|---|---|---|",
        ]
        for g in manifest.gates:
            ci = f"[{g.ci_low:.5g}, {g.ci_high:.5g}]" if g.ci_low is not None else "n/a"
            lines.append(f"| {g.metric} | {g.value:.5g} | {ci} | {g.comparator} {g.threshold:g} | **{g.verdict}** |")
        lines.append("")
    if weight_errors:
        worst = sorted(weight_errors, key=lambda x: -x[1])[:WORST_K]
        lines += ["## Worst layers by weight quantization error", "", "| layer | relative error |", "|---|---|"]
        lines += [f"| `{n}` | {e:.4g} |" for n, e in worst]
        lines += ["", f"![per-layer weight error]({WEIGHT_PLOT})", ""]
        plot_weight_errors(weight_errors, root / WEIGHT_PLOT)
    worst_docs = manifest.evaluation.get("worst_documents") or []
    if worst_docs:
        lines += ["## Worst documents by KL", "", "| document | mean KL | tokens |", "|---|---|---|"]
        lines += [f"| `{d['document']}` | {d['mean_kl']:.4g} | {d['tokens']} |" for d in worst_docs]
        lines.append("")
    if token_kl is not None and token_kl.size:
        plot_token_kl(token_kl, root / KL_PLOT)
        lines += [f"![per-token KL]({KL_PLOT})", ""]
    advice = manifest.evaluation.get("advice")
    if manifest.status != "passed" and advice and "layers" in advice:
        from trtconv.gate.sensitivity import advice_lines

        q = manifest.recipe["quantization"]
        lines += ["## What to try", ""]
        lines += [f"- {line}" for line in advice_lines(advice, q["exclude"], manifest.recipe["evaluate"]["gates"]["max_kl"])]
        lines += ["", "| decoder layer | KL with only this layer quantized |", "|---|---|"]
        lines += [f"| `{d['layer']}` | {d['kl']:.4g} |" for d in advice["layers"][:10]]
        lines.append("")
    elif manifest.status != "passed" and weight_errors:
        lines += [
            "## What to try",
            "",
            "Exclude the worst layers above (`quantization.exclude`), raise `calibration.num_samples`, "
            "or choose a precision with more bits; then rebuild.",
            "",
        ]
    lines += ["## Stages", "", "| stage | status | wall s | peak RSS MiB | peak GPU MiB |", "|---|---|---|---|---|"]
    for s in manifest.stages:
        gpu = f"{s.peak_gpu_mib:.0f}" if s.peak_gpu_mib is not None else "–"
        lines.append(f"| {s.name} | {s.status} | {s.wall_s:.2f} | {s.peak_rss_mib or 0:.0f} | {gpu} |")
    lines.append("")
    sizes = _folder_sizes(root)
    if sizes:
        lines += ["## Size", "", "| folder | MiB |", "|---|---|"] + [f"| {k} | {v / 2**20:.2f} |" for k, v in sizes.items()]
        lines.append("")
    repairs = manifest.export.get("config_repairs") or []
    if repairs:
        lines += ["## Export repairs", ""] + [f"- `{r['key']}`: `{r['before']!r}` → `{r['after']!r}` ({r['why']})" for r in repairs]
        lines.append("")
    (root / REPORT_NAME).write_text("\n".join(lines), encoding="utf-8")


def _pack_table(packs: dict) -> list[str]:
    """Per evaluation pack: the gate judges each one (a model may keep code and lose prose)."""
    if not packs:
        return []
    lines = ["", "Per evaluation pack (each gated on its own):", "",
             "| pack | documents | perplexity original → artifact | change % [95% CI] | mean KL [95% CI] | top-1 agreement [95% CI] |",
             "|---|---|---|---|---|---|"]
    for name, p in packs.items():
        lines.append(f"| {name} | {p['num_documents']} | {p['ppl_baseline']['value']:.4f} → {p['ppl_candidate']['value']:.4f} | "
                     f"{_fmt_ci(p['ppl_increase_pct'])} | {_fmt_ci(p['mean_kl'])} | {_fmt_ci(p['top1_agreement'])} |")
    return lines


def _folder_sizes(root: Path) -> dict[str, int]:
    out = {}
    for name in ("checkpoint", "hf_checkpoint", "engine", "tokenizer"):
        d = root / name
        if d.is_dir():
            out[name] = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    return out


def write_junit(path: Path, gates: list[GateResult], suite: str, allow_inconclusive: bool) -> None:
    """One test case per gate; a failed (or disallowed inconclusive) gate is a <failure>."""
    failures = [g for g in gates if g.verdict == "fail" or (g.verdict == "inconclusive" and not allow_inconclusive)]
    ts = ET.Element("testsuite", name=f"trtconv.{suite}", tests=str(len(gates)), failures=str(len(failures)), errors="0")
    for g in gates:
        case = ET.SubElement(ts, "testcase", classname=f"trtconv.{suite}", name=g.metric)
        ET.SubElement(case, "system-out").text = (
            f"value={g.value:.6g} ci=[{g.ci_low}, {g.ci_high}] threshold {g.comparator} {g.threshold:g} verdict={g.verdict}"
        )
        if g in failures:
            ET.SubElement(case, "failure", message=f"{g.metric} {g.verdict}: {g.reason}", type=g.verdict)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(ts).write(path, encoding="utf-8", xml_declaration=True)
