"""The human report (report.md + PNG plots) and the JUnit file CI systems display.

When a gate fails, the report names the worst layers by weight quantization error and the worst
documents by KL, so the user knows what to exclude or recalibrate. The weight-error plot is drawn
against the layer index, one series per module kind, so it stays readable at hundreds of layers;
both plots state the gate thresholds. The report ends with the command that serves the artifact.
The plots are written with no timestamp metadata, so the same numbers give the same bytes.
"""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from trtconv.artifact.layout import KL_PLOT, PAYLOAD_DIRS, REPORT_NAME, SEARCH_PLOT, SENSITIVITY_PLOT, WEIGHT_PLOT
from trtconv.artifact.manifest import GateResult, Manifest
from trtconv.gate.gates import gates_from

WORST_K = 5
PPL_METRIC = "ppl_increase_pct"  # shown with both perplexities, not as a bare change


def _fmt_ci(m: dict) -> str:
    if m.get("ci_low") is None:
        return f"{m['value']:.5g}"
    return f"{m['value']:.5g} [{m['ci_low']:.5g}, {m['ci_high']:.5g}]"


_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> tuple[int | None, str]:
    """'model.layers.12.self_attn.q_proj' -> (12, 'self_attn.q_proj'); 'lm_head' -> (None, 'lm_head')."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def _gates_of(gates: list[GateResult], key: str) -> list[GateResult]:
    """The gates of one recipe key: `max_kl`, or one per evaluation pack (`max_kl[eval-code]`)."""
    return [g for g in gates if g.metric == key or g.metric.startswith(key + "[")]


def _gate_key(metric: str) -> str:
    return metric.split("[", 1)[0]


def _gates_caption(gates: list[GateResult]) -> list[str]:
    """One caption line per gate key with each pack's verdict: nine gates fit the figure's width."""
    if not gates:
        return ["no gates"]
    lines = []
    for key in dict.fromkeys(_gate_key(g.metric) for g in gates):
        same = _gates_of(gates, key)
        limits = sorted({f"{g.comparator} {g.threshold:g}" for g in same})
        verdicts = ", ".join(g.verdict + (f" ({g.metric[len(key) + 1:-1]})" if "[" in g.metric else "") for g in same)
        lines.append(f"gate {key} {' / '.join(limits)}: {verdicts}")
    return lines


_preloading = None  # the thread preload_plotting started


def _pyplot():
    if _preloading is not None:
        _preloading.join()  # never two threads inside matplotlib's first import and backend choice
    return _import_pyplot()


def _import_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload_plotting() -> None:
    """Import matplotlib (about 1 s) on a thread of its own while evaluation runs, so the report does
    not wait for it; a failure is left to the report's own import to raise."""
    import threading

    global _preloading
    if _preloading is not None:
        return

    def load() -> None:
        try:
            _import_pyplot()
        except Exception:  # noqa: BLE001 - reported by write_report's own import
            pass

    _preloading = threading.Thread(target=load, name="trtconv-import-matplotlib")
    _preloading.start()


def _save(fig, path: Path) -> None:
    fig.savefig(path, metadata={"Software": None})
    _pyplot().close(fig)


def plot_weight_errors(errors: list[tuple[str, float]], path: Path, gates: list[GateResult] | None = None) -> None:
    _save(weight_error_figure(errors, gates or []), path)


def plot_token_kl(token_kl: np.ndarray, path: Path, gates: list[GateResult] | None = None) -> None:
    _save(token_kl_figure(token_kl, gates or []), path)


def weight_error_figure(errors: list[tuple[str, float]], gates: list[GateResult]):
    """Error against layer index, one series per kind of module (q_proj, down_proj, ...): as readable
    at 80 layers x 7 kinds as at 2. Modules outside the layer stack (lm_head) are drawn as lines."""
    plt = _pyplot()

    series: dict[str, list[tuple[int, float]]] = {}
    outside: list[tuple[str, float]] = []
    for name, value in errors:
        index, kind = split_layer_name(name)
        if index is None:
            outside.append((name, value))
        else:
            series.setdefault(kind, []).append((index, value))
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    markers = "os^vD<>ph*"
    for i, (kind, points) in enumerate(sorted(series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)],
                markersize=3 if len(points) > 40 else 5, linewidth=0.8, label=kind)
    for name, value in outside:
        ax.axhline(value, linestyle=":", color="grey", linewidth=1, label=f"{name} (outside the layers)")
    ax.set_xlabel("layer index")
    ax.xaxis.set_major_locator(_integer_ticks())  # layers are whole numbers: no tick at 0.5
    ax.set_ylabel("relative weight error")
    ax.set_title("weight quantization error per layer and module kind (checkpoint vs original)", fontsize=9)
    if series or outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    # No gate judges weight error itself: the gates that do judge the artifact are stated with it.
    _caption(fig, _gates_caption(gates))
    return fig


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _caption(fig, lines: list[str], line_in: float = 0.13) -> None:
    """Caption lines under the axes, with room made for every one (the figure grows, nothing is cut)."""
    width, height = fig.get_size_inches()
    room = line_in * len(lines) + 0.1
    fig.set_size_inches(width, height + room)
    fig.tight_layout(rect=(0, room / (height + room), 1, 1))
    for i, line in enumerate(reversed(lines)):
        fig.text(0.01, (0.05 + i * line_in) / (height + room), line, fontsize=7, color="#444444")


def token_kl_figure(token_kl: np.ndarray, gates: list[GateResult]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
    values = np.clip(token_kl, 1e-9, None)
    ax.hist(np.log10(values), bins=60, color="#55a868")
    mean = float(np.mean(token_kl)) if token_kl.size else 0.0
    ax.axvline(np.log10(max(mean, 1e-9)), color="#333333", linewidth=1.2, label=f"mean KL {mean:.3g}")
    _threshold_lines(ax, _gates_of(gates, "max_kl"), "mean KL", vertical=True, log=True)
    ax.set_xlabel("log10 KL(original || artifact) per token")
    ax.set_ylabel("tokens")
    ax.set_title("distribution of per-token KL", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _threshold_lines(ax, gates: list[GateResult], what: str, *, vertical: bool, log: bool = False) -> None:
    """One dashed line per distinct threshold of a gate key (one per pack when they differ), with the verdicts."""
    by_threshold: dict[float, list[GateResult]] = {}
    for g in gates:
        by_threshold.setdefault(g.threshold, []).append(g)
    for threshold, same in by_threshold.items():
        verdicts = ", ".join(sorted({g.verdict for g in same}))
        at = np.log10(max(threshold, 1e-9)) if log else threshold
        line = ax.axvline if vertical else ax.axhline
        line(at, color="#c44e52", linestyle="--", linewidth=1.5, label=f"gate: {what} {same[0].comparator} {threshold:g} ({verdicts})")


def plot_sensitivity(advice: dict, path: Path, gates: list[GateResult]) -> None:
    _save(sensitivity_figure(advice, gates), path)


def sensitivity_figure(advice: dict, gates: list[GateResult]):
    """KL with only one decoder layer quantized, per layer in model order; the full model's KL and
    the gate's threshold as lines, so the layers worth excluding stand out."""
    plt = _pyplot()
    layers = sorted(advice["layers"], key=lambda d: split_layer_name(d["layer"] + ".x")[0] or 0)
    index = [split_layer_name(d["layer"] + ".x")[0] or 0 for d in layers]
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=100)
    ax.bar(index, [d["kl"] for d in layers], color="#4c72b0", width=0.8, label="KL, only this layer quantized")
    if advice.get("full_kl") is not None:
        ax.axhline(advice["full_kl"], color="#333333", linewidth=1.0, label=f"KL, every layer quantized {advice['full_kl']:.3g}")
    # The KL gate's line where it is on the bars' scale; when another gate failed it can be 20x above them.
    top = max([d["kl"] for d in layers] + [advice.get("full_kl") or 0.0])
    kl_gates = _gates_of(gates, "max_kl")
    shown = [g for g in kl_gates if g.threshold <= 3 * top]
    _threshold_lines(ax, shown, "mean KL", vertical=False)
    off_scale = sorted({f"{g.threshold:g}" for g in kl_gates if g not in shown})
    note = [f"gate max_kl <= {', '.join(off_scale)}: above this scale ({top:.3g} at most here), not drawn"] if off_scale else []
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("decoder layer index")
    ax.set_ylabel("KL(original || quantized)")
    ax.set_title("per-layer sensitivity: which decoder layers cost the most accuracy (sensitivity rows)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _caption(fig, [advice.get("method", ""), *note])
    return fig


def plot_search(found: dict, path: Path, max_kl: float | None) -> None:
    _save(search_figure(found, max_kl), path)


def search_figure(found: dict, max_kl: float | None):
    """precision auto: every trial's effective bits against its KL (with its interval), the chosen one marked,
    the gate's KL threshold (the search's own, tightened by its margin) as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
    for t in found["trials"]:
        kl = t["mean_kl"]
        err = [[kl["value"] - (kl["ci_low"] or kl["value"])], [(kl["ci_high"] or kl["value"]) - kl["value"]]]
        chosen = t["trial"] == found["chosen_trial"]
        ax.errorbar([t["effective_bits"]], [kl["value"]], yerr=err, fmt="*" if chosen else "o", markersize=12 if chosen else 6,
                    color=("#55a868" if t["verdict"] == "pass" else "#c44e52"), capsize=3,
                    label=f"chosen: trial {t['trial']}" if chosen else None)
        ax.annotate(str(t["trial"]), (t["effective_bits"], kl["value"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if max_kl is not None:
        ax.axhline(max_kl, color="#c44e52", linestyle="--", linewidth=1.2, label=f"gate max_kl {max_kl:g}")
        ax.axhline(max_kl * found["margin"], color="#c44e52", linestyle=":", linewidth=1.0,
                   label=f"search target {max_kl * found['margin']:g} (margin {found['margin']:g})")
    ax.set_xlabel("effective weight bits (decoder layers, scales included)")
    ax.set_ylabel("mean KL (search rows)")
    ax.set_title("precision auto: trials, bits against KL (green: passed the search's gates)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _caption(fig, [f"candidates: {', '.join(found['candidates'])}; KL on the calibration rows, 95% bootstrap intervals"])
    return fig


def search_lines(found: dict) -> list[str]:
    """The report's section for precision auto: every trial, the chosen one, why the search stopped."""
    unit = found.get("granularity", "decoder layer")  # manifests before the per-GEMM search: whole layers
    lines = ["## Precision auto: the per-unit search", "",
             f"Candidates {', '.join(found['candidates'])}; one format per {unit}; chosen trial {found['chosen_trial']} "
             f"({found['effective_bits']:.3f} effective bits)" + ("" if found["passed"] else f"; {found['stop_reason']}") + ".", "",
             "| trial | effective bits | units per format | mean KL [95% CI] | top-1 [95% CI] | verdict |", "|---|---|---|---|---|---|"]
    for t in found["trials"]:
        per = ", ".join(f"{k} {v}" for k, v in (t.get("units_per_format") or t.get("layers_per_format") or {}).items())
        lines.append(f"| {t['trial']} | {t['effective_bits']:.3f} | {per} | {_fmt_ci(t['mean_kl'])} | {_fmt_ci(t['top1_agreement'])} | {t['verdict']} |")
    return lines + ["", f"![bits against KL]({SEARCH_PLOT})", ""]


def serve_commands(manifest: Manifest) -> list[str]:
    """How to serve the artifact (OUT = its folder), from what it holds."""
    recipe, engine = manifest.recipe, manifest.engine
    tp, pp = recipe["export"]["tp_size"], recipe["export"]["pp_size"]
    par = (f" --tp_size {tp}" if tp > 1 else "") + (f" --pp_size {pp}" if pp > 1 else "")
    target = engine.get("target")
    if target == "tensorrt" and engine.get("status") == "built":
        return [f"trtllm-serve OUT/engine --backend tensorrt --tokenizer OUT/tokenizer{par}"]
    if target == "pytorch":
        return [f"trtllm-serve OUT/hf_checkpoint --extra_llm_api_options OUT/engine/llm_api_options.yaml{par}"]
    build = "tensorrt" if recipe["export"].get("tensorrt_llm_checkpoint", True) else "pytorch"
    commands = [f"trtconv engine OUT --target {build} --require-engine   # on the GPU it will serve on"]
    if build == "tensorrt":
        commands.append(f"trtllm-serve OUT/engine --backend tensorrt --tokenizer OUT/tokenizer{par}")
    else:
        commands.append(f"trtllm-serve OUT/hf_checkpoint --extra_llm_api_options OUT/engine/llm_api_options.yaml{par}")
    return commands


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
            f"| perplexity | {m['ppl_baseline']['value']:.4f} | {m['ppl_candidate']['value']:.4f} | {_fmt_ci(m[PPL_METRIC])} % |",
        ]
        # One row per other document gate's metric (trtconv.gate.gates), so a new gate shows up here.
        lines += [f"| {g.label} | – | – | {_fmt_ci(m[g.metric])} |" for g in gates_from("documents") if g.metric != PPL_METRIC and g.metric in m]
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
        plot_weight_errors(weight_errors, root / WEIGHT_PLOT, manifest.gates)
    worst_docs = manifest.evaluation.get("worst_documents") or []
    if worst_docs:
        lines += ["## Worst documents by KL", "", "| document | mean KL | tokens |", "|---|---|---|"]
        lines += [f"| `{d['document']}` | {d['mean_kl']:.4g} | {d['tokens']} |" for d in worst_docs]
        lines.append("")
    if token_kl is not None and token_kl.size:
        plot_token_kl(token_kl, root / KL_PLOT, manifest.gates)
        lines += [f"![per-token KL]({KL_PLOT})", ""]
    found = manifest.calibration.get("search")
    if found:
        lines += search_lines(found)
        plot_search(found, root / SEARCH_PLOT, manifest.recipe["evaluate"]["gates"].get("max_kl"))
    advice = manifest.evaluation.get("advice")
    if manifest.status != "passed" and advice and "layers" in advice:
        from trtconv.gate.sensitivity import advice_lines

        q = manifest.recipe["quantization"]
        lines += ["## What to try", ""]
        lines += [f"- {line}" for line in advice_lines(advice, q["exclude"], manifest.recipe["evaluate"]["gates"]["max_kl"])]
        lines += ["", "| decoder layer | KL with only this layer quantized |", "|---|---|"]
        lines += [f"| `{d['layer']}` | {d['kl']:.4g} |" for d in advice["layers"][:10]]
        plot_sensitivity(advice, root / SENSITIVITY_PLOT, manifest.gates)
        lines += ["", f"![per-layer sensitivity]({SENSITIVITY_PLOT})", ""]
    elif manifest.status != "passed" and weight_errors:
        lines += [
            "## What to try",
            "",
            "Exclude the worst layers above (`quantization.exclude`), raise `calibration.num_samples`, "
            "or choose a precision with more bits; then rebuild.",
            "",
        ]
    lines += ["## Serve it", "", "With TensorRT-LLM (OUT is this artifact's folder):", "", "```"] + serve_commands(manifest) + ["```", ""]
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
    for name in PAYLOAD_DIRS:
        d = root / name
        if d.is_dir():
            out[name] = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    return out


def check_junit_path(path: Path) -> None:
    """--junit is written at the end of a run: a path that cannot be written is refused before any
    work (it used to fail only after the whole run). write_junit creates missing folders, so the
    nearest existing one must take a file: tried for real (permission bits do not stop root, a
    read-only or special filesystem does)."""
    import tempfile

    from trtconv.core.errors import ArtifactError

    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"--junit {path} is a folder; give a file path, e.g. {path / 'gates.xml'}")
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    if existing != path and not existing.is_dir():
        raise ArtifactError(f"--junit {path}: {existing} is a file, not a folder; choose another path")
    try:
        if existing == path:
            open(path, "ab").close()  # appends nothing: the file is unchanged
        else:
            tempfile.NamedTemporaryFile(dir=existing, prefix=".trtconv-junit-check-").close()
    except OSError as exc:
        raise ArtifactError(f"--junit {path}: cannot write in {existing} ({exc.strerror}); choose another path") from None


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
