"""`trtconv plan`: will this recipe fit, from config.json alone, before any work (exit 4 when not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from trtconv.cli.options import JsonOpt, MaxGpuMemOpt, SetOpt, fail
from trtconv.core.errors import UserError

GpuOpt = Annotated[Optional[str], typer.Option("--gpu", help="A GPU of the catalogue (e.g. h100-80gb, h200-141gb, a100-80gb, "
                                                             "l40s-48gb) to convert and serve on; default: this machine as "
                                                             "`build` uses it, serving on the nearest catalogue GPU (else h100-80gb).")]
GpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="GPUs of the host: the conversion is planned split over "
                                                               "them as `build --gpus N` runs it (per-GPU peak, predicted "
                                                               "time), and the engine is served on them.")]


OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Where `build -o` will write the artifact: the disk rows "
                                                                   "check the free space there (default: the current folder).")]


def plan(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")] = "default",
    gpu: GpuOpt = None,
    gpus: GpusOpt = 1,
    max_gpu_memory: MaxGpuMemOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Predict weight bytes, peak GPU/host memory and disk per stage, and serving memory; exit 4 if something does not fit.

    Without --gpu the conversion is planned as `build` would run it here (this GPU, or this CPU with
    its available memory or --max-gpu-memory), and serving on the nearest catalogue GPU (else h100-80gb).

    Example (will a 70B FP8 conversion fit one H200, and what serves it?):

        trtconv plan my-70b-fp8.yaml --gpu h200-141gb --json
    """
    from trtconv.memory_plan import EXIT_DOES_NOT_FIT, describe

    try:
        result = plan_recipe(recipe, set_ or [], gpu, gpus, max_gpu_memory, out or Path("out"))
    except UserError as exc:
        fail(exc, json_mode)
    if json_mode:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _render(result, describe(result))
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def plan_recipe(recipe_ref: str, sets: list[str], gpu: str | None, gpus: int, cap_gib: float | None, out: Path):
    """The checks `build` runs before any work, in its order, against the device planned for: config.json
    (architecture, dimensions), the recipe against the model, the pre-flight on the device, memory and disk.
    Bad input raises (exit 2); what the device cannot run is a refusal in the plan (exit 4)."""
    from trtconv.cache.store import cache_root
    from trtconv.core.environment import detect_device
    from trtconv.engine.plan import preflight_warnings
    from trtconv.memory_plan import (
        catalogue_device,
        disk_here,
        host_available_bytes,
        model_config,
        nearest_gpu,
        plan_for_device,
        resolve_gpu,
    )
    from trtconv.recipe.schema import load_recipe
    from trtconv.stages.load import check_config, check_recipe_against_model

    r = load_recipe(recipe_ref, sets)[0].resolved()
    serve = resolve_gpu(gpu) if gpu else None
    hf_cfg, model_dir = model_config(r.model)
    check_config(hf_cfg, model_dir)
    check_recipe_against_model(r, hf_cfg, model_dir)
    device = catalogue_device(serve, gpus) if serve else detect_device("auto")
    serve = serve or nearest_gpu(device)
    here = gpu is None and device.kind == "cuda"  # this machine's GPU: its host memory is the build's too
    result = plan_for_device(r, hf_cfg, device, cap_gib, host_bytes=host_available_bytes() if here else None,
                             disk=disk_here(out, cache_root()), serve=serve, gpus=gpus, split=gpus)
    from trtconv.stages.devices import check_gpus, check_split

    try:
        if gpu is None:  # this machine: build's own check of --gpus against the visible devices
            check_gpus(gpus, device)
        check_split(gpus, result.streamed)
    except UserError as exc:
        result.refusals.append(str(exc))
    try:
        result.warnings = preflight_warnings(r, hf_cfg, device)
    except UserError as exc:
        result.refusals.append(str(exc))
    return result  # the streamed path's refusals are the plan's own (memory_plan.streamed_refusals), as build's


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
        need, has = c.amounts()
        verdict = ("yes" if c.fits else "NO") if c.stage in applies else ("yes" if c.fits else "no") + " (other path)"
        table.add_row(c.stage, c.where, need, has, verdict, c.note)
    console.print(table)
    for line in result.warnings:
        console.print(f"- warning: {line}", markup=False)
    for line in result.refusals:
        console.print(f"- refused (build refuses it here): {line}", markup=False)
    for line in result.advice:
        console.print(f"- {line}", markup=False)
    console.print("fits" if result.fits else "does not fit", markup=False)
