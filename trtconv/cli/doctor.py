"""`trtconv doctor`: what this machine can do, checked the way a build would check it.

Every line is a real check (an import, a device query, the same plan checks `build` runs before
any work), not a version print; a recipe that cannot run here makes the exit code non-zero.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from trtconv.cli.options import JsonOpt


def _check(name: str, status: str, detail: str) -> dict:
    return {"name": name, "status": status, "detail": detail}


def run_doctor(recipe_ref: str | None = None) -> tuple[bool, dict]:
    from trtconv.engine.plan import check_engine_plan, check_precision_on_device
    from trtconv.engine.record import probe_tensorrt_llm
    from trtconv.core.environment import detect_device, package_versions
    from trtconv.core.errors import UserError

    checks = []
    versions = package_versions()
    device = detect_device()
    if device.kind == "cuda":
        checks.append(_check("gpu", "ok", f"{device.name}, SM {device.sm}, {device.count} visible, {device.memory_gib} GiB, CUDA {device.cuda}"))
    else:
        checks.append(_check("gpu", "warn", f"no CUDA GPU visible; calibration and export run on CPU ({device.name}, {device.count} threads)"))
    try:
        import modelopt.torch.quantization  # noqa: F401

        checks.append(_check("nvidia-modelopt", "ok", f"{versions['nvidia-modelopt']} imports"))
    except Exception as exc:  # any import failure is the finding
        checks.append(_check("nvidia-modelopt", "fail", f"does not import: {exc}"))
    install = probe_tensorrt_llm()
    if install.importable:
        checks.append(_check("tensorrt_llm", "ok", f"{install.version} (TensorRT {install.tensorrt_version})"))
    else:
        checks.append(_check("tensorrt_llm", "warn", "not installed: engines are not built here; checkpoints and gates still work"))
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true", "yes")]
    checks.append(_check("offline", "ok", f"{', '.join(offline)} set" if offline else "Hub access allowed (set HF_HUB_OFFLINE=1 to forbid it)"))
    checks.append(_check("cache", *_cache_status()))
    if recipe_ref:
        checks.extend(_recipe_checks(recipe_ref, device, install.version, check_engine_plan, check_precision_on_device, UserError))
    ok = all(c["status"] != "fail" for c in checks)
    return ok, {"device": device.to_dict(), "versions": versions, "checks": checks}


def _cache_status() -> tuple[str, str]:
    import platformdirs

    root = Path(os.environ.get("TRTCONV_CACHE") or platformdirs.user_cache_dir("trtconv"))
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():  # the cache path, or a folder above it, is a file: nothing can be created there
        return "fail", f"{root} is not writable: {probe} is a file, not a folder; set TRTCONV_CACHE to a writable folder"
    if os.access(probe, os.W_OK | os.X_OK):
        return "ok", f"{root} (writable)"
    return "fail", f"{root} is not writable: set TRTCONV_CACHE to a writable folder"


def _recipe_checks(recipe_ref, device, trtllm_version, check_engine_plan, check_precision_on_device, UserError) -> list[dict]:
    from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS
    from trtconv.recipe.schema import load_recipe

    try:
        recipe, path = load_recipe(recipe_ref)
    except UserError as exc:
        return [_check("recipe", "fail", str(exc))]
    out = [_check("recipe", "ok", f"{path} is valid")]
    quant_algo = PRECISIONS[recipe.quantization.precision].quant_algo
    kv_algo = KV_CACHE_FORMATS[recipe.quantization.kv_cache].kv_cache_quant_algo
    try:
        from trtconv.engine.plan import check_cuda_forward

        check_cuda_forward(PRECISIONS[recipe.quantization.precision], device.kind)  # nvfp4 on a CPU
        warnings = check_precision_on_device(quant_algo, kv_algo, device) if device.kind == "cuda" else []
        warnings += check_engine_plan(
            recipe.engine, quant_algo=quant_algo, kv_cache_quant_algo=kv_algo, tp_size=recipe.export.tp_size,
            pp_size=recipe.export.pp_size, num_kv_heads=_kv_heads(recipe), device=device if device.kind == "cuda" else None,
            trtllm_version=trtllm_version,
        )
        out.append(_check("recipe plan", "warn" if warnings else "ok", "; ".join(warnings) or "precision and engine plan fit this machine"))
    except UserError as exc:
        out.append(_check("recipe plan", "fail", str(exc)))
    return out


def _kv_heads(recipe) -> int:
    """The model's KV heads without loading (or training) it; tp_size itself where it can't be known yet."""
    from trtconv.core.errors import ModelError
    from trtconv.core.jsonio import read_json_object

    if recipe.model.reference:
        from trtconv.data.reference_models import get_spec

        return get_spec(recipe.model.reference).num_key_value_heads
    if recipe.model.path and (Path(recipe.model.path) / "config.json").is_file():
        cfg = read_json_object(Path(recipe.model.path) / "config.json", "a Hugging Face model config", ModelError)
        return cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or recipe.export.tp_size
    return recipe.export.tp_size  # a Hub model: checked when build loads its config


def doctor(
    recipe: Annotated[Optional[str], typer.Argument(help="Also check that this recipe can run here.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """This machine vs what trtconv (and a recipe) needs: GPU, SM, packages, TensorRT-LLM, cache.

    Example:

        trtconv doctor recipes/llama-ref-fp8.yaml
    """
    
    ok, report = run_doctor(recipe)
    if json_mode:
        print(json.dumps(report, indent=2))
    else:
        for check in report["checks"]:
            mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[check["status"]]
            print(f"[{mark}] {check['name']}: {check['detail']}")
    if not ok:
        raise typer.Exit(2)


