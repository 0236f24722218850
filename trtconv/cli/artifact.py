"""Commands on an artifact that exists: `inspect`, `check`, `verify`, `engine`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from trtconv.artifact.layout import ENGINE_DIR
from trtconv.engine.targets import ENGINE_TARGETS, target_names
from trtconv.cli.options import DeviceOpt, JsonOpt, JunitOpt, QuietOpt, RequireEngineOpt, fail
from trtconv.artifact.signing import PASSWORD_ENV as SIGNING_PASSWORD_ENV
from trtconv.artifact.layout import SIGNATURE_NAME
from trtconv.core.errors import GateFailed, Interrupted, UserError


def inspect(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    json_mode: JsonOpt = False,
) -> None:
    """What an artifact is, how it was made, and its gates.

    Example:

        trtconv inspect out/default
    """
    from trtconv.artifact.manifest import read_manifest
    from trtconv.core.ui import Reporter

    try:
        m = read_manifest(artifact)
    except UserError as exc:
        fail(exc, json_mode)
    if json_mode:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    rep = Reporter()
    out = rep.line
    r = m.recipe
    out(f"{artifact}: {m.status.upper()}{' — ' + m.status_reason if m.status_reason else ''}")
    out(f"  recipe      {r['name']} (sha256 {m.recipe_sha256})")
    src = r["model"].get("path") or r["model"].get("reference") or f"{r['model'].get('hub_id')}@{r['model'].get('revision')}"
    out(f"  model       {src} ({r['model']['dtype']})")
    q = r["quantization"]
    out(f"  precision   {q['precision']}, kv cache {q['kv_cache']}, excluded {q['exclude']}")
    e = r["export"]
    out(f"  export      tp={e['tp_size']} pp={e['pp_size']} dtype={e['dtype']}")
    out(f"  engine      {_engine_line(m)}")
    if m.engine.get("status") == "built" and (Path(artifact) / ENGINE_DIR).is_dir():
        out(f"  loads here  {_engine_loads_here(Path(artifact) / ENGINE_DIR)}")
    out(f"  made        {m.created_utc} by trtconv {m.trtconv_version} on {m.device.get('name')} "
        f"({m.device.get('kind')}{', SM ' + m.device['sm'] if m.device.get('sm') else ''})")
    v = m.versions
    out("  versions    " + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "nvidia-modelopt", "tensorrt_llm") if k in v))
    out(f"  digest      {m.artifact_digest}")
    repairs = m.export.get("config_repairs") or []
    if repairs:
        out("  repairs     " + "; ".join(f"{x['key']}: {x['before']!r} -> {x['after']!r}" for x in repairs))
    # The engine's status is the engine line above (kept current by `trtconv engine`), not a stage row.
    rep.table("stages", ["stage", "status", "wall s", "peak RSS MiB"],
              [[s.name, s.status, f"{s.wall_s:.2f}", f"{s.peak_rss_mib or 0:.0f}"] for s in m.stages if s.name != "engine"])
    if m.gates:
        rep.table("gates", ["gate", "value", "95% interval", "threshold", "verdict"], [_gate_row(x) for x in m.gates])
    out(f"  files       {len(m.outputs)} ({sum(f.size for f in m.outputs) / 2**20:.1f} MiB)")


def _engine_line(m) -> str:
    eng = m.engine
    line = f"{eng.get('target')}: {eng.get('status')}"
    if eng.get("reason"):
        line += f" ({eng['reason']})"
    if eng.get("sm"):
        line += f"; bound to SM {eng['sm']}, TensorRT-LLM {eng.get('tensorrt_llm_version')}, TensorRT {eng.get('tensorrt_version')}"
    stage = next((s for s in m.stages if s.name == "engine"), None)
    if stage is not None and stage.wall_s:
        line += f"; {stage.wall_s:.1f} s"
    return line


def _gate_row(g) -> list[str]:
    ci = f"[{g.ci_low:.4g}, {g.ci_high:.4g}]" if g.ci_low is not None else "n/a"
    return [g.metric, f"{g.value:.4g}", ci, f"{g.comparator} {g.threshold:g}", g.verdict]


def check(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    against: Annotated[Optional[Path], typer.Option("--against", help="A second artifact to compare on the same tokens.")] = None,
    junit: JunitOpt = None,
    device: DeviceOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the accuracy gate again on an existing artifact (exit 1 if a gate fails, or a file no longer matches manifest.json).

    Example (is a second artifact closer to the original on the same tokens?):

        trtconv check out/fp8 --against out/int4 --junit gates.xml
    """
    from trtconv.stages.evaluate import check_artifact
    from trtconv.artifact.report import check_junit_path, write_junit
    from trtconv.core.ui import Reporter

    reporter = Reporter(quiet=quiet, json_mode=json_mode)
    try:
        if junit:
            check_junit_path(junit)  # before minutes of model loading, not after
        mismatched = _files_not_matching([artifact] + ([against] if against else []), reporter)
        with reporter.phase("check"):  # loads both models and re-runs the gate: minutes on a big model
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
            {"artifact": str(r.artifact), "passed": r.passed, "files_match_manifest": not mismatched[r.artifact],
             "mismatched_files": mismatched[r.artifact], "metrics": r.outcome.summary,
             "gates": [g.model_dump(mode="json") for g in r.outcome.gates],
             "worst_layers": r.outcome.record["worst_layers"], "worst_documents": r.outcome.record["worst_documents"]}
            for r in results
        ], indent=2))
    else:
        rows = []
        for metric in ("ppl_baseline", "ppl_candidate", "ppl_increase_pct", "mean_kl", "top1_agreement"):
            cells = []
            for r in results:
                m = r.outcome.summary[metric]
                cells.append(f"{m['value']:.5g}" + (f" [{m['ci_low']:.4g}, {m['ci_high']:.4g}]" if m["ci_low"] is not None else ""))
            rows.append([metric, *cells])
        for i, g in enumerate(main_result.outcome.gates):
            rows.append([f"gate {g.metric}", *[f"{r.outcome.gates[i].verdict} ({g.comparator} {g.threshold:g})" for r in results]])
        reporter.table("check: original vs artifact" + (" vs other" if against else ""),
                       ["metric", *[str(r.artifact) for r in results]], rows)
        for r in results:
            changed = mismatched[r.artifact]
            reporter.line(f"{r.artifact}: " + ("passed" if r.passed and not changed else "FAILED") + (
                f" ({len(changed)} file{'s' if len(changed) > 1 else ''} no longer match manifest.json; the gate "
                f"{'passed' if r.passed else 'failed'} on the files as they are now)" if changed else ""))
            if not r.passed:
                worst = ", ".join(f"{w['layer']} ({w['relative_weight_error']:.3g})" for w in r.outcome.record["worst_layers"][:3])
                reporter.line(f"  worst layers by weight error: {worst}")
    if not main_result.passed or mismatched[main_result.artifact]:
        raise typer.Exit(GateFailed.exit_code)


def _files_not_matching(artifacts: list[Path], reporter) -> dict[Path, list[str]]:
    """`check` judges the files as they are now. Any that no longer match manifest.json (an edit, bit
    rot, damage shared through the cache's hard links) are named before the gate runs, and the
    check fails, so a passing gate is never read as "the artifact that was built passes"."""
    from trtconv.artifact.manifest import read_manifest, verify_files

    found = {}
    for folder in artifacts:
        problems = verify_files(folder, read_manifest(folder))
        for problem in problems:
            reporter.error(f"{folder}: {problem}")
        if problems:
            reporter.warn(f"{folder}: {len(problems)} file(s) no longer match manifest.json; the gate below judges the "
                          "files as they are now, not the artifact that was built")
        found[Path(folder)] = problems
    return found


def _engine_loads_here(engine_dir: Path) -> str:
    """Engines are bound to the GPU SM and the TensorRT / TensorRT-LLM that built them."""
    from trtconv.engine.rebuild import check_engine_compatible
    from trtconv.core.environment import detect_device, package_versions

    try:
        check_engine_compatible(engine_dir, detect_device(), package_versions())
    except UserError as exc:
        return f"no: {exc}"
    return "yes"


DigestOpt = Annotated[Optional[str], typer.Option(
    "--expect-digest", metavar="SHA256",
    help="The artifact_digest you pinned outside the artifact (e.g. from the build job's log or --json output); fail unless it matches.")]
SignatureOpt = Annotated[Optional[Path], typer.Option(
    "--signature", help=f"Signature file (a Sigstore bundle); default: OUT/{SIGNATURE_NAME}.")]


def verify(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    expect_digest: DigestOpt = None,
    allow_failed: Annotated[bool, typer.Option("--allow-failed", help="Accept an intact artifact whose status is failed or incomplete (exit 0, not 4).")] = False,
    signature: SignatureOpt = None,
    public_key: Annotated[Optional[Path], typer.Option("--public-key", help="EC public key (PEM) the signature must be made with; checks the signature.")] = None,
    certificate_chain: Annotated[Optional[list[Path]], typer.Option("--certificate-chain", help="CA certificate(s) (PEM) the signing certificate must chain to; checks the signature. Repeatable.")] = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also re-check the checkpoint format and re-run the accuracy gate.")] = False,
    device: DeviceOpt = "auto",
    json_mode: JsonOpt = False,
) -> None:
    """Re-hash every file against the manifest; fail on any missing, extra or changed file.

    With --json, stdout is one object: artifact, verified, exit_code, status, artifact_digest, files,
    checks, problems (and deep); a usage mistake gives {"error", "exit_code"} as every command does.

    Exit codes: 0 verified; 1 the files, the manifest, the pinned digest or the signature do not match (tampered or damaged); 2 a usage mistake (no artifact, unreadable key); 4 the artifact is intact but its status is not passed (its gate failed), unless --allow-failed.

    Example (CI promoting an artifact made by another job):

        trtconv verify out/ --expect-digest 3f1c…e9 --public-key release.pub
    """
    from trtconv.artifact.manifest import check_integrity, read_manifest
    from trtconv.artifact.signing import SignatureError, verify_signature
    from trtconv.core.ui import Reporter

    reporter = Reporter(json_mode=json_mode)
    result: dict = {"artifact": str(artifact), "verified": False, "exit_code": 0, "status": None, "artifact_digest": None,
                    "files": None, "checks": [], "problems": []}
    try:
        m = read_manifest(artifact)
        result.update(status=m.status, artifact_digest=m.artifact_digest, files=len(m.outputs))
        wanted = _digest_argument(expect_digest)
        problems = check_integrity(artifact, m)
        if wanted is not None and wanted != m.artifact_digest:
            problems.append(f"artifact_digest {m.artifact_digest} is not the expected {wanted}")
        if public_key is not None or certificate_chain or signature is not None:
            try:
                verify_signature(artifact, signature, public_key, certificate_chain)
            except SignatureError as exc:
                problems.append(str(exc))
    except UserError as exc:
        fail(exc, json_mode)
    if problems:
        for p in problems:
            reporter.error(f"{artifact}: {p}")
        _verify_exit(result, SignatureError.exit_code, json_mode, problems=problems)
    checks = ["files match manifest.json"] + (["digest as expected"] if wanted else []) + (
        ["signature valid"] if public_key is not None or certificate_chain else [])
    result.update(verified=True, checks=checks)
    reporter.line(f"verified: {len(m.outputs)} files; " + ", ".join(checks))
    reporter.line(f"artifact_digest: {m.artifact_digest}")
    if m.status != "passed":
        reason = f"{artifact}: status is {m.status}" + (f" ({m.status_reason})" if m.status_reason else "")
        if not allow_failed:
            reporter.error(reason + "; not promoting it (pass --allow-failed to accept it)")
            _verify_exit(result, NOT_PASSED_EXIT, json_mode, problems=[reason])
        reporter.warn(reason)
    if deep:
        from trtconv.stages.evaluate import check_artifact

        try:
            with reporter.phase("deep check"):
                results = check_artifact(artifact, device, reporter)
        except UserError as exc:
            fail(exc, json_mode)
        result["deep"] = {"passed": results[0].passed, "gates": [g.model_dump(mode="json") for g in results[0].outcome.gates]}
        if not results[0].passed:
            failing = ", ".join(f"{g.metric} {g.verdict}" for g in results[0].outcome.gates if g.verdict != "pass")
            reporter.error(f"{artifact}: the accuracy gate fails now: {failing}")
            _verify_exit(result, 1, json_mode, problems=[f"the accuracy gate fails now: {failing}"])
        reporter.line("deep: checkpoint format valid, accuracy gate passes again")
    _verify_exit(result, 0, json_mode)


def _verify_exit(result: dict, code: int, json_mode: bool, problems: list[str] = ()) -> None:
    """verify's one way out: with --json its object on stdout; a non-zero code exits."""
    result.update(exit_code=code, problems=[*result["problems"], *problems])
    if json_mode:
        print(json.dumps(result, indent=2))
    if code:
        raise typer.Exit(code)


# `verify`: the artifact is intact, but its gate failed (or the run was incomplete).
NOT_PASSED_EXIT = 4


def _digest_argument(text: str | None) -> str | None:
    if text is None:
        return None
    digest = text.strip().lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(f"--expect-digest {text!r}: expected the 64 hex characters of a sha256 artifact_digest")
    return digest


def sign(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv.")],
    key: Annotated[Path, typer.Option("--key", help=f"EC private key (PEM, P-256/384/521); encrypted keys read their password from ${SIGNING_PASSWORD_ENV}.")],
    certificate: Annotated[Optional[Path], typer.Option("--certificate", help="Signing certificate (PEM) for --key; the signature then carries it and its chain.")] = None,
    chain: Annotated[Optional[list[Path]], typer.Option("--chain", help="Intermediate/CA certificate(s) (PEM) of --certificate. Repeatable.")] = None,
    signature: SignatureOpt = None,
    allow_failed: Annotated[bool, typer.Option("--allow-failed", help="Sign even though the artifact's status is not passed.")] = False,
) -> None:
    """Sign every file of an artifact, manifest.json included (OpenSSF model-signing; offline).

    The artifact must be intact (what `verify` checks) and, unless --allow-failed, passed. `trtconv engine` changes the artifact: sign after it.

    Example:

        trtconv sign out/ --key release.key.pem
        trtconv verify out/ --public-key release.pub.pem
    """
    from trtconv.artifact.manifest import check_integrity, read_manifest
    from trtconv.artifact.signing import sign_artifact
    from trtconv.core.ui import Reporter

    reporter = Reporter()
    if chain and certificate is None:
        fail(UserError("--chain needs --certificate (the signing certificate the chain belongs to)"))
    try:
        m = read_manifest(artifact)
        problems = check_integrity(artifact, m)
        if problems:
            raise UserError(f"{artifact} does not match its manifest ({'; '.join(problems)}); refusing to sign it")
        if m.status != "passed" and not allow_failed:
            raise UserError(f"{artifact}: status is {m.status}; refusing to sign it (pass --allow-failed to sign anyway)")
        path = sign_artifact(artifact, key, signature, certificate, chain)
    except UserError as exc:
        fail(exc)
    reporter.line(f"signed: {len(m.outputs) + 1} files (manifest.json included), artifact_digest {m.artifact_digest}")
    reporter.line(f"signature: {path}")


def engine(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by trtconv build/calibrate.")],
    target: Annotated[Optional[str], typer.Option("--target", help=f"{target_names()}; default: the recipe's engine.target.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Build even though the artifact's accuracy gate failed.")] = False,
    require_engine: RequireEngineOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """(Re)build the engine of an existing artifact, e.g. on the GPU after a CPU job made the checkpoint.

    The manifest is rewritten only when the artifact's files changed (a signature made before must then be made again: `trtconv sign`).

    Example (on the GPU host the engine will serve on):

        trtconv verify out/ && trtconv engine out/ --require-engine
    """
    import time

    from trtconv.artifact.manifest import StageRecord, artifact_digest, hash_tree, read_manifest, write_manifest
    from trtconv.core.ui import Reporter
    from trtconv.engine.rebuild import rebuild_engine_for_artifact

    reporter = Reporter(json_mode=json_mode)
    if target is not None and target not in ENGINE_TARGETS:
        fail(UserError(f"--target {target!r}: allowed: {target_names(', ')}"), json_mode)
    started = time.monotonic()
    try:
        manifest = read_manifest(artifact)
        record = rebuild_engine_for_artifact(artifact, force=force, require=require_engine, target=target)
    except UserError as exc:
        fail(exc, json_mode)
    outputs = hash_tree(artifact)
    changed = outputs != manifest.outputs
    if changed:
        # The artifact changed: its manifest records the new engine, its stage, files and digest.
        manifest.engine = record.model_dump(mode="json")
        status = {"built": "ok", "not_built": "not_built", "failed": "failed"}[record.status]
        stage = StageRecord(name="engine", status=status, wall_s=round(time.monotonic() - started, 3), details={"target": record.target})
        manifest.stages = [s for s in manifest.stages if s.name != "engine"] + [stage]
        manifest.outputs = outputs
        manifest.artifact_digest = artifact_digest(outputs)
        manifest.command = manifest.command + ["&&", "trtconv", *sys.argv[1:]]
        write_manifest(manifest, artifact)
        if (Path(artifact) / SIGNATURE_NAME).is_file():
            reporter.warn(f"{Path(artifact) / SIGNATURE_NAME} was made before this engine and no longer verifies: sign again")
    if json_mode:
        print(json.dumps(record.model_dump(mode="json"), indent=2))
    else:
        reporter.line(f"engine ({record.target}): {record.status}" + (f" — {record.reason}" if record.reason else ""))
        if record.command:
            reporter.line("command: " + shlex.join(record.command))
        reporter.line(f"{artifact / 'manifest.json'}: " + ("updated" if changed else "unchanged (nothing was built)"))
    if record.status == "failed":
        raise typer.Exit(1)
