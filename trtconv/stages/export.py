"""Stage 3, export: the TensorRT-LLM checkpoint (and, when asked, ModelOpt's unified HF checkpoint).

ModelOpt writes the TensorRT-LLM config.json "manually" when tensorrt_llm is not installed, and under
transformers 5 that config silently loses `rotary_base` and `rotary_scaling` (it looks for a
top-level `rope_theta`; transformers 5 keeps it in `rope_parameters`) and has no `qwen_type` for
Qwen2. A Llama-3 model would then run with rope theta 10000 instead of 500000: wrong output, no
error. A Mistral sliding window is dropped too (and TensorRT-LLM's own converter drops it as well),
so an engine would attend over the whole sequence. So after exporting we repair the config from the
HF config (the window into runtime_defaults.max_attention_window: trtconv.architectures), record
every repair, and then validate the written files against the format. The unified HF checkpoint's
linears must be stored as narrow as the precision implies (trtconv.checkpoints.export_bits): an
export that is "quantized" in name only is refused.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtconv.artifact.layout import CHECKPOINT_DIR, HF_CHECKPOINT_DIR, TOKENIZER_DIR
from trtconv.architectures import ARCHITECTURES, WINDOW_CONFIG_PATH, hf_attention_window
from trtconv.checkpoints.export_bits import check_quantized_size
from trtconv.checkpoints.hf_model import compute_dtype
from trtconv.core.errors import CheckpointError
from trtconv.artifact.manifest import InputRecord
from trtconv.cache.store import StageCache, stage_key, versions_for_key
from trtconv.core.environment import DeviceInfo
from trtconv.core.jsonio import read_json_object
from trtconv.stages.base import Laps, device_part, files_part, restore_entry
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS
from trtconv.recipe.schema import ExportSection, QuantizationSection, Recipe
from trtconv.core.ui import quiet_dependency

NAME = "export"
# export_key: what can change the bytes of checkpoint/, hf_checkpoint/, tokenizer/ (calibration included).
CACHE_KEY_COVERS: tuple[str, ...] = ("model files", "model dtype, compute dtype and trust_remote_code", "quantization", "calibration",
                                       "calibration data sha256", "export", "versions", "device")



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
    seconds: dict = field(default_factory=dict)  # where the stage's time went (stage record, not the manifest's export)

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
    quant = cfg.get("quantization") or {}
    excluded = quant.get("exclude_modules")
    if isinstance(excluded, list) and excluded != sorted(excluded):
        # ModelOpt writes list(set(...)): its order follows PYTHONHASHSEED, so the bytes would differ run to run.
        repairs.append(Repair("quantization.exclude_modules", excluded, sorted(excluded),
                              "ModelOpt's order depends on the Python hash seed; sorted for reproducible bytes"))
        quant["exclude_modules"] = sorted(excluded)
    row = ARCHITECTURES[architecture]
    for extra in row.trtllm_config_keys:
        put(extra.key, extra.value, extra.why)
    written = {extra.key for extra in row.trtllm_config_keys}
    for key, hf_key in (("attn_bias", "attention_bias"), ("mlp_bias", "mlp_bias")):
        if key not in written:
            put(key, bool(getattr(hf_config, hf_key, False)), "stated explicitly from the HF config")
    window = hf_attention_window(hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config))
    if window is not None:  # the load stage refused a window the architecture cannot convert
        section, key = WINDOW_CONFIG_PATH
        put(section, {**(cfg.get(section) or {}), key: [window]},
            "the HF sliding_window; TensorRT-LLM reads no window from the model config, the runtime takes it from here")
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


def export_trtllm(model, hf_config, architecture: str, section: ExportSection, quant, out: Path, warns: list[str], clock=None):
    import torch

    from trtconv.core.imports import import_modelopt

    import_modelopt()  # first, on its own thread: see trtconv.core.imports
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
    if clock is not None:
        clock.lap("modelopt_export")
    repairs = finish_trtllm_config(out, hf_config, architecture, quant)
    if clock is not None:
        clock.lap("config_repair")
    return repairs


def finish_trtllm_config(out: Path, hf_config, architecture: str, quant: QuantizationSection) -> list[Repair]:
    """Repair and check the exported config.json, make the files readable; the repairs made."""
    cfg_path = out / "config.json"
    cfg = read_json_object(cfg_path, "the TensorRT-LLM checkpoint config ModelOpt wrote", CheckpointError)
    repairs = repair_trtllm_config(cfg, hf_config, architecture)
    check_quantization_section(cfg, quant, cfg_path)
    cfg_path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    make_readable(out)
    return repairs


def export_hf(model, tokenizer, section: ExportSection, quant: QuantizationSection, out: Path, warns: list[str]):
    import torch

    if not quant.quantizes:
        model.save_pretrained(out)
    else:
        from trtconv.core.imports import import_modelopt

        import_modelopt()  # first, on its own thread: see trtconv.core.imports
        from modelopt.torch.export import export_hf_checkpoint

        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[section.dtype]
        with quiet_dependency(warns):
            # The exporter folds scales into the model it is given: hand it a copy when the TensorRT-LLM
            # export still needs the calibrated model; otherwise nothing reads it afterwards, and a copy
            # doubled the export's GPU peak (Qwen3-8B on an H100: 30.6 GiB against bare ModelOpt's 15.6).
            export_hf_checkpoint(copy.deepcopy(model) if section.tensorrt_llm_checkpoint else model, dtype=dtype, export_dir=out)
    return finish_hf_checkpoint(out, tokenizer, section)


def finish_hf_checkpoint(out: Path, tokenizer, section: ExportSection) -> list[Repair]:
    """What follows the unified HF export on either path (in memory, layer-streamed): the repairs made."""
    repairs = cast_float32_weights(out, section.dtype)
    save_tokenizer(tokenizer, out)  # ModelOpt writes no tokenizer; runtimes need one beside the weights
    make_readable(out)
    return repairs


def hf_validation(out: Path, quant: QuantizationSection) -> dict:
    """The unified checkpoint's size check (export_bits): its record for the manifest's validation."""
    if quant.is_auto:  # a per-layer or per-GEMM mix (trtconv.stages.search): each linear against its own format
        from trtconv.checkpoints.export_bits import mixed_weight_bits

        return {"hf_checkpoint_weight_bits": mixed_weight_bits(out).record()}
    bits = check_quantized_size(out, quant.precision, PRECISIONS[quant.precision].linear_weight_bytes)
    return {"hf_checkpoint_weight_bits": bits.record()} if bits is not None else {}


# Tensors the unified checkpoint keeps in float32 whatever the model dtype: the quantization scales.
_SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")


def cast_float32_weights(out: Path, dtype: str) -> list[Repair]:
    """Unquantized weights in export.dtype, as the TensorRT-LLM export writes them.

    On a CPU the model computes in float32 (checkpoints.hf_model.compute_dtype), and export_hf_checkpoint
    uses its dtype argument for the scales only: norms, embeddings and excluded linears came out float32
    with config.json "dtype": "float32", twice the size, and the gate judged a float32 runtime. On a GPU
    (bf16 compute) there is nothing to cast and no file is rewritten. Scales stay float32."""
    from safetensors.torch import load_file, save_file

    from trtconv.checkpoints.safetensors_stream import read_header

    import torch

    target = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cast = 0
    for path in sorted(out.glob("*.safetensors")):
        _, header = read_header(path)
        if not any(v.get("dtype") == "F32" and not k.endswith(_SCALE_SUFFIXES) for k, v in header.items() if k != "__metadata__"):
            continue
        tensors = load_file(path)
        for name, t in tensors.items():
            if t.dtype == torch.float32 and not name.endswith(_SCALE_SUFFIXES):
                tensors[name], cast = t.to(target), cast + 1
        save_file(tensors, path, metadata=header.get("__metadata__"))
    if not cast:
        return []
    _fix_index_size(out)
    config_path = out / "config.json"
    config = read_json_object(config_path, "the unified HF checkpoint's config", CheckpointError)
    before = config.get("dtype", config.get("torch_dtype"))
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [Repair("hf_checkpoint dtype", before, dtype, f"{cast} unquantized float32 tensors (computed on a CPU) cast to "
                   f"export.dtype {dtype}; scales stay float32")]


def _fix_index_size(out: Path) -> None:
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        return
    data = read_json_object(index, "the unified HF checkpoint's index", CheckpointError)
    from trtconv.checkpoints.safetensors_stream import read_header

    total = 0
    for path in sorted(set(data.get("weight_map", {}).values())):
        _, header = read_header(out / path)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    data.setdefault("metadata", {})["total_size"] = total
    index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.save_pretrained(out), minus one setting of the process that loaded it: transformers
    writes `local_files_only` into tokenizer_config.json from HF_HUB_OFFLINE at load time, so the same
    tokenizer gave different bytes (and artifact digests) online and offline (`make test` runs offline,
    `make demo` online). It is written as false, what an online load records, in place (the file's
    formatting is transformers' own)."""
    tokenizer.save_pretrained(out)
    config = Path(out) / "tokenizer_config.json"
    if config.is_file():
        text = config.read_text(encoding="utf-8")
        fixed = text.replace('"local_files_only": true', '"local_files_only": false')
        if fixed != text:
            config.write_text(fixed, encoding="utf-8")


def run(model, tokenizer, hf_config, architecture: str, section: ExportSection, quant: QuantizationSection, root: Path) -> ExportResult:
    from trtconv.checkpoints.trtllm_format import validate_checkpoint

    warns: list[str] = []
    tok_dir = root / TOKENIZER_DIR
    clock = Laps()
    save_tokenizer(tokenizer, tok_dir)
    result = ExportResult(checkpoint_dir=None, hf_checkpoint_dir=None, tokenizer_dir=tok_dir, dependency_warnings=warns,
                          seconds=clock.lap("tokenizer"))
    if section.hf_checkpoint:
        result.hf_checkpoint_dir = root / HF_CHECKPOINT_DIR
        result.repairs += export_hf(model, tokenizer, section, quant, result.hf_checkpoint_dir, warns)
        result.validation.update(hf_validation(result.hf_checkpoint_dir, quant))
        clock.lap("hf_checkpoint")
    if section.tensorrt_llm_checkpoint:
        result.checkpoint_dir = root / CHECKPOINT_DIR
        result.repairs += export_trtllm(model, hf_config, architecture, section, quant, result.checkpoint_dir, warns, clock)
        report = validate_checkpoint(result.checkpoint_dir)
        raw = report.to_dict() if hasattr(report, "to_dict") else dict(report.__dict__)
        result.validation = {**result.validation, **json.loads(json.dumps(raw, default=str))}  # paths -> strings: it goes into JSON records
        clock.lap("validation")
    return result


# ---------------------------------------------------------------------------------------------
# The stage cache: calibrate + export are one cached unit (see docs/cache.md for why)

EXPORT_STAGE = NAME  # the cache folder of this unit


def export_key(recipe: Recipe, inputs: list[InputRecord], calib_sha256: str, device: DeviceInfo,
               validation: dict | None = None) -> str:
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
            # precision auto: the search judges its trials with the gates (trtconv.stages.search); absent otherwise,
            # so every other recipe's key is unchanged
            # and measures them on evaluation-pack documents the gate does not use (search.validation_for)
            **({"search_gates": {"gates": recipe.evaluate.gates.model_dump(mode="json"), "seed": recipe.evaluate.seed,
                                 "allow_inconclusive": recipe.evaluate.allow_inconclusive},
                "search_validation": validation}
               if recipe.quantization.is_auto else {}),
        },
    )


class BackgroundStore:
    """The export stored in the cache on a thread, so hashing, linking and fsyncing an 8B export (8-16 GB) overlap
    the evaluation instead of delaying it. The file list is taken now, on the caller's thread:
    files written into the artifact later (engine, report, manifest) are not part of the entry.
    The thread has its own StageCache (one per thread). Call ``finish`` before hashing the
    artifact's outputs or committing it."""

    def __init__(self, cache: StageCache, key: str, artifact_tmp: Path, meta: dict[str, Any]):
        import threading

        from trtconv.cache.store import CacheError, payload_files

        self.cache = StageCache(cache.root, verify=cache.verify, max_size=cache.max_size)
        self.error: Exception | None = None
        try:
            files = payload_files(artifact_tmp)
        except CacheError as exc:
            self.error, self._thread = exc, None
            return

        def put() -> None:
            try:
                self.cache.put(EXPORT_STAGE, key, artifact_tmp, meta, files=files)
            except CacheError as exc:  # busy or disk full: the artifact is fine, it just isn't cached
                self.error = exc

        self._thread = threading.Thread(target=put, name="trtconv-cache-put")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self, reporter) -> None:
        from trtconv.cache.store import human_size

        self.wait()
        if self.error is not None:
            reporter.warn(f"not cached: {self.error}")
            self.error = None
        elif self.cache.last_evicted:
            freed = sum(e.size for e in self.cache.last_evicted)
            reporter.stage("cache", f"evicted {len(self.cache.last_evicted)} least recently used entries ({human_size(freed)}) "
                           f"to stay under max_size {human_size(self.cache.max_size)}")
            self.cache.last_evicted = []


def is_cached(cache: StageCache, key: str) -> bool:
    """Whether an export entry exists under key (a hint: restore_export still verifies it)."""
    return cache.entry_dir(EXPORT_STAGE, key).is_dir()


def restore_export(cache: StageCache, key: str, artifact_tmp: Path, reporter) -> dict | None:
    """Copy a cached export into the artifact; its metadata, or None on a miss (reason reported)."""
    return restore_entry(cache, EXPORT_STAGE, key, artifact_tmp, reporter)


