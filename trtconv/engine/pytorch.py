"""The `pytorch` target: TensorRT-LLM's PyTorch backend (1.0 and later) loads the unified HF checkpoint.

Nothing is compiled. trtconv writes `llm_api_options.yaml` (the LLM-API options, checked against
the keys the LLM API accepts) into the engine folder, and where TensorRT-LLM and a GPU are here,
loads the checkpoint once with those options and generates a few tokens (trtconv.engine.smoke).
Serve it with: `trtllm-serve OUT/hf_checkpoint --extra_llm_api_options OUT/engine/llm_api_options.yaml`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from trtconv.engine.plan import check_engine_plan
from trtconv.recipe.engine import EngineSection, PyTorchBackendOptions
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
from trtconv.engine.smoke import SMOKE_PREFIX
from trtconv.core.environment import DeviceInfo, detect_device
from trtconv.core.errors import CheckpointError
from trtconv.core.jsonio import read_json_object

OPTIONS_FILE = "llm_api_options.yaml"
SMOKE_FILE = "smoke.json"

# LLM-API keys trtconv writes, with the nested keys allowed under each (TorchLlmArgs /
# KvCacheConfig / CudaGraphConfig of TensorRT-LLM 1.0 and later). None = a scalar.
LLM_API_KEYS: dict[str, frozenset[str] | None] = {
    "max_batch_size": None,
    "max_num_tokens": None,
    "max_seq_len": None,
    "tensor_parallel_size": None,
    "pipeline_parallel_size": None,
    "attn_backend": None,
    "kv_cache_config": frozenset({"dtype", "free_gpu_memory_fraction", "max_attention_window"}),
    "cuda_graph_config": frozenset({"batch_sizes", "enable_padding", "max_batch_size"}),
}


def llm_api_options(
    options: PyTorchBackendOptions, *, tp_size: int, pp_size: int, attention_window: int | None = None
) -> dict[str, Any]:
    """The LLM-API options (as YAML/kwargs) for these recipe options; tp/pp come from the export.

    ``attention_window``: the model's sliding window (trtconv.architectures), passed as
    KvCacheConfig.max_attention_window (one entry: TensorRT-LLM repeats it for every layer) so the
    runtime attends over the window the model was trained with, whatever it reads from config.json.
    """
    data: dict[str, Any] = {
        "max_batch_size": options.max_batch_size,
        "max_num_tokens": options.max_num_tokens,
        "tensor_parallel_size": tp_size,
        "pipeline_parallel_size": pp_size,
        "attn_backend": options.attention_backend,
        "kv_cache_config": {"dtype": options.kv_cache_dtype, "free_gpu_memory_fraction": options.kv_cache_free_gpu_memory_fraction},
        "cuda_graph_config": _cuda_graph_config(options.cuda_graphs),
    }
    if options.max_seq_len is not None:
        data["max_seq_len"] = options.max_seq_len
    if attention_window is not None:
        data["kv_cache_config"]["max_attention_window"] = [attention_window]
    check_llm_api_keys(data)
    return data


def _cuda_graph_config(cuda_graphs: bool | list[int]) -> dict[str, Any] | None:
    if cuda_graphs is False:
        return None  # cuda_graph_config: null turns CUDA graphs off
    if cuda_graphs is True:
        return {}  # TensorRT-LLM's default CudaGraphConfig
    return {"batch_sizes": list(cuda_graphs)}


def check_llm_api_keys(data: dict[str, Any]) -> None:
    """Guard against writing a key the LLM API would reject (it forbids unknown keys)."""
    for key, value in data.items():
        if key not in LLM_API_KEYS:
            raise ValueError(f"{key!r} is not an LLM-API option trtconv may write; allowed: {sorted(LLM_API_KEYS)}")
        nested = LLM_API_KEYS[key]
        if nested is not None and value is not None:
            unknown = set(value) - nested
            if unknown:
                raise ValueError(f"{key}: {sorted(unknown)} are not {key} fields; allowed: {sorted(nested)}")


def dump_options_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def smoke_command(hf_checkpoint_dir: Path, options_path: Path) -> list[str]:
    return [sys.executable, "-m", "trtconv.engine.smoke", "--model", str(hf_checkpoint_dir), "--options", str(options_path)]


def prepare_pytorch_target(
    hf_checkpoint_dir: Path,
    out_dir: Path,
    options: PyTorchBackendOptions,
    *,
    tp_size: int,
    pp_size: int,
    require: bool,
    device: DeviceInfo | None = None,
    install: TrtllmInstall | None = None,
) -> EngineRecord:
    """Write out_dir/llm_api_options.yaml (atomically) and smoke-check it where TensorRT-LLM runs.

    Status: "built" (smoke check generated tokens), "not_built" (no TensorRT-LLM or GPU here: the
    YAML is still written, the smoke check is not run; require=True raises EngineUnavailable and
    writes nothing), or "failed" (the smoke check failed; out_dir is left as it was).
    """
    hf_checkpoint_dir, out_dir = Path(hf_checkpoint_dir).resolve(), Path(out_dir).resolve()
    if not (hf_checkpoint_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_checkpoint_dir / 'config.json'} is missing: the pytorch target needs the unified HF checkpoint (export.hf_checkpoint)")
    data = llm_api_options(options, tp_size=tp_size, pp_size=pp_size, attention_window=hf_checkpoint_window(hf_checkpoint_dir))
    device = device or detect_device()
    record = EngineRecord(
        target="pytorch",
        status="not_built",
        command=smoke_command(hf_checkpoint_dir, out_dir / OPTIONS_FILE),
        options=data,
        gpu_name=device.name if device.kind == "cuda" else None,
        sm=device.sm,
    )
    install = install or probe_tensorrt_llm()
    unavailable = _why_no_smoke(install, device, tp_size * pp_size)
    if unavailable and require:
        return not_built(record, unavailable, require=True)
    warnings = _plan_warnings(hf_checkpoint_dir, options, tp_size=tp_size, pp_size=pp_size, device=device, install=install)
    record = record.model_copy(
        update={"tensorrt_llm_version": install.version, "tensorrt_version": install.tensorrt_version, "warnings": warnings}
    )
    return _write_and_check(hf_checkpoint_dir, out_dir, data, record, device=device, unavailable=unavailable, world_size=tp_size * pp_size)


def hf_checkpoint_window(hf_checkpoint_dir: Path) -> int | None:
    """The unified HF checkpoint's sliding window (config.json sliding_window), checked as the load stage does."""
    from trtconv.architectures import check_attention_window
    from trtconv.checkpoints.hf_reader import check_hf_architecture

    path = Path(hf_checkpoint_dir) / "config.json"
    config = read_json_object(path, "the unified HF checkpoint's config", CheckpointError)
    return check_attention_window(config, check_hf_architecture(config, path), path, CheckpointError)


def hf_checkpoint_precision(hf_checkpoint_dir: Path) -> tuple[str | None, str | None]:
    """(quant_algo, kv_cache_quant_algo) of a unified HF checkpoint (hf_quant_config.json; none = unquantized)."""
    path = Path(hf_checkpoint_dir) / "hf_quant_config.json"
    if not path.is_file():
        return None, None
    quantization = read_json_object(path, "the unified HF checkpoint's quantization config", CheckpointError).get("quantization") or {}
    return quantization.get("quant_algo"), quantization.get("kv_cache_quant_algo")


def _plan_warnings(
    hf_dir: Path, options: PyTorchBackendOptions, *, tp_size: int, pp_size: int, device: DeviceInfo, install: TrtllmInstall
) -> list[str]:
    config = read_json_object(hf_dir / "config.json", "the unified HF checkpoint's model config", CheckpointError)
    quant_algo, kv_algo = hf_checkpoint_precision(hf_dir)
    return check_engine_plan(
        EngineSection(target="pytorch", pytorch=options),
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_algo,
        tp_size=tp_size,
        pp_size=pp_size,
        num_kv_heads=int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 1),
        device=device,
        trtllm_version=install.version if install.importable else None,
    )


def _why_no_smoke(install: TrtllmInstall, device: DeviceInfo, world_size: int) -> str | None:
    if not install.importable:
        return NOT_INSTALLED_REASON + (f" (import failed: {install.error})" if install.error else "")
    if device.kind != "cuda":
        return f"not built: the PyTorch backend needs a CUDA GPU and none is visible here ({device.name})"
    if device.count and device.count < world_size:
        return f"not built: tp_size x pp_size = {world_size} GPUs are needed, {device.count} visible"
    return None


def _write_and_check(
    hf_dir: Path, out_dir: Path, data: dict[str, Any], record: EngineRecord, *, device: DeviceInfo, unavailable: str | None, world_size: int
) -> EngineRecord:
    staging = staging_dir_for(out_dir)
    staging.mkdir(parents=True)
    try:
        (staging / OPTIONS_FILE).write_text(dump_options_yaml(data), encoding="utf-8")
        if unavailable is None:
            record = _run_smoke(hf_dir, staging, record)
            if record.status == "failed":
                shutil.rmtree(staging, ignore_errors=True)
                return record
        write_engine_stamp(
            staging,
            target="pytorch",
            device=device if device.kind == "cuda" else None,
            tensorrt_llm_version=record.tensorrt_llm_version,
            tensorrt_version=record.tensorrt_version,
            world_size=world_size,
        )
        files = list_files(staging)
        swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    status = "built" if unavailable is None else "not_built"
    reason = None if unavailable is None else f"{unavailable} ({OPTIONS_FILE} written; smoke check not run)"
    return record.model_copy(update={"status": status, "reason": reason, "engine_dir": str(out_dir), "files": files})


def _run_smoke(hf_dir: Path, staging: Path, record: EngineRecord) -> EngineRecord:
    command = smoke_command(hf_dir, staging / OPTIONS_FILE)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = (result.stdout or "") + (result.stderr or "")
    record = record.model_copy(update={"wall_time_s": round(time.monotonic() - started, 3), "log_tail": tail(output)})
    smoke = [line for line in (result.stdout or "").splitlines() if line.startswith(SMOKE_PREFIX)]
    if result.returncode != 0 or not smoke:
        return record.model_copy(update={"status": "failed", "reason": f"smoke check exited {result.returncode}: {failure_line(output)}"})
    (staging / SMOKE_FILE).write_text(json.dumps(json.loads(smoke[-1][len(SMOKE_PREFIX):]), indent=2) + "\n", encoding="utf-8")
    return record
