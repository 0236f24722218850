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
    checks.append(_gpus_check(device, UserError))
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
        checks.extend(_recipe_checks(recipe_ref, device, UserError))
    ok = all(c["status"] != "fail" for c in checks)
    return ok, {"device": device.to_dict(), "versions": versions, "checks": checks}


def _gpus_check(device, UserError) -> dict:
    """What `build --gpus N` accepts here: the same check build and plan run (trtconv.stages.devices)."""
    from trtconv.stages.devices import allowed_gpus

    try:
        most, why = allowed_gpus(device)
    except UserError as exc:  # a bad TRTCONV_SIMULATED_DEVICES
        return _check("gpus", "fail", str(exc))
    split = "the layer-streamed conversion splits over them" if most > 1 else "no split over several devices here"
    return _check("gpus", "ok", f"build --gpus 1 to {most}: {why}; {split}")


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


def _recipe_checks(recipe_ref, device, UserError) -> list[dict]:
    """The checks `build` runs before any work, in its order, on this machine: config.json (architecture,
    dimensions), the recipe against the model, the pre-flight (precision and engine plan on this device),
    memory and disk. The same functions build calls (stages.load, engine.plan, memory_plan)."""
    from trtconv.engine.plan import preflight_warnings
    from trtconv.recipe.schema import load_recipe

    try:
        recipe, path = load_recipe(recipe_ref)
        recipe = recipe.resolved()
    except UserError as exc:
        return [_check("recipe", "fail", str(exc))]
    out = [_check("recipe", "ok", f"{path} is valid")]
    try:
        hf_cfg, model_dir = _known_config(recipe)
        if model_dir is not None:
            from trtconv.stages.load import check_config, check_recipe_against_model

            check_config(hf_cfg, model_dir)
            check_recipe_against_model(recipe, hf_cfg, model_dir)
        warnings = preflight_warnings(recipe, hf_cfg, device)
        if model_dir is not None:
            _check_memory(recipe, hf_cfg, device)
        out.append(_check("recipe plan", "warn" if warnings else "ok", "; ".join(warnings) or _fits_text(model_dir)))
    except UserError as exc:
        out.append(_check("recipe plan", "fail", str(exc)))
    return out


def _fits_text(model_dir: Path | None) -> str:
    if model_dir is None:  # a Hub model: its config.json is read when build fetches it
        return "precision and engine plan fit this machine (the model's config.json is checked when build fetches it)"
    return "config.json, precision, engine plan, memory and disk fit this machine (the checks build runs first)"


def _check_memory(recipe, hf_cfg: dict, device) -> None:
    """build's memory and disk refusal (memory_plan.plan_for_build), at the default -o (./out) and the cache."""
    from trtconv.cache.store import cache_root
    from trtconv.memory_plan import disk_here, plan_for_build

    plan_for_build(recipe, hf_cfg, device, None, disk=disk_here(Path("out"), cache_root()))


def _reference_config(name: str) -> dict:
    """A reference model's config.json as its spec states it (the trained one adds only non-shape keys)."""
    from trtconv.data.reference_models import get_spec

    spec = get_spec(name)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "vocab_size")
    return {"architectures": [spec.architecture], "model_type": spec.model_type, "tie_word_embeddings": False,
            **{k: getattr(spec, k) for k in keys}}


def _known_config(recipe) -> tuple[dict, Path | None]:
    """config.json of a local model folder and the folder (a reference model's from its spec, without
    training it); for a Hub model, which is not downloaded here, only the tp size and None."""
    from trtconv.core.errors import ModelError
    from trtconv.core.jsonio import read_json_object

    if recipe.model.path and (Path(recipe.model.path) / "config.json").is_file():
        folder = Path(recipe.model.path)
        return read_json_object(folder / "config.json", "a Hugging Face model config", ModelError), folder
    if recipe.model.reference:
        return _reference_config(recipe.model.reference), Path(f"reference model {recipe.model.reference}")
    return {"num_key_value_heads": recipe.export.tp_size}, None  # a Hub model: checked when build loads its config


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


