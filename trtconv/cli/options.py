"""Flags shared by several commands, and the one printer of user errors (exit code from the error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to write (written atomically).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: KEY.PATH=VALUE (YAML value). Repeatable.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe as YAML and exit.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact in OUT (a failed run keeps it).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the final result.")]
RequireEngineOpt = Annotated[bool, typer.Option("--require-engine", help="Fail (exit 3) if the engine cannot be built here.")]
Device = Literal["auto", "cpu", "cuda"]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
ReproOpt = Annotated[bool, typer.Option("--repro-check", help="Calibrate and export twice; report any tensor that differs.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither reuse nor store stage results (also: TRTCONV_NO_CACHE=1).")]
MaxGpuMemOpt = Annotated[Optional[float], typer.Option(
    "--max-gpu-memory", min=0.01,
    help="Cap on GPU memory in GiB: enforced on CUDA; decides layer streaming (calibration.streaming: auto) everywhere.")]
GpusOpt = Annotated[int, typer.Option(
    "--gpus", min=1,
    help="GPUs of this host to split the layer-streamed calibration, export and evaluation over (the artifact's bytes "
         "are those of --gpus 1; see docs/performance.md, 'Several GPUs').")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Write each accuracy gate as a JUnit test case to this file.")]


def fail(err: Exception, json_mode: bool = False) -> None:
    """Print a user error (stderr) and exit with its code; with --json also {"error", "exit_code"} on stdout."""
    from trtconv.core.ui import Reporter

    code = getattr(err, "exit_code", 2)
    Reporter(json_mode=json_mode).error(str(err))
    if json_mode:
        print(json.dumps({"error": str(err), "exit_code": code}))
    raise typer.Exit(code)


