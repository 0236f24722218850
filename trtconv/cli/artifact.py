"""Commands on an artifact that exists: `inspect`, `check`, `verify`, `engine`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from trtconv.artifact.layout import ENGINE_DIR
from trtconv.engine.targets import ENGINE_TARGETS, target_names
from trtconv.cli.options import DeviceOpt, JsonOpt, JunitOpt, QuietOpt, RequireEngineOpt, fail
from trtconv.core.errors import GateFailed, Interrupted, UserError


def inspect(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    json_mode: JsonOpt = False,
) -> None:
    """What an artifact is, how it was made, and its gates."""
    from rich.console import Console
    from rich.table import Table

    from trtconv.artifact.manifest import read_manifest

    try:
        m = read_manifest(artifact)
    except UserError as exc:
        fail(exc, json_mode)
    if json_mode:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    c = Console(highlight=False)
    r = m.recipe
    c.print(f"[bold]{artifact}[/bold]: {m.status.upper()}{' — ' + m.status_reason if m.status_reason else ''}")
    c.print(f"  recipe      {r['name']} (sha256 {m.recipe_sha256[:16]}…)", markup=False)
    src = r["model"].get("path") or r["model"].get("reference") or f"{r['model'].get('hub_id')}@{r['model'].get('revision')}"
    c.print(f"  model       {src} ({r['model']['dtype']})", markup=False)
    q = r["quantization"]
    c.print(f"  precision   {q['precision']}, kv cache {q['kv_cache']}, excluded {q['exclude']}", markup=False)
    e = r["export"]
    c.print(f"  export      tp={e['tp_size']} pp={e['pp_size']} dtype={e['dtype']}", markup=False)
    eng = m.engine
    line = f"{eng.get('target')}: {eng.get('status')}"
    if eng.get("reason"):
        line += f" ({eng['reason']})"
    if eng.get("sm"):
        line += f"; bound to SM {eng['sm']}, TensorRT-LLM {eng.get('tensorrt_llm_version')}, TensorRT {eng.get('tensorrt_version')}"
    c.print(f"  engine      {line}", markup=False)
    if eng.get("status") == "built" and (Path(artifact) / ENGINE_DIR).is_dir():
        c.print(f"  loads here  {_engine_loads_here(Path(artifact) / ENGINE_DIR)}", markup=False)
    c.print(f"  made        {m.created_utc} by trtconv {m.trtconv_version} on {m.device.get('name')} "
            f"({m.device.get('kind')}{', SM ' + m.device['sm'] if m.device.get('sm') else ''})", markup=False)
    v = m.versions
    c.print("  versions    " + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "nvidia-modelopt", "tensorrt_llm") if k in v), markup=False)
    c.print(f"  digest      {m.artifact_digest}", markup=False)
    repairs = m.export.get("config_repairs") or []
    if repairs:
        c.print("  repairs     " + "; ".join(f"{x['key']}: {x['before']!r} -> {x['after']!r}" for x in repairs), markup=False)
    t = Table(title="stages")
    for col in ("stage", "status", "wall s", "peak RSS MiB"):
        t.add_column(col)
    for s in m.stages:
        t.add_row(s.name, s.status, f"{s.wall_s:.2f}", f"{s.peak_rss_mib or 0:.0f}")
    c.print(t)
    if m.gates:
        g = Table(title="gates")
        for col in ("gate", "value", "95% interval", "threshold", "verdict"):
            g.add_column(col)
        for x in m.gates:
            ci = f"[{x.ci_low:.4g}, {x.ci_high:.4g}]" if x.ci_low is not None else "n/a"
            g.add_row(x.metric, f"{x.value:.4g}", ci, f"{x.comparator} {x.threshold:g}", x.verdict)
        c.print(g)
    c.print(f"  files       {len(m.outputs)} ({sum(f.size for f in m.outputs) / 2**20:.1f} MiB)", markup=False)


def check(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    against: Annotated[Optional[Path], typer.Option("--against", help="A second artifact to compare on the same tokens.")] = None,
    junit: JunitOpt = None,
    device: DeviceOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the accuracy gate again on an existing artifact (exit 1 if a gate fails)."""
    from rich.table import Table

    from trtconv.stages.evaluate import check_artifact
    from trtconv.artifact.report import write_junit
    from trtconv.core.ui import Reporter

    reporter = Reporter(quiet=quiet, json_mode=json_mode)
    try:
        results = check_artifact(artifact, device, reporter, against)
    except UserError as exc:
        fail(exc, json_mode)
    except KeyboardInterrupt:
        reporter.error("interrupted")
        raise typer.Exit(Interrupted.exit_code)
    main_result = results[0]
    recipe = main_result.manifest.recipe
    if junit:
        write_junit(junit, main_result.outcome.gates, recipe["name"], recipe["evaluate"]["allow_inconclusive"])
    if json_mode:
        print(json.dumps([
            {"artifact": str(r.artifact), "passed": r.passed, "metrics": r.outcome.summary,
             "gates": [g.model_dump(mode="json") for g in r.outcome.gates],
             "worst_layers": r.outcome.record["worst_layers"], "worst_documents": r.outcome.record["worst_documents"]}
            for r in results
        ], indent=2))
    else:
        t = Table(title="check: original vs artifact" + (" vs other" if against else ""))
        t.add_column("metric")
        for r in results:
            t.add_column(str(r.artifact))
        for metric in ("ppl_baseline", "ppl_candidate", "ppl_increase_pct", "mean_kl", "top1_agreement"):
            cells = []
            for r in results:
                m = r.outcome.summary[metric]
                cells.append(f"{m['value']:.5g}" + (f" [{m['ci_low']:.4g}, {m['ci_high']:.4g}]" if m["ci_low"] is not None else ""))
            t.add_row(metric, *cells)
        for i, g in enumerate(main_result.outcome.gates):
            cells = [f"{r.outcome.gates[i].verdict} ({g.comparator} {g.threshold:g})" for r in results]
            t.add_row(f"gate {g.metric}", *cells)
        reporter.console.print(t)
        for r in results:
            reporter.console.print(f"{r.artifact}: {'passed' if r.passed else 'FAILED'}", markup=False)
            if not r.passed:
                worst = ", ".join(f"{w['layer']} ({w['relative_weight_error']:.3g})" for w in r.outcome.record["worst_layers"][:3])
                reporter.console.print(f"  worst layers by weight error: {worst}", markup=False)
    if not main_result.passed:
        raise typer.Exit(GateFailed.exit_code)


def _engine_loads_here(engine_dir: Path) -> str:
    """Engines are bound to the GPU SM and the TensorRT / TensorRT-LLM that built them."""
    from trtconv.engine.rebuild import check_engine_compatible
    from trtconv.core.environment import detect_device, package_versions

    try:
        check_engine_compatible(engine_dir, detect_device(), package_versions())
    except UserError as exc:
        return f"no: {exc}"
    return "yes"


def verify(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    deep: Annotated[bool, typer.Option("--deep", help="Also re-check the checkpoint format and re-run the accuracy gate.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Re-hash every file against the manifest; fail on any missing, extra or changed file."""
    from trtconv.artifact.manifest import artifact_digest, read_manifest, verify_files
    from trtconv.core.ui import Reporter

    reporter = Reporter()
    try:
        m = read_manifest(artifact)
    except UserError as exc:
        fail(exc)
    problems = verify_files(artifact, m)
    if artifact_digest(m.outputs) != m.artifact_digest:
        problems.append("manifest: artifact_digest does not match its own file list (the manifest was edited)")
    if problems:
        for p in problems:
            reporter.error(f"{artifact}: {p}")
        raise typer.Exit(1)
    reporter.console.print(f"verified: {len(m.outputs)} files match {artifact / 'manifest.json'} (digest {m.artifact_digest})", markup=False)
    if deep:
        from trtconv.stages.evaluate import check_artifact

        try:
            results = check_artifact(artifact, device, reporter)
        except UserError as exc:
            fail(exc)
        if not results[0].passed:
            reporter.error(f"{artifact}: the accuracy gate fails now: " + ", ".join(
                f"{g.metric} {g.verdict}" for g in results[0].outcome.gates if g.verdict != "pass"))
            raise typer.Exit(1)
        reporter.console.print("deep: checkpoint format valid, accuracy gate passes again", markup=False)


def engine(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv build/calibrate.")],
    target: Annotated[Optional[str], typer.Option("--target", help=f"{target_names()}; default: the recipe's engine.target.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Build even though the artifact's accuracy gate failed.")] = False,
    require_engine: RequireEngineOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """(Re)build the engine of an existing artifact, e.g. on the GPU after a CPU job made the checkpoint."""
    from trtconv.engine.rebuild import rebuild_engine_for_artifact
    from trtconv.artifact.manifest import artifact_digest, hash_tree, read_manifest, write_manifest
    from trtconv.core.ui import Reporter

    reporter = Reporter(json_mode=json_mode)
    if target is not None and target not in ENGINE_TARGETS:
        fail(UserError(f"--target {target!r}: allowed: {target_names(', ')}"), json_mode)
    try:
        manifest = read_manifest(artifact)
        record = rebuild_engine_for_artifact(artifact, force=force, require=require_engine, target=target)
    except UserError as exc:
        fail(exc, json_mode)
    # The artifact changed: its manifest records the new engine, files and digest.
    manifest.engine = record.model_dump(mode="json")
    manifest.outputs = hash_tree(artifact)
    manifest.artifact_digest = artifact_digest(manifest.outputs)
    manifest.command = manifest.command + ["&&", "trtconv", *sys.argv[1:]]
    write_manifest(manifest, artifact)
    if json_mode:
        print(json.dumps(record.model_dump(mode="json"), indent=2))
    else:
        reporter.console.print(f"engine ({record.target}): {record.status}" + (f" — {record.reason}" if record.reason else ""), markup=False)
        if record.command:
            reporter.console.print("command: " + " ".join(record.command), markup=False)
    if record.status == "failed":
        raise typer.Exit(1)


