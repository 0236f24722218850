"""Stage 3, export: the TensorRT-LLM checkpoint (and, when asked, ModelOpt's unified HF checkpoint).

ModelOpt writes the TensorRT-LLM config.json "manually" when tensorrt_llm is not installed, and under
transformers 5 that config silently loses `rotary_base` and `rotary_scaling` (it looks for a
top-level `rope_theta`; transformers 5 keeps it in `rope_parameters`) and has no `qwen_type` for
Qwen2. A Llama-3 model would then run with rope theta 10000 instead of 500000: wrong output, no
error. So after exporting we repair the config from the HF config, record every repair, and then
validate the written files against the format.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtconv.checkpoints.hf_model import compute_dtype
from trtconv.core.errors import CheckpointError
from trtconv.artifact.manifest import InputRecord
from trtconv.cache.store import StageCache, stage_key, versions_for_key
from trtconv.core.environment import DeviceInfo
from trtconv.stages.base import device_part, files_part, restore_entry
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS
from trtconv.recipe.schema import ExportSection, QuantizationSection, Recipe
from trtconv.core.ui import quiet_dependency

CHECKPOINT_DIR = "checkpoint"
HF_CHECKPOINT_DIR = "hf_checkpoint"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Repair:
    key: str
    before: Any
    after: Any
    why: str


@dataclass
class ExportResult:
    checkpoint_dir: Path | None
    hf_checkpoint_dir: Path | None
    tokenizer_dir: Path
    repairs: list[Repair] = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    dependency_warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict, root: Path) -> ExportResult:
        """The result of an earlier export (a cache hit) whose files are now under root."""
        return cls(
            checkpoint_dir=root / record["checkpoint"] if record["checkpoint"] else None,
            hf_checkpoint_dir=root / record["hf_checkpoint"] if record["hf_checkpoint"] else None,
            tokenizer_dir=root / record["tokenizer"],
            repairs=[Repair(**r) for r in record["config_repairs"]],
            validation=record["validation"],
            dependency_warnings=record["dependency_warnings"],
        )

    def manifest_record(self) -> dict:
        return {
            "checkpoint": CHECKPOINT_DIR if self.checkpoint_dir else None,
            "hf_checkpoint": HF_CHECKPOINT_DIR if self.hf_checkpoint_dir else None,
            "tokenizer": TOKENIZER_DIR,
            "config_repairs": [r.__dict__ for r in self.repairs],
            "validation": self.validation,
            "dependency_warnings": self.dependency_warnings,
        }


def rope_settings(hf_config) -> tuple[float | None, dict | None]:
    """(rope theta, scaling dict or None) from an HF config, transformers 4 or 5 layout."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        params = dict(params)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    scaling = getattr(hf_config, "rope_scaling", None) if not params else None
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return theta, None
    source = dict(scaling or params)
    source.pop("rope_theta", None)
    source.pop("rope_type", None)
    source.pop("type", None)
    # TensorRT-LLM reads the scaling kind from "type" (older converters) or "rope_type" (newer).
    return theta, {"type": rope_type, "rope_type": rope_type, **source}


def repair_trtllm_config(cfg: dict, hf_config, architecture: str) -> list[Repair]:
    """Fix, in place, what ModelOpt's manual config leaves out; returns what changed."""
    repairs: list[Repair] = []

    def put(key: str, value: Any, why: str) -> None:
        if cfg.get(key) != value:
            repairs.append(Repair(key, cfg.get(key), value, why))
            cfg[key] = value

    if cfg.get("position_embedding_type", "rope_gpt_neox").startswith("rope"):
        theta, scaling = rope_settings(hf_config)
        if theta is not None:
            put("rotary_base", float(theta), "ModelOpt's manual config drops rope_theta under transformers 5")
        if scaling is not None:
            put("rotary_scaling", scaling, "ModelOpt's manual config drops rope scaling under transformers 5")
    if architecture == "Qwen2ForCausalLM":
        put("qwen_type", "qwen2", "TensorRT-LLM's QWen model needs qwen_type to pick the Qwen2 layout")
        put("attn_bias", True, "Qwen2 has q/k/v biases; TensorRT-LLM reads attn_bias")
        put("mlp_bias", False, "Qwen2's MLP has no biases")
    else:
        put("attn_bias", bool(getattr(hf_config, "attention_bias", False)), "stated explicitly from the HF config")
        put("mlp_bias", bool(getattr(hf_config, "mlp_bias", False)), "stated explicitly from the HF config")
    return repairs


def expected_quantization(quant: QuantizationSection) -> tuple[str | None, str | None]:
    return PRECISIONS[quant.precision].quant_algo, KV_CACHE_FORMATS[quant.kv_cache].kv_cache_quant_algo


def check_quantization_section(cfg: dict, quant: QuantizationSection, path: Path) -> None:
    algo, kv_algo = expected_quantization(quant)
    section = cfg.get("quantization") or {}
    got = (section.get("quant_algo"), section.get("kv_cache_quant_algo"))
    if got != (algo, kv_algo):
        raise CheckpointError(
            f"{path}: quantization.quant_algo / kv_cache_quant_algo are {got}, but precision "
            f"{quant.precision} with kv_cache {quant.kv_cache} must export {(algo, kv_algo)}"
        )


def make_readable(folder: Path) -> None:
    """ModelOpt creates its safetensors files 0600; an artifact is meant to be shared."""
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o644)


def export_trtllm(model, hf_config, architecture: str, section: ExportSection, quant, out: Path, warns: list[str]):
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[section.dtype]
    with quiet_dependency(warns), torch.no_grad():
        # inference_tensor_parallel must be given: ModelOpt's default of 0 divides by zero.
        export_tensorrt_llm_checkpoint(
            model,
            get_model_type(model),
            dtype=dtype,
            export_dir=out,
            inference_tensor_parallel=section.tp_size,
            inference_pipeline_parallel=section.pp_size,
        )
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    repairs = repair_trtllm_config(cfg, hf_config, architecture)
    check_quantization_section(cfg, quant, cfg_path)
    cfg_path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    make_readable(out)
    return repairs


def export_hf(model, tokenizer, section: ExportSection, quant: QuantizationSection, out: Path, warns: list[str]):
    import torch

    if quant.precision == "none" and quant.kv_cache == "none":
        model.save_pretrained(out)
    else:
        from modelopt.torch.export import export_hf_checkpoint

        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[section.dtype]
        with quiet_dependency(warns):
            # The exporter folds scales into the model it is given: hand it a copy.
            export_hf_checkpoint(copy.deepcopy(model), dtype=dtype, export_dir=out)
    tokenizer.save_pretrained(out)  # ModelOpt writes no tokenizer; runtimes need one beside the weights
    make_readable(out)


def run(model, tokenizer, hf_config, architecture: str, section: ExportSection, quant: QuantizationSection, root: Path) -> ExportResult:
    from trtconv.checkpoints.trtllm_format import validate_checkpoint

    warns: list[str] = []
    tok_dir = root / TOKENIZER_DIR
    tokenizer.save_pretrained(tok_dir)
    result = ExportResult(checkpoint_dir=None, hf_checkpoint_dir=None, tokenizer_dir=tok_dir, dependency_warnings=warns)
    if section.hf_checkpoint:
        result.hf_checkpoint_dir = root / HF_CHECKPOINT_DIR
        export_hf(model, tokenizer, section, quant, result.hf_checkpoint_dir, warns)
    if section.tensorrt_llm_checkpoint:
        result.checkpoint_dir = root / CHECKPOINT_DIR
        result.repairs = export_trtllm(model, hf_config, architecture, section, quant, result.checkpoint_dir, warns)
        report = validate_checkpoint(result.checkpoint_dir)
        raw = report.to_dict() if hasattr(report, "to_dict") else dict(report.__dict__)
        result.validation = json.loads(json.dumps(raw, default=str))  # paths -> strings: it goes into JSON records
    return result


# ---------------------------------------------------------------------------------------------
# The stage cache: calibrate + export are one cached unit (see docs/cache.md for why)

EXPORT_STAGE = "export"


def export_key(recipe: Recipe, inputs: list[InputRecord], calib_sha256: str, device: DeviceInfo) -> str:
    calibration = recipe.calibration.model_dump(mode="json")
    calibration.pop("data")
    return stage_key(
        EXPORT_STAGE,
        {
            "model_files": files_part(inputs),
            "model": {"dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code,
                      "compute_dtype": compute_dtype(recipe.model.dtype, "cuda" if device.kind == "cuda" else "cpu")},
            "quantization": recipe.quantization.model_dump(mode="json"),
            "calibration": calibration,
            "calibration_data_sha256": calib_sha256,
            "export": recipe.export.model_dump(mode="json"),
            "versions": versions_for_key(),
            "device": device_part(device),
        },
    )


def store_export(cache: StageCache, key: str, artifact_tmp: Path, meta: dict[str, Any], reporter) -> None:
    from trtconv.cache.store import CacheError

    try:
        cache.put(EXPORT_STAGE, key, artifact_tmp, meta)
    except CacheError as exc:  # busy or disk full: the artifact is fine, it just isn't cached
        reporter.warn(f"not cached: {exc}")


def restore_export(cache: StageCache, key: str, artifact_tmp: Path, reporter) -> dict | None:
    """Copy a cached export into the artifact; its metadata, or None on a miss (reason reported)."""
    return restore_entry(cache, EXPORT_STAGE, key, artifact_tmp, reporter)


