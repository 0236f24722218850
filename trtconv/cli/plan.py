"""`trtconv plan`: will this recipe fit, from config.json alone, before any work (exit 4 when not)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from trtconv.cli.options import JsonOpt, MaxGpuMemOpt, SetOpt, fail
from trtconv.core.errors import UserError

GpuOpt = Annotated[Optional[str], typer.Option("--gpu", help="A GPU of the catalogue (e.g. h100-80gb, h200-141gb, a100-80gb, "
                                                             "l40s-48gb); default: the GPU detected here, else h100-80gb.")]
GpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="GPUs available to serve the engine.")]


def plan(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")] = "default",
    gpu: GpuOpt = None,
    gpus: GpusOpt = 1,
    max_gpu_memory: MaxGpuMemOpt = None,
    set_: SetOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Predict weight bytes, peak GPU/host memory and disk per stage, and serving memory; exit 4 if something does not fit.

    Example (will a 70B FP8 conversion fit one H200, and what serves it?):

        trtconv plan my-70b-fp8.yaml --gpu h200-141gb --json
    """
    from trtconv.memory_plan import EXIT_DOES_NOT_FIT, describe, model_config, plan_for_gpu
    from trtconv.recipe.schema import load_recipe

    try:
        r, _path = load_recipe(recipe, set_ or [])
        r = r.resolved()
        result = plan_for_gpu(r, model_config(r.model), gpu or _detected_gpu(), gpus, max_gpu_memory)
    except UserError as exc:
        fail(exc, json_mode)
    if json_mode:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _render(result, describe(result))
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _detected_gpu() -> str:
    """The catalogue entry nearest the GPU torch sees here (by memory), else h100-80gb."""
    from trtconv.core.environment import detect_device
    from trtconv.memory_plan import GPUS

    dev = detect_device("auto")
    if dev.kind != "cuda" or dev.memory_gib is None:
        return "h100-80gb"
    return min(GPUS.values(), key=lambda g: (abs(g.memory_gib - dev.memory_gib), g.name)).name


def _render(result, header: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    for line in header:
        console.print(line, markup=False)
    table = Table(show_lines=False)
    for col in ("stage", "memory", "needs", "has", "fits", "note"):
        table.add_column(col)
    applies = result.relevant_stages()
    for c in result.checks:
        unit = (lambda b: str(b)) if c.stage == "serve (GPUs)" else (lambda b: f"{b / 2**30:.1f} GiB")
        has = "-" if c.have_bytes is None else unit(c.have_bytes)
        verdict = ("yes" if c.fits else "NO") if c.stage in applies else ("yes" if c.fits else "no") + " (other path)"
        table.add_row(c.stage, c.where, unit(c.need_bytes), has, verdict, c.note)
    console.print(table)
    for line in result.advice:
        console.print(f"- {line}", markup=False)
    console.print("fits" if result.fits else "does not fit", markup=False)
