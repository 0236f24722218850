"""The command line. It only builds a recipe and hands it to the pipeline (`--dry-run` prints it).

Exit codes: 0 every stage ran and every gate passed; 1 an accuracy gate failed (artifact written,
marked failed); 2 a user mistake (recipe, paths, data, model); 3 an engine was required but could
not be built here; 130 interrupted. User mistakes print one message, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from trtconv.errors import GateFailed, Interrupted, UserError

app = typer.Typer(
    name="trtconv",
    help="Hugging Face checkpoint -> ModelOpt calibration -> TensorRT-LLM artifact, from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="List, show, validate shipped and local recipes; write the JSON Schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def _register_sub_apps() -> None:
    from trtconv.cache import cache_app
    from trtconv.datapack import data_app

    app.add_typer(data_app, name="data")
    app.add_typer(cache_app, name="cache")


_register_sub_apps()

OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to write (written atomically).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: KEY.PATH=VALUE (YAML value). Repeatable.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe as YAML and exit.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact in OUT (a failed run keeps it).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the final result.")]
RequireEngineOpt = Annotated[bool, typer.Option("--require-engine", help="Fail (exit 3) if the engine cannot be built here.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
ReproOpt = Annotated[bool, typer.Option("--repro-check", help="Calibrate and export twice; report any tensor that differs.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither reuse nor store stage results (also: TRTCONV_NO_CACHE=1).")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Write each accuracy gate as a JUnit test case to this file.")]


def _fail(err: UserError, json_mode: bool = False) -> None:
    from trtconv.ui import Reporter

    Reporter(json_mode=json_mode).error(str(err))
    raise typer.Exit(getattr(err, "exit_code", 2))


def _summary(outcome) -> dict:
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
        "stages": [{"name": s.name, "status": s.status, "wall_s": s.wall_s, "peak_rss_mib": s.peak_rss_mib} for s in m.stages],
    }


def _print_result(outcome, reporter, json_mode: bool) -> None:
    from rich.table import Table

    m = outcome.manifest
    if json_mode:
        print(json.dumps(_summary(outcome), indent=2))
        return
    table = Table(title=f"accuracy gate: {m.status.upper()}", show_lines=False)
    for col in ("gate", "value", "95% interval", "threshold", "verdict"):
        table.add_column(col)
    for g in m.gates:
        ci = f"[{g.ci_low:.4g}, {g.ci_high:.4g}]" if g.ci_low is not None else "n/a"
        table.add_row(g.metric, f"{g.value:.4g}", ci, f"{g.comparator} {g.threshold:g}", g.verdict)
    if m.gates:
        reporter.console.print(table)
    if m.metrics:
        ppl_b, ppl_c = m.metrics["ppl_baseline"]["value"], m.metrics["ppl_candidate"]["value"]
        reporter.console.print(f"perplexity: original {ppl_b:.4f} -> artifact {ppl_c:.4f}", markup=False)
    eng = m.engine
    if eng.get("target") not in (None, "none"):
        reporter.console.print(f"engine ({eng.get('target')}): {eng.get('status')} {eng.get('reason') or ''}", markup=False)
    reporter.console.print(f"{m.status}: {outcome.path} (digest {m.artifact_digest[:16]}…)", markup=False)


def _run_build(recipe, out: Path, force: bool, require_engine: bool, device: str, json_mode: bool, quiet: bool, junit=None,
               no_cache: bool = False, repro_check: bool = False) -> None:
    import os

    from trtconv.pipeline import BuildOptions, build
    from trtconv.ui import Reporter

    reporter = Reporter(quiet=quiet, json_mode=json_mode)
    opts = BuildOptions(
        out=out, force=force, require_engine=require_engine, device=device, command=["trtconv", *sys.argv[1:]], junit=junit,
        no_cache=no_cache or os.environ.get("TRTCONV_NO_CACHE", "").lower() in ("1", "true", "yes"),
        repro_check=repro_check,
    )
    try:
        outcome = build(recipe, opts, reporter)
    except GateFailed as exc:
        outcome = exc.args[0]
        _print_result(outcome, reporter, json_mode)
        reporter.error(f"{outcome.manifest.status_reason}; the failed artifact is in {outcome.path}")
        raise typer.Exit(GateFailed.exit_code)
    except Interrupted as exc:
        reporter.error(str(exc))
        raise typer.Exit(Interrupted.exit_code)
    except UserError as exc:
        _fail(exc, json_mode)
    _print_result(outcome, reporter, json_mode)


@app.command()
def build(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe (see `trtconv recipe list`).")] = "default",
    output: OutOpt = Path("out"),
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    require_engine: RequireEngineOpt = False,
    device: DeviceOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    junit: JunitOpt = None,
    no_cache: NoCacheOpt = False,
    repro_check: ReproOpt = False,
) -> None:
    """Run the whole pipeline from a recipe; exit 0 only if every stage ran and every gate passed."""
    from trtconv.recipe import load_recipe

    try:
        r, _path = load_recipe(recipe, set_ or [])
    except UserError as exc:
        _fail(exc, json_mode)
    if dry_run:
        print(r.resolved().to_yaml(), end="")
        return
    _run_build(r, output, force, require_engine, device, json_mode, quiet, junit, no_cache, repro_check)


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option("--model", help="Local Hugging Face checkpoint folder.")],
    precision: Annotated[str, typer.Option("--precision", help="none, fp8, int8_sq, int4_awq, w4a8_awq.")],
    output: OutOpt,
    kv_cache: Annotated[str, typer.Option("--kv-cache", help="none or fp8.")] = "none",
    data: Annotated[Optional[Path], typer.Option("--data", help="Calibration text (.jsonl/.txt/folder); default: built-in pack.")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 1234,
    tp_size: Annotated[int, typer.Option("--tp-size")] = 1,
    hf_checkpoint: Annotated[bool, typer.Option("--hf-checkpoint", help="Also write the unified HF checkpoint.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Load dtype: bfloat16, float16, float32.")] = "bfloat16",
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    junit: JunitOpt = None,
    no_cache: NoCacheOpt = False,
) -> None:
    """Calibrate + export + evaluate with flags instead of a recipe (a recipe is built internally)."""
    from trtconv.recipe import recipe_from_dict

    data_dict = {
        "name": f"{Path(model).name}-{precision}",
        "description": "built by `trtconv calibrate`",
        "model": {"path": str(model), "dtype": dtype},
        "quantization": {"precision": precision, "kv_cache": kv_cache},
        "calibration": {"data": str(data) if data else None, "num_samples": num_samples, "seq_len": seq_len,
                        "batch_size": batch_size, "seed": seed},
        "export": {"tp_size": tp_size, "hf_checkpoint": hf_checkpoint},
    }
    try:
        r = recipe_from_dict(data_dict, set_ or [], source="trtconv calibrate flags")
    except UserError as exc:
        _fail(exc, json_mode)
    if dry_run:
        print(r.resolved().to_yaml(), end="")
        return
    _run_build(r, output, force, False, device, json_mode, quiet, junit, no_cache)


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    json_mode: JsonOpt = False,
) -> None:
    """What an artifact is, how it was made, and its gates."""
    from rich.console import Console
    from rich.table import Table

    from trtconv.manifest import read_manifest

    try:
        m = read_manifest(artifact)
    except UserError as exc:
        _fail(exc, json_mode)
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
    if eng.get("status") == "built" and (Path(artifact) / "engine").is_dir():
        c.print(f"  loads here  {_engine_loads_here(Path(artifact) / 'engine')}", markup=False)
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


@app.command()
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

    from trtconv.check import check_artifact
    from trtconv.report import write_junit
    from trtconv.ui import Reporter

    reporter = Reporter(quiet=quiet, json_mode=json_mode)
    try:
        results = check_artifact(artifact, device, reporter, against)
    except UserError as exc:
        _fail(exc, json_mode)
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
    from trtconv.engine import check_engine_compatible
    from trtconv.environment import detect_device, package_versions

    try:
        check_engine_compatible(engine_dir, detect_device(), package_versions())
    except UserError as exc:
        return f"no: {exc}"
    return "yes"


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    deep: Annotated[bool, typer.Option("--deep", help="Also re-check the checkpoint format and re-run the accuracy gate.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Re-hash every file against the manifest; fail on any missing, extra or changed file."""
    from trtconv.manifest import artifact_digest, read_manifest, verify_files
    from trtconv.ui import Reporter

    reporter = Reporter()
    try:
        m = read_manifest(artifact)
    except UserError as exc:
        _fail(exc)
    problems = verify_files(artifact, m)
    if artifact_digest(m.outputs) != m.artifact_digest:
        problems.append("manifest: artifact_digest does not match its own file list (the manifest was edited)")
    if problems:
        for p in problems:
            reporter.error(f"{artifact}: {p}")
        raise typer.Exit(1)
    reporter.console.print(f"verified: {len(m.outputs)} files match {artifact / 'manifest.json'} (digest {m.artifact_digest})", markup=False)
    if deep:
        from trtconv.check import check_artifact

        try:
            results = check_artifact(artifact, device, reporter)
        except UserError as exc:
            _fail(exc)
        if not results[0].passed:
            reporter.error(f"{artifact}: the accuracy gate fails now: " + ", ".join(
                f"{g.metric} {g.verdict}" for g in results[0].outcome.gates if g.verdict != "pass"))
            raise typer.Exit(1)
        reporter.console.print("deep: checkpoint format valid, accuracy gate passes again", markup=False)


@app.command()
def engine(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv build/calibrate.")],
    target: Annotated[Optional[str], typer.Option("--target", help="tensorrt or pytorch; default: the recipe's engine.target.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Build even though the artifact's accuracy gate failed.")] = False,
    require_engine: RequireEngineOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """(Re)build the engine of an existing artifact, e.g. on the GPU after a CPU job made the checkpoint."""
    from trtconv.engine import rebuild_engine_for_artifact
    from trtconv.manifest import artifact_digest, hash_tree, read_manifest, write_manifest
    from trtconv.ui import Reporter

    reporter = Reporter(json_mode=json_mode)
    if target not in (None, "tensorrt", "pytorch"):
        _fail(UserError(f"--target {target!r}: allowed: tensorrt, pytorch"), json_mode)
    try:
        manifest = read_manifest(artifact)
        record = rebuild_engine_for_artifact(artifact, force=force, require=require_engine, target=target)
    except UserError as exc:
        _fail(exc, json_mode)
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


@app.command()
def doctor(
    recipe: Annotated[Optional[str], typer.Argument(help="Also check that this recipe can run here.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """This machine vs what trtconv (and a recipe) needs: GPU, SM, packages, TensorRT-LLM, cache."""
    from trtconv.doctor import run_doctor

    ok, report = run_doctor(recipe)
    if json_mode:
        print(json.dumps(report, indent=2))
    else:
        for check in report["checks"]:
            mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[check["status"]]
            print(f"[{mark}] {check['name']}: {check['detail']}")
    if not ok:
        raise typer.Exit(2)


@recipe_app.command("list")
def recipe_list() -> None:
    """The shipped recipes."""
    from trtconv.recipe import builtin_recipe_names, builtin_recipes_dir, load_recipe

    for name in builtin_recipe_names():
        r, _ = load_recipe(str(builtin_recipes_dir() / f"{name}.yaml"))
        print(f"{name:28s} {r.quantization.precision:9s} kv={r.quantization.kv_cache:5s} {r.description}")


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.")],
    set_: SetOpt = None,
) -> None:
    """Print a recipe with every default made explicit (what a build would run)."""
    from trtconv.recipe import load_recipe

    try:
        r, _ = load_recipe(recipe, set_ or [])
    except UserError as exc:
        _fail(exc)
    print(r.resolved().to_yaml(), end="")


@recipe_app.command("validate")
def recipe_validate(recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")]) -> None:
    """Check recipes against the schema; exit 2 if any is invalid."""
    from trtconv.recipe import load_recipe
    from trtconv.ui import Reporter

    rep = Reporter()
    bad = 0
    for ref in recipes:
        try:
            _r, path = load_recipe(ref)
            print(f"ok: {path}")
        except UserError as exc:
            rep.error(str(exc))
            bad += 1
    if bad:
        raise typer.Exit(2)


@recipe_app.command("schema")
def recipe_schema(output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file.")] = None) -> None:
    """The recipe JSON Schema (for editors: yaml-language-server, VS Code)."""
    from trtconv.recipe import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        print(text, end="")


@app.command()
def version() -> None:
    """Print trtconv's and its key dependencies' versions."""
    from trtconv.environment import package_versions

    print(yaml.safe_dump(package_versions(), sort_keys=False), end="")


def main() -> None:
    # Offline first: no Hub dataset look-ups unless the user asks for one by name.
    app()


if __name__ == "__main__":
    main()
