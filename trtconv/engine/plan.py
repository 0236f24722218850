"""Checks of an engine plan that run BEFORE any work: option combinations, precision x GPU, versions.

Every rejection is a `UserError` whose message names the key, the value, and why (with the fact
from TensorRT-LLM it rests on); soft problems come back as warning strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trtconv.recipe.engine import EngineSection, PyTorchBackendOptions, TensorRTEngineOptions
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import UserError
from trtconv.core.ui import Reporter
from trtconv.engine.targets import ENGINE_TARGETS, NO_ENGINE
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS, QUANT_ALGO_MIN_SM, SM_FP4, SM_FP8

if TYPE_CHECKING:
    from trtconv.recipe.schema import Recipe

# Minimum SM per checkpoint algorithm comes from the precision registry (trtconv.precisions): FP8
# tensor cores arrive with Ada (8.9), FP4 with Blackwell (10.0).
FP8_MIN_SM = SM_FP8
NVFP4_MIN_SM = SM_FP4
FP8_ALGOS = frozenset(algo for algo, sm in QUANT_ALGO_MIN_SM.items() if sm == SM_FP8)
NVFP4_ALGOS = frozenset(algo for algo, sm in QUANT_ALGO_MIN_SM.items() if sm == SM_FP4)
# Checkpoints on which FP8 context FMHA does anything (TensorRT-LLM ignores the flag elsewhere).
FP8_CONTEXT_FMHA_ALGOS = frozenset({"FP8", "NVFP4"})
# FP8 context FMHA kernels exist for Ada (8.9) and Hopper (9.0) only, per TensorRT-LLM's docs.
FP8_CONTEXT_FMHA_SMS = frozenset({89, 90})
KV_CACHE_QUANT_ALGOS = frozenset({"FP8", "INT8", "NVFP4"})

# Supported TensorRT-LLM releases per target: trtconv.engine.targets.ENGINE_TARGETS (min/max_trtllm).
TENSORRT_TARGET_MIN = ENGINE_TARGETS["tensorrt"].min_trtllm
TENSORRT_TARGET_MAX_MINOR = ENGINE_TARGETS["tensorrt"].max_trtllm
PYTORCH_TARGET_MIN = ENGINE_TARGETS["pytorch"].min_trtllm


@dataclass(frozen=True)
class OptionAvailability:
    """An option that exists only in some TensorRT-LLM releases: [since, until)."""

    target: str
    option: str
    since: tuple[int, int]
    until: tuple[int, int] | None
    why: str


# Options whose TensorRT-LLM counterpart is missing from some release that a target otherwise
# accepts. Every trtllm-build flag trtconv passes exists unchanged in 1.0-1.2 (build.py / plugin.py
# read at 1.0 and 1.2), so today the one row only restates the pytorch target's floor; add a row when
# an option is added whose flag or LLM-API key appears or disappears inside a supported range.
OPTION_AVAILABILITY: tuple[OptionAvailability, ...] = (
    OptionAvailability("pytorch", "cuda_graphs", (1, 0), None, "cuda_graph_config replaced use_cuda_graph in 1.0"),
)


def parse_version(version: str) -> tuple[int, int, int, bool]:
    """(major, minor, micro, is_prerelease) of a version such as "1.2.0", "1.3.0rc24" or "1.0.0.post1"."""
    match = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)$", version)
    if not match:
        raise UserError(f"cannot read the TensorRT-LLM version {version!r}: expected something like 1.2.0 or 1.3.0rc2")
    major, minor, micro = (int(part or 0) for part in match.groups()[:3])
    rest = match.group(4).lower()
    is_pre = bool(re.match(r"^[.-]?(a|b|rc|dev|alpha|beta|pre)", rest))
    return major, minor, micro, is_pre


def min_sm_for_precision(quant_algo: str | None, kv_cache_quant_algo: str | None = None) -> int | None:
    """Lowest SM (e.g. 89) that runs this checkpoint precision; None when any CUDA GPU does."""
    needs = [QUANT_ALGO_MIN_SM[algo] for algo in (quant_algo, kv_cache_quant_algo) if algo in QUANT_ALGO_MIN_SM]
    return max(needs, default=None)


def check_precision_on_device(quant_algo: str | None, kv_cache_quant_algo: str | None, device: DeviceInfo | None) -> list[str]:
    """Refuse a precision the GPU cannot run; warn where the device is unknown or not a GPU.

    Used by `trtconv doctor`, the pipeline's pre-flight check and `check_engine_plan`.
    """
    needed = min_sm_for_precision(quant_algo, kv_cache_quant_algo)
    if needed is None:
        return []
    precision = f"quant_algo={quant_algo}, kv_cache_quant_algo={kv_cache_quant_algo}"
    if device is None or device.sm_number is None:
        where = "no device given" if device is None else f"device {device.name!r} is not a CUDA GPU"
        return [f"{precision} needs a GPU with SM >= {_sm_text(needed)}; {where}, so this was not checked"]
    if device.sm_number < needed:
        family = "NVFP4 (Blackwell)" if needed == NVFP4_MIN_SM else "FP8 (Ada/Hopper or newer)"
        raise UserError(
            f"{precision} needs {family} tensor cores, SM >= {_sm_text(needed)}; this GPU {device.name!r} is SM {device.sm}. "
            "Pick a precision this GPU runs (e.g. int4_awq or int8_sq), or build on a newer GPU"
        )
    return []


def check_engine_plan(
    section: EngineSection,
    *,
    quant_algo: str | None,
    kv_cache_quant_algo: str | None,
    tp_size: int,
    pp_size: int,
    num_kv_heads: int,
    device: DeviceInfo | None,
    trtllm_version: str | None,
) -> list[str]:
    """Reject an impossible engine plan before calibration starts; return warnings for soft problems.

    `trtllm_version` None means TensorRT-LLM is not installed here: the plan is still checked, but
    version rules cannot be, and the stage will record the command instead of building.
    """
    if section.target == NO_ENGINE:
        return []
    warnings: list[str] = []
    _check_parallelism(tp_size, pp_size, num_kv_heads)
    warnings += _check_version(section.target, trtllm_version)
    warnings += _check_option_availability(section, trtllm_version)
    from trtconv.engine.backends import BACKENDS

    warnings += BACKENDS[section.target].check_options(section, quant_algo=quant_algo, kv_cache_quant_algo=kv_cache_quant_algo,
                                                       device=device)
    if device is not None and device.kind == "cuda" and device.count and device.count < tp_size * pp_size:
        warnings.append(
            f"tp_size x pp_size = {tp_size * pp_size} GPUs are needed to RUN this engine; {device.count} visible here "
            "(a tensorrt build itself needs only one)"
        )
    return warnings


def check_tensorrt_options(
    options: TensorRTEngineOptions, *, quant_algo: str | None, kv_cache_quant_algo: str | None, device: DeviceInfo | None
) -> list[str]:
    """The trtllm-build option rules (engine.tensorrt.*)."""
    _check_checkpoint_algos(quant_algo, kv_cache_quant_algo)
    warnings = check_precision_on_device(quant_algo, kv_cache_quant_algo, device)
    _check_tokens_per_block(options.tokens_per_block)
    if options.opt_num_tokens is not None and options.multiple_profiles:
        raise UserError(
            f"engine.tensorrt.opt_num_tokens={options.opt_num_tokens} cannot be combined with engine.tensorrt.multiple_profiles=true: "
            "trtllm-build refuses the pair (several profiles pick their own optimum). Remove one of them"
        )
    if options.max_seq_len is not None and options.max_input_len > options.max_seq_len:
        raise UserError(
            f"engine.tensorrt.max_input_len={options.max_input_len} is larger than engine.tensorrt.max_seq_len={options.max_seq_len}: "
            "max_seq_len counts the prompt plus the output, so it must be >= max_input_len"
        )
    _check_inflight_batching(options)
    _check_fp8_context_fmha(options, quant_algo, device)
    _check_gemm_plugin(options.gemm_plugin, quant_algo)
    if options.tokens_per_block < 8 or options.tokens_per_block > 128:
        warnings.append(
            f"engine.tensorrt.tokens_per_block={options.tokens_per_block}: the XQA generation kernels support 8-128 tokens per block; "
            "outside that range generation falls back to slower kernels"
        )
    return warnings


def check_pytorch_options(
    options: PyTorchBackendOptions, *, quant_algo: str | None, kv_cache_quant_algo: str | None, device: DeviceInfo | None
) -> list[str]:
    """The LLM-API option rules (engine.pytorch.*)."""
    kv_algo = "FP8" if options.kv_cache_dtype == "fp8" else kv_cache_quant_algo
    warnings = check_precision_on_device(quant_algo, kv_algo, device)
    if options.kv_cache_dtype == "fp8" and kv_cache_quant_algo != "FP8":
        warnings.append(
            "engine.pytorch.kv_cache_dtype=fp8 on a checkpoint calibrated without an FP8 KV cache "
            f"(kv_cache_quant_algo={kv_cache_quant_algo}): the KV scales default to 1.0, which can cost accuracy; "
            "calibrate with an FP8 KV cache instead"
        )
    if isinstance(options.cuda_graphs, list) and max(options.cuda_graphs) > options.max_batch_size:
        warnings.append(
            f"engine.pytorch.cuda_graphs has batch sizes above max_batch_size={options.max_batch_size}: {options.cuda_graphs}; "
            "those graphs are never used"
        )
    return warnings


def _check_parallelism(tp_size: int, pp_size: int, num_kv_heads: int) -> None:
    if tp_size < 1 or pp_size < 1:
        raise UserError(f"export.tp_size={tp_size} and export.pp_size={pp_size} must both be >= 1")
    if num_kv_heads % tp_size != 0:
        raise UserError(
            f"export.tp_size={tp_size} does not divide the model's {num_kv_heads} KV heads: tensor parallelism splits the KV heads "
            f"across GPUs. Allowed tp_size here: {[n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0]}"
        )


def _check_version(target: str, trtllm_version: str | None) -> list[str]:
    from trtconv.engine.backends import BACKENDS

    if trtllm_version is None:
        return [f"TensorRT-LLM is not installed here: the {target} target will be recorded, not built (not_built)"]
    major, minor, _, is_pre = parse_version(trtllm_version)
    return BACKENDS[target].check_version(major, minor, is_pre, trtllm_version)


def tensorrt_version_rule(major: int, minor: int, is_pre: bool, trtllm_version: str) -> list[str]:
    """engine.target tensorrt: TensorRT-LLM 1.0-1.2 (the TensorRT engine backend's releases)."""
    if (major, minor) < TENSORRT_TARGET_MIN:
        raise UserError(
            f"engine.target=tensorrt needs TensorRT-LLM 1.0-1.2; {trtllm_version} is installed. 0.x builds with other flags and "
            "defaults (e.g. use_paged_context_fmha and use_fp8_context_fmha were off). Install tensorrt-llm>=1.0,<1.3"
        )
    if (major, minor) > TENSORRT_TARGET_MAX_MINOR:
        raise UserError(
            f"engine.target=tensorrt needs TensorRT-LLM 1.0-1.2; {trtllm_version} is installed. After 1.2 the TensorRT engine "
            "backend is deprecated (1.3.0rc) and then removed (trtllm-build, LLM(backend='tensorrt')). Use engine.target: pytorch "
            "(TensorRT-LLM's PyTorch backend loads the unified HF checkpoint), or install tensorrt-llm>=1.0,<1.3"
        )
    return [f"TensorRT-LLM {trtllm_version} is a pre-release"] if is_pre else []


def pytorch_version_rule(major: int, minor: int, is_pre: bool, trtllm_version: str) -> list[str]:
    """engine.target pytorch: TensorRT-LLM 1.0 or later (tensorrt_llm.LLM is the PyTorch backend from 1.0)."""
    if (major, minor) < PYTORCH_TARGET_MIN:
        raise UserError(
            f"engine.target=pytorch needs TensorRT-LLM 1.0 or later (the PyTorch backend became tensorrt_llm.LLM in 1.0); "
            f"{trtllm_version} is installed"
        )
    return []


def _check_option_availability(section: EngineSection, trtllm_version: str | None) -> list[str]:
    if trtllm_version is None:
        return []
    major, minor, _, _ = parse_version(trtllm_version)
    options = getattr(section, section.target)  # the target's options section (engine.<target>)
    for row in OPTION_AVAILABILITY:
        if row.target != section.target or row.option not in options.model_fields_set:
            continue
        too_old = (major, minor) < row.since
        too_new = row.until is not None and (major, minor) >= row.until
        if too_old or too_new:
            span = f"{_v(row.since)}" + (f" up to before {_v(row.until)}" if row.until else " and later")
            raise UserError(
                f"engine.{row.target}.{row.option} is not available in TensorRT-LLM {trtllm_version}: it exists in {span} ({row.why})"
            )
    return []


def _check_checkpoint_algos(quant_algo: str | None, kv_cache_quant_algo: str | None) -> None:
    if quant_algo == "INT8":
        raise UserError("checkpoint quantization.quant_algo=INT8 is not a weight/activation algorithm TensorRT-LLM builds (KV cache only)")
    if kv_cache_quant_algo is not None and kv_cache_quant_algo not in KV_CACHE_QUANT_ALGOS:
        raise UserError(
            f"checkpoint quantization.kv_cache_quant_algo={kv_cache_quant_algo} is not one TensorRT-LLM accepts; allowed: "
            f"{sorted(KV_CACHE_QUANT_ALGOS)} or null"
        )


def _check_tokens_per_block(tokens_per_block: int) -> None:
    if tokens_per_block & (tokens_per_block - 1):
        raise UserError(
            f"engine.tensorrt.tokens_per_block={tokens_per_block} must be a power of two (e.g. 16, 32, 64, 128): "
            "the paged KV-cache kernels index blocks with bit shifts"
        )


def _check_inflight_batching(options: TensorRTEngineOptions) -> None:
    if not options.inflight_batching:
        return
    missing = []
    if options.kv_cache_type != "paged":
        missing.append(f"kv_cache_type=paged (is {options.kv_cache_type})")
    if not options.remove_input_padding:
        missing.append("remove_input_padding=true (is false)")
    if options.gpt_attention_plugin == "disable":
        missing.append("gpt_attention_plugin enabled (is disable)")
    if missing:
        raise UserError(
            "engine.tensorrt.inflight_batching=true needs " + ", ".join(missing) + ". "
            "In-flight batching packs requests of different lengths into one step, which needs the attention plugin, "
            "packed input and a paged KV cache. Fix those options, or set inflight_batching: false for a static-batching engine"
        )


def _check_fp8_context_fmha(options: TensorRTEngineOptions, quant_algo: str | None, device: DeviceInfo | None) -> None:
    if options.use_fp8_context_fmha is not True:
        return
    key = "engine.tensorrt.use_fp8_context_fmha=true"
    if quant_algo not in FP8_CONTEXT_FMHA_ALGOS:
        raise UserError(
            f"{key} needs an FP8 or NVFP4 checkpoint; this one has quant_algo={quant_algo} "
            "(TensorRT-LLM would silently ignore it). Remove it or leave it null (auto)"
        )
    if not options.context_fmha:
        raise UserError(f"{key} needs engine.tensorrt.context_fmha=true: FP8 context FMHA is a variant of the context FMHA kernel")
    if device is not None and device.sm_number is not None and device.sm_number not in FP8_CONTEXT_FMHA_SMS:
        raise UserError(
            f"{key} needs an Ada or Hopper GPU (SM 8.9 or 9.0); this GPU {device.name!r} is SM {device.sm}. "
            "Leave it null (auto) to use it only where it exists"
        )


def _check_gemm_plugin(gemm_plugin: str | None, quant_algo: str | None) -> None:
    if gemm_plugin == "fp8" and quant_algo not in FP8_ALGOS:
        raise UserError(f"engine.tensorrt.gemm_plugin=fp8 needs an FP8 checkpoint; this one has quant_algo={quant_algo}")
    if gemm_plugin == "nvfp4" and quant_algo not in NVFP4_ALGOS:
        raise UserError(f"engine.tensorrt.gemm_plugin=nvfp4 needs an NVFP4 checkpoint; this one has quant_algo={quant_algo}")


def resolve_fp8_context_fmha(options: TensorRTEngineOptions, quant_algo: str | None, device: DeviceInfo | None) -> bool:
    """The value passed to --use_fp8_context_fmha: the explicit one, or auto (FP8/NVFP4 checkpoint on SM 89/90)."""
    if options.use_fp8_context_fmha is not None:
        return options.use_fp8_context_fmha
    if quant_algo not in FP8_CONTEXT_FMHA_ALGOS or not options.context_fmha:
        return False
    sm = device.sm_number if device is not None else None
    # Unknown SM: keep TensorRT-LLM's own default (enable); the build machine's TensorRT-LLM decides.
    return sm is None or sm in FP8_CONTEXT_FMHA_SMS


def _sm_text(sm: int) -> str:
    return f"{sm // 10}.{sm % 10}"


def _v(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def check_cuda_forward(precision, device_kind: str) -> None:
    """Refuse, before any work, a precision whose fake-quant forward needs CUDA on a CPU-only run."""
    if precision.needs_cuda and device_kind != "cuda":
        raise UserError(
            f"quantization.precision {precision.name!r} needs a CUDA GPU to calibrate and to gate: ModelOpt's "
            f"{precision.quant_algo} fake-quant forward runs only on CUDA ('amax must be a CUDA tensor for dynamic block "
            "quantization'), and the accuracy gate's independent check runs that forward; run on a CUDA GPU "
            "(any; serving needs SM >= 10.0) or pick a precision that calibrates on CPU: "
            + ", ".join(p.name for p in PRECISIONS.values() if not p.needs_cuda)
        )


def preflight(recipe: Recipe, hf_cfg: dict, device, reporter: Reporter) -> None:
    """build's pre-flight: refuse (UserError) what `device` cannot run, say the rest as warnings."""
    for w in preflight_warnings(recipe, hf_cfg, device):
        reporter.warn(w)


def preflight_warnings(recipe: Recipe, hf_cfg: dict, device) -> list[str]:
    """The precision and engine plan against `device`: raises what build refuses, returns its warnings.
    `trtconv plan` and `doctor` call this same function for the device they plan for."""
    from trtconv.core.environment import package_version

    for name in recipe.quantization.precisions_used:  # auto: every candidate is calibrated and may be written
        check_cuda_forward(PRECISIONS[name], device.kind)
    # auto: the candidate needing the newest GPU stands for the mix (the search may give any layer its format)
    precision = max((PRECISIONS[n] for n in recipe.quantization.precisions_used), key=lambda p: p.min_sm or 0)
    quant_algo = precision.quant_algo
    kv_algo = KV_CACHE_FORMATS[recipe.quantization.kv_cache].kv_cache_quant_algo
    warnings = []
    if device.kind == "cuda" and recipe.engine.target != NO_ENGINE:
        warnings += check_precision_on_device(quant_algo, kv_algo, device)
    elif device.kind == "cuda" and min_sm_for_precision(quant_algo, kv_algo) is not None:
        # Calibration and the gate run on any CUDA GPU; only the engine needs the tensor cores.
        try:
            check_precision_on_device(quant_algo, kv_algo, device)
        except UserError as exc:
            warnings.append(f"{exc} (engine.target is none: calibration, export and the gate run here; serve it on such a GPU)")
    warnings += check_engine_plan(
        recipe.engine,
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_algo,
        tp_size=recipe.export.tp_size,
        pp_size=recipe.export.pp_size,
        num_kv_heads=hf_cfg.get("num_key_value_heads") or hf_cfg.get("num_attention_heads") or 1,
        device=device if device.kind == "cuda" else None,
        trtllm_version=package_version("tensorrt_llm"),
    )
    return warnings
