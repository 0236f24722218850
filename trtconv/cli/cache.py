"""`trtconv cache ls | du | prune`: the stage cache's entries, sizes and pruning."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Annotated, Optional

import typer

from trtconv.cache.store import (MAX_SIZE_ENV, REFERENCE_MODELS_SUBDIR, STAGES_SUBDIR, CacheError, ListedEntry, cache_root, human_size,
                                 list_entries, max_size_setting, parse_size, plan_prune, prune, unique_sizes)

# ---------------------------------------------------------------------------------------------
# CLI: registered by trtconv.cli.app as `trtconv cache`

cache_app = typer.Typer(
    name="cache",
    help="List, measure and prune trtconv's cache ($TRTCONV_CACHE or the platform cache folder).",
    no_args_is_help=True,
    epilog="Example: trtconv cache prune --older-than 30 --dry-run",
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def _echo(text: str) -> None:
    typer.echo(text)


def _error(err: CacheError, as_json: bool = False) -> None:
    typer.echo(f"error: {err}", err=True)
    if as_json:
        typer.echo(json.dumps({"error": str(err), "exit_code": err.exit_code}))
    raise typer.Exit(err.exit_code)


def _short_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table(entries: list[ListedEntry]) -> list[str]:
    lines = [f"{'KIND':<16} {'STAGE':<20} {'KEY':<12} {'SIZE':>10}  {'CREATED (UTC)':<16}  {'LAST USED (UTC)':<16}  PATH"]
    for e in entries:
        lines.append(
            f"{e.kind:<16} {e.stage:<20} {e.key[:12]:<12} {human_size(e.size):>10}  "
            f"{_short_time(e.created):<16}  {_short_time(e.last_used):<16}  {e.path}"
        )
    return lines


def cache_stages(root) -> list[str]:
    """What --stage takes: the stages trtconv caches (each module names its own folder), any stage
    folder already in this cache, and the reference models."""
    from trtconv.cache.runs import RUN_STAGE
    from trtconv.stages.evaluate import EVALUATE_STAGE
    from trtconv.stages.export import EXPORT_STAGE

    stages_dir = root / STAGES_SUBDIR
    present = {p.name for p in stages_dir.iterdir() if p.is_dir()} if stages_dir.is_dir() else set()
    return sorted({EXPORT_STAGE, EVALUATE_STAGE, RUN_STAGE} | present) + [REFERENCE_MODELS_SUBDIR]


@cache_app.command("ls")
def ls_command(as_json: JsonFlag = False) -> None:
    """Every cache entry, least recently used first: kind, stage, key prefix, size, created, last used, path.

    Example:

        trtconv cache ls --json
    """
    root = cache_root()
    entries = list_entries(root)
    if as_json:
        _echo(json.dumps({"root": str(root), "entries": [e.to_json() for e in entries]}, indent=2))
        return
    typer.echo(f"cache: {root}", err=True)
    if not entries:
        typer.echo("(empty)", err=True)
        return
    for line in _table(entries):
        _echo(line)


@cache_app.command("du")
def du_command(as_json: JsonFlag = False) -> None:
    """Disk use: the total, and per stage / reference models / temporary leftovers (a hard-linked file counts once).

    Example:

        trtconv cache du
    """
    root = cache_root()
    groups: dict[str, dict[str, int]] = {}
    entries = list_entries(root)
    for e, size in zip(entries, unique_sizes(entries), strict=True):  # hard-linked files (run and export entries) once
        name = {"stage": e.stage, "reference-model": REFERENCE_MODELS_SUBDIR, "temporary": "temporary"}[e.kind]
        group = groups.setdefault(name, {"entries": 0, "size": 0})
        group["entries"] += 1
        group["size"] += size
    total = sum(g["size"] for g in groups.values())
    try:
        limit = max_size_setting()
    except CacheError as err:
        _error(err)
    bounded = total - groups.get(REFERENCE_MODELS_SUBDIR, {}).get("size", 0)  # what max_size bounds
    if as_json:
        _echo(json.dumps({"root": str(root), "total": total, "groups": groups,
                          "max_size": limit, "bounded": bounded}, indent=2))
        return
    typer.echo(f"cache: {root}", err=True)
    for name, g in sorted(groups.items()):
        _echo(f"{human_size(g['size']):>10}  {g['entries']:>4}  {name}")
    _echo(f"{human_size(total):>10}  {sum(g['entries'] for g in groups.values()):>4}  total")
    _echo(f"stage entries {human_size(bounded)} of max_size {human_size(limit)} ({MAX_SIZE_ENV}; least recently used "
          "entries are evicted after each store; reference models are not counted)")


@cache_app.command("prune")
def prune_command(
    older_than: Annotated[Optional[float], typer.Option("--older-than", help="Remove entries last used more than DAYS ago (DAYS >= 0).", metavar="DAYS", min=0)] = None,
    max_size: Annotated[Optional[str], typer.Option("--max-size", help="Remove least recently used entries until the rest fits, e.g. 10G.")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Only this stage ('reference-models' for the reference models).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry in scope.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be removed; remove nothing.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Remove entries (least recently used first); entries a running build has locked are kept.

    Example:

        trtconv cache prune --older-than 30 --max-size 50G --dry-run
    """
    try:
        if older_than is None and max_size is None and not everything:
            raise CacheError("say what to prune: --older-than DAYS, --max-size SIZE or --all (add --dry-run to preview)")
        limit = parse_size(max_size) if max_size is not None else None
        root = cache_root()
        if stage is not None and stage not in cache_stages(root):
            raise CacheError(f"--stage {stage!r} is not a stage of this cache ({root}); allowed: {', '.join(cache_stages(root))}")
    except CacheError as err:
        _error(err, as_json)
    candidates = plan_prune(list_entries(root), older_than_days=older_than, max_size=limit, stage=stage, everything=everything)
    plan = prune(candidates, dry_run=dry_run)
    if as_json:
        _echo(json.dumps({
            "root": str(root),
            "dry_run": dry_run,
            "removed": [e.to_json() for e in plan.remove],
            "kept_in_use": [e.to_json() for e in plan.kept_in_use],
            "freed": plan.freed,
        }, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for e in plan.remove:
        _echo(f"{verb} {e.kind} {e.stage} {e.key[:12]} ({human_size(e.size)})")
    for e in plan.kept_in_use:
        _echo(f"kept {e.kind} {e.stage} {e.key[:12]}: in use by a running build")
    _echo(f"{verb} {len(plan.remove)} entries, {human_size(plan.freed)}" + (" (dry run)" if dry_run else ""))
