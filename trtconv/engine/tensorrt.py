"""The `tensorrt` target: TensorRT engines built by `trtllm-build` (TensorRT-LLM 1.0-1.2).

Build path: `trtllm-build` in its own process, called with an argument list (never a shell).
- GPU memory and the TensorRT builder's host memory are returned to the system when it exits;
  the pipeline process keeps running (evaluation, manifest) without fragments of a 70B build.
- A crash inside TensorRT (segfault, CUDA error, OOM kill) ends the child, not the pipeline: the
  stage records "failed" with the tail of the output, and the previous engine folder is untouched.
- The exact argv is recorded in the manifest, and a user can replay it by hand on a GPU host.
- `trtllm-build` is the documented interface whose flags and defaults the reference pins; the
  in-process alternative (`tensorrt_llm._tensorrt_engine.LLM(build_config=...)` + `llm.save`) is a
  private module path that also re-quantizes and builds into a temp workspace of its own.
Every option is passed explicitly, defaults included, so the command means the same thing under a
TensorRT-LLM whose defaults moved.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from trtconv.engine.plan import check_engine_plan, resolve_fp8_context_fmha
from trtconv.recipe.engine import EngineSection, TensorRTEngineOptions
from trtconv.engine.stamp import write_engine_stamp
from trtconv.engine.record import (
    NOT_INSTALLED_REASON,
    EngineRecord,
    TrtllmInstall,
    failure_line,
    list_files,
    not_built,
    probe_tensorrt_llm,
    staging_dir_for,
    swap_into_place,
    tail,
)
from trtconv.core.environment import DeviceInfo, detect_device
from trtconv.core.errors import CheckpointError
from trtconv.core.jsonio import read_json_object

TRTLLM_BUILD = "trtllm-build"
ENGINE_CONFIG_KEYS = frozenset({"version", "pretrained_config", "build_config"})
BUILD_LOG_NAME = "build.log"


class EngineDirInvalid(Exception):
    """trtllm-build exited 0 but the folder is not a complete engine."""


def _flag(enabled: bool) -> str:
    return "enable" if enabled else "disable"


def trtllm_build_command(
    checkpoint_dir: Path, output_dir: Path, options: TensorRTEngineOptions, *, quant_algo: str | None, device: DeviceInfo | None
) -> list[str]:
    """The trtllm-build argument list for these options (flag names and values of TensorRT-LLM 1.0-1.2)."""
    o = options
    cmd = [TRTLLM_BUILD, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir)]
    cmd += ["--max_batch_size", str(o.max_batch_size), "--max_input_len", str(o.max_input_len)]
    if o.max_seq_len is not None:
        cmd += ["--max_seq_len", str(o.max_seq_len)]
    cmd += ["--max_num_tokens", str(o.max_num_tokens)]
    if o.opt_num_tokens is not None:
        cmd += ["--opt_num_tokens", str(o.opt_num_tokens)]
    cmd += ["--max_beam_width", str(o.max_beam_width)]
    cmd += ["--kv_cache_type", o.kv_cache_type, "--tokens_per_block", str(o.tokens_per_block)]
    cmd += ["--gpt_attention_plugin", o.gpt_attention_plugin]
    cmd += ["--context_fmha", _flag(o.context_fmha), "--use_paged_context_fmha", _flag(o.use_paged_context_fmha)]
    cmd += ["--use_fp8_context_fmha", _flag(resolve_fp8_context_fmha(o, quant_algo, device))]
    cmd += ["--remove_input_padding", _flag(o.remove_input_padding), "--use_fused_mlp", _flag(o.use_fused_mlp)]
    if o.gemm_plugin is not None:
        cmd += ["--gemm_plugin", o.gemm_plugin]
    cmd += ["--multiple_profiles", _flag(o.multiple_profiles), "--workers", str(o.workers)]
    if o.timing_cache is not None:
        cache = Path(o.timing_cache).resolve()
        if cache.is_file():  # a first build has no cache to read; TensorRT-LLM would only warn
            cmd += ["--input_timing_cache", str(cache)]
        cmd += ["--output_timing_cache", str(cache)]
    cmd += ["--log_level", o.log_level]
    if o.gather_context_logits:  # a store_true flag: off is expressed by leaving it out
        cmd += ["--gather_context_logits"]
    return cmd


def read_checkpoint_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a TensorRT-LLM checkpoint is a folder with config.json and rank{{N}}.safetensors")
    return read_json_object(path, "the TensorRT-LLM checkpoint config", CheckpointError)


def checkpoint_world_size(config: dict[str, Any]) -> int:
    mapping = config.get("mapping") or {}
    return int(mapping.get("world_size", int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1))))


def resolved_options_json(options: TensorRTEngineOptions, quant_algo: str | None, device: DeviceInfo | None) -> dict[str, Any]:
    data = options.model_dump(mode="json")
    data["use_fp8_context_fmha"] = resolve_fp8_context_fmha(options, quant_algo, device)
    return data


def build_tensorrt_engine(
    checkpoint_dir: Path,
    out_dir: Path,
    options: TensorRTEngineOptions,
    *,
    require: bool,
    device: DeviceInfo | None = None,
    install: TrtllmInstall | None = None,
) -> EngineRecord:
    """Build engines for every rank of checkpoint_dir into out_dir, atomically.

    Returns status "built", "not_built" (no TensorRT-LLM / trtllm-build / GPU here; with
    require=True that raises EngineUnavailable) or "failed" (trtllm-build failed, or its output is
    not a complete engine). On anything but "built", out_dir is as it was before the call.
    `device` / `install` default to detecting this machine; tests pass them in.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir).resolve(), Path(out_dir).resolve()
    ckpt = read_checkpoint_config(checkpoint_dir)
    quant = ckpt.get("quantization") or {}
    quant_algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    device = device or detect_device()
    record = EngineRecord(
        target="tensorrt",
        status="not_built",
        command=trtllm_build_command(checkpoint_dir, out_dir, options, quant_algo=quant_algo, device=device),
        options=resolved_options_json(options, quant_algo, device),
        gpu_name=device.name if device.kind == "cuda" else None,
        sm=device.sm,
    )
    install = install or probe_tensorrt_llm()
    unavailable = _why_not_buildable(install, device)
    if unavailable:
        return not_built(record, unavailable, require=require)
    mapping = ckpt.get("mapping") or {}
    warnings = check_engine_plan(
        EngineSection(target="tensorrt", tensorrt=options),
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_algo,
        tp_size=int(mapping.get("tp_size", 1)),
        pp_size=int(mapping.get("pp_size", 1)),
        num_kv_heads=int(ckpt.get("num_key_value_heads") or ckpt.get("num_attention_heads") or 1),
        device=device,
        trtllm_version=install.version,
    )
    record = record.model_copy(update={"warnings": warnings, "tensorrt_llm_version": install.version, "tensorrt_version": install.tensorrt_version})
    return _build_into_staging(checkpoint_dir, out_dir, options, record, device=device, world_size=checkpoint_world_size(ckpt), quant_algo=quant_algo)


def _why_not_buildable(install: TrtllmInstall, device: DeviceInfo) -> str | None:
    if not install.importable:
        return NOT_INSTALLED_REASON + (f" (import failed: {install.error})" if install.error else "")
    if shutil.which(TRTLLM_BUILD) is None:
        return f"not built: tensorrt_llm {install.version} imports but {TRTLLM_BUILD} is not on PATH"
    if device.kind != "cuda":
        return f"not built: {TRTLLM_BUILD} needs a CUDA GPU and none is visible here ({device.name})"
    return None


def _build_into_staging(
    checkpoint_dir: Path,
    out_dir: Path,
    options: TensorRTEngineOptions,
    record: EngineRecord,
    *,
    device: DeviceInfo,
    world_size: int,
    quant_algo: str | None,
) -> EngineRecord:
    staging = staging_dir_for(out_dir)
    staging.mkdir(parents=True)
    command = trtllm_build_command(checkpoint_dir, staging, options, quant_algo=quant_algo, device=device)
    record = record.model_copy(update={"command": command})
    try:
        started = time.monotonic()
        # cwd = the staging folder, so a timing cache TensorRT-LLM writes relative to the working
        # directory lands with the engine, not wherever trtconv was started.
        result = subprocess.run(command, cwd=staging, capture_output=True, text=True, check=False)
        wall = round(time.monotonic() - started, 3)
        output = (result.stdout or "") + (result.stderr or "")
        record = record.model_copy(update={"wall_time_s": wall, "log_tail": tail(output)})
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            return record.model_copy(update={"status": "failed", "reason": f"{TRTLLM_BUILD} exited {result.returncode}: {failure_line(output)}"})
        engine_version = validate_engine_dir(staging, expected_world_size=world_size, options=options)
        record = _note_version_mismatch(record, engine_version)
        (staging / BUILD_LOG_NAME).write_text(output, encoding="utf-8")
        write_engine_stamp(
            staging,
            target="tensorrt",
            device=device,
            tensorrt_llm_version=record.tensorrt_llm_version,
            tensorrt_version=record.tensorrt_version,
            world_size=world_size,
        )
        files = list_files(staging)
        swap_into_place(staging, out_dir)
    except EngineDirInvalid as exc:
        shutil.rmtree(staging, ignore_errors=True)
        return record.model_copy(update={"status": "failed", "reason": f"{TRTLLM_BUILD} exited 0 but {exc}"})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record.model_copy(update={"status": "built", "reason": None, "engine_dir": str(out_dir), "files": files})


def _note_version_mismatch(record: EngineRecord, engine_version: str) -> EngineRecord:
    # The engine's own config.json says which TensorRT-LLM built it; that is what the stamp must carry.
    if record.tensorrt_llm_version == engine_version:
        return record
    warning = (
        f"{TRTLLM_BUILD} on PATH is TensorRT-LLM {engine_version}, but the Python that trtconv runs imports "
        f"{record.tensorrt_llm_version}; the engine is stamped {engine_version}"
    )
    return record.model_copy(update={"tensorrt_llm_version": engine_version, "warnings": [*record.warnings, warning]})


def validate_engine_dir(engine_dir: Path, *, expected_world_size: int | None = None, options: TensorRTEngineOptions | None = None) -> str:
    """Check an engine folder is complete; return the TensorRT-LLM version in its config.json."""
    config_path = Path(engine_dir) / "config.json"
    if not config_path.is_file():
        raise EngineDirInvalid(f"{config_path.name} is missing from the engine folder")
    config = read_json_object(config_path, "the engine config", EngineDirInvalid)
    if set(config) != ENGINE_CONFIG_KEYS:
        keys = sorted(config)
        raise EngineDirInvalid(f"the engine config.json has keys {keys}; expected exactly {sorted(ENGINE_CONFIG_KEYS)}")
    world_size = _engine_world_size(config)
    if expected_world_size is not None and world_size != expected_world_size:
        raise EngineDirInvalid(f"the engine is for world_size {world_size}, the checkpoint for {expected_world_size}")
    _check_rank_files(Path(engine_dir), world_size)
    if options is not None:
        _check_build_config(config["build_config"], options)
    return str(config["version"])


def _engine_world_size(config: dict[str, Any]) -> int:
    mapping = (config.get("pretrained_config") or {}).get("mapping") or {}
    world_size = mapping.get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise EngineDirInvalid(f"pretrained_config.mapping.world_size is {world_size!r}; expected an integer >= 1")
    return world_size


def _check_rank_files(engine_dir: Path, world_size: int) -> None:
    for rank in range(world_size):
        plan = engine_dir / f"rank{rank}.engine"
        if not plan.is_file():
            raise EngineDirInvalid(f"{plan.name} is missing (world_size {world_size} needs rank0..rank{world_size - 1}.engine)")
        if plan.stat().st_size == 0:
            raise EngineDirInvalid(f"{plan.name} is empty")
    extra = sorted(p.name for p in engine_dir.glob("rank*.engine") if int(re.sub(r"\D", "", p.name) or 0) >= world_size)
    if extra:
        raise EngineDirInvalid(f"unexpected engine files for world_size {world_size}: {extra}")


def _check_build_config(build_config: dict[str, Any], options: TensorRTEngineOptions) -> None:
    # Limits trtllm-build never adjusts; a difference means our flags did not reach the build.
    # (max_num_tokens / max_input_len can legitimately be clamped, so they are not compared.)
    for key in ("max_batch_size", "max_beam_width"):
        if build_config.get(key) != getattr(options, key):
            raise EngineDirInvalid(f"build_config.{key} is {build_config.get(key)!r}, but {getattr(options, key)!r} was asked for")
    # An engine that drops context logits would silently send the gate back to the checkpoint.
    if options.gather_context_logits and build_config.get("gather_context_logits") is not True:
        raise EngineDirInvalid(
            f"build_config.gather_context_logits is {build_config.get('gather_context_logits')!r}, but --gather_context_logits was passed"
        )
