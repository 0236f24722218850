"""`trtconv build` and `trtconv calibrate`: build a recipe (from a file, or from flags) and run the pipeline."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from trtconv.cli.options import (DeviceOpt, DryRunOpt, ForceOpt, GpusOpt, JsonOpt, JunitOpt, MaxGpuMemOpt, NoCacheOpt, OutOpt,
                                 QuietOpt, ReproOpt, RequireEngineOpt, SetOpt, fail)
from trtconv.cli.render import print_result
from trtconv.core import interrupts
from trtconv.core.errors import GateFailed, Interrupted, UserError
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS
from trtconv.recipe.schema import CalibrationSection


def _run_build(recipe, out: Path, force: bool, require_engine: bool, device: str, json_mode: bool, quiet: bool, junit=None,
               no_cache: bool = False, repro_check: bool = False, max_gpu_memory: float | None = None, gpus: int = 1) -> None:
    import os

    from trtconv.core.ui import Reporter
    from trtconv.recipe.schema import recipe_warnings

    reporter = Reporter(quiet=quiet, json_mode=json_mode)
    for warning in recipe_warnings(recipe):
        reporter.warn(warning)
    reporter.info("starting: importing torch, transformers and ModelOpt")  # takes seconds: say so first
    interrupts.point("starting")  # tests: a Ctrl-C before the pipeline (click's "Aborted!" path, still 130)
    from trtconv.pipeline import BuildOptions, build

    opts = BuildOptions(
        out=out, force=force, require_engine=require_engine, device=device, command=["trtconv", *sys.argv[1:]], junit=junit,
        no_cache=no_cache or os.environ.get("TRTCONV_NO_CACHE", "").lower() in ("1", "true", "yes"),
        repro_check=repro_check, max_gpu_memory_gib=max_gpu_memory, gpus=gpus,
    )
    try:
        outcome = build(recipe, opts, reporter)
    except GateFailed as exc:
        outcome = exc.args[0]
        print_result(outcome, reporter, json_mode)
        reporter.error(f"{outcome.manifest.status_reason}; the failed artifact is in {outcome.path}")
        raise typer.Exit(GateFailed.exit_code)
    except Interrupted as exc:
        fail(exc, json_mode)
    except UserError as exc:
        fail(exc, json_mode)
    print_result(outcome, reporter, json_mode)


# calibrate's flags default to the recipe schema's defaults: a flag run and a recipe run agree.
_CALIBRATION = {name: field.default for name, field in CalibrationSection.model_fields.items()}


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
    max_gpu_memory: MaxGpuMemOpt = None,
    gpus: GpusOpt = 1,
) -> None:
    """Run the whole pipeline from a recipe; exit 0 only if every stage ran and every gate passed.

    Exit codes: 0 passed; 1 an accuracy gate failed (artifact written, marked failed); 2 a mistake in the input; 3 --require-engine and no engine could be built here; 70 an internal error (a bug; the traceback is in a log file); 130 interrupted.

    Example:

        trtconv build recipes/llama-ref-fp8.yaml -o out/fp8 --junit gates.xml
    """
    from trtconv.recipe.schema import load_recipe

    try:
        r, _path = load_recipe(recipe, set_ or [])
    except UserError as exc:
        fail(exc, json_mode)
    if dry_run:
        print(r.resolved().to_yaml(), end="")
        return
    _run_build(r, output, force, require_engine, device, json_mode, quiet, junit, no_cache, repro_check, max_gpu_memory, gpus)


def _family_exports(model: Path) -> dict:
    """A family whose legacy TensorRT-LLM checkpoint trtconv does not convert (trtconv.architectures)
    gets the unified HF checkpoint only; an unreadable folder is left to the load stage to name."""
    from trtconv.architectures import row_for_folder

    row = row_for_folder(model)
    if row is None or row.no_trtllm_checkpoint is None:
        return {}
    return {"tensorrt_llm_checkpoint": False, "hf_checkpoint": True}


def calibrate(
    model: Annotated[Path, typer.Option("--model", help="Local Hugging Face checkpoint folder.")],
    precision: Annotated[str, typer.Option("--precision", help=", ".join(PRECISIONS) + ", or auto (per-layer mix; --candidates).")],
    output: OutOpt,
    kv_cache: Annotated[str, typer.Option("--kv-cache", help=" or ".join(KV_CACHE_FORMATS) + ".")] = "none",
    data: Annotated[Optional[Path], typer.Option("--data", help="Calibration text (.jsonl/.txt/folder); default: the built-in mix (docstrings, English prose, code).")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Calibration sequences of --seq-len tokens.")] = _CALIBRATION["num_samples"],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence (a warning below 32).")] = _CALIBRATION["seq_len"],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per calibration forward pass.")] = _CALIBRATION["batch_size"],
    seed: Annotated[int, typer.Option("--seed", help="Seed that picks and orders the calibration documents.")] = _CALIBRATION["seed"],
    tp_size: Annotated[int, typer.Option("--tp-size", help="Tensor-parallel ranks of the exported checkpoint (= the engine's).")] = 1,
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
    max_gpu_memory: MaxGpuMemOpt = None,
    gpus: GpusOpt = 1,
    candidates: Annotated[Optional[str], typer.Option("--candidates", help="--precision auto: comma-separated formats a layer may take (default: every precision this host calibrates, none included).")] = None,
) -> None:
    """Calibrate + export + evaluate with flags instead of a recipe (a recipe is built internally).

    `--dry-run` prints that recipe, so a flag run can be saved and replayed with `trtconv build`.

    Example:

        trtconv calibrate --model ./my-llama --precision int4_awq -o out/awq
    """
    from trtconv.recipe.schema import recipe_from_dict

    if candidates and precision != "auto":
        fail(UserError(f"--candidates applies to --precision auto only (the formats its search mixes); "
                       f"got --precision {precision}: drop --candidates or use --precision auto"), json_mode)
    data_dict = {
        "name": f"{Path(model).name}-{precision}",
        "description": "built by `trtconv calibrate`",
        "model": {"path": str(model), "dtype": dtype},
        "quantization": {"precision": precision, "kv_cache": kv_cache,
                         **({"search": {"candidates": candidates.split(",") if candidates else None}} if precision == "auto" else {})},
        "calibration": {"data": str(data) if data else None, "num_samples": num_samples, "seq_len": seq_len,
                        "batch_size": batch_size, "seed": seed},
        "export": {"tp_size": tp_size, "hf_checkpoint": hf_checkpoint, **_family_exports(model),
                   # auto writes a mixed checkpoint: the unified HF checkpoint only (recipe.schema)
                   **({"tensorrt_llm_checkpoint": False, "hf_checkpoint": True} if precision == "auto" else {})},
    }
    try:
        r = recipe_from_dict(data_dict, set_ or [], source="trtconv calibrate flags")
    except UserError as exc:
        fail(exc, json_mode)
    if dry_run:
        print(r.resolved().to_yaml(), end="")
        return
    _run_build(r, output, force, False, device, json_mode, quiet, junit, no_cache, max_gpu_memory=max_gpu_memory, gpus=gpus)


