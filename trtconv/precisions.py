"""The registry of precisions trtconv offers: one explicit table, nothing discovered by magic.

Each entry ties trtconv's name to ModelOpt's preset (``modelopt.recipe.presets.QUANT_CFG_CHOICES``),
the ``quant_algo`` the TensorRT-LLM checkpoint must carry, the GPU it needs, and the accuracy gate
shipped by default (see docs/accuracy.md for the measurements behind the thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass

# GPU generations that bring the tensor cores a format needs (SM numbers, as DeviceInfo.sm_number).
SM_FP8 = 89  # Ada (8.9) and Hopper (9.0): FP8 tensor cores
SM_FP4 = 100  # Blackwell (10.0): FP4 tensor cores

# The shipped gates, checked against measurements (docs/accuracy.md): on the trained reference Llama
# every precision passes with a wide margin (fp8 KL 0.00017 on every pack, top-1 0.985); on a real
# pretrained model, SmolLM2-135M-Instruct, fp8 measured KL 0.037 [0.033, 0.043] and top-1 0.891:
# 11 % of next tokens change, real damage, so it fails -- the gate sits 3.7x below that whole interval
# and ~50x above the good case. Kept as they were, never loosened to make a build pass; a failed gate
# comes with advice instead (trtconv.gate.sensitivity).
# The multiple-choice gate's shipped default: a candidate may lose at most this many accuracy points
# (interval-based). It is the same for every precision: the task's items, not the format, set the noise.
TASK_ACCURACY_DROP_PP = 3.0

# Export bytes per quantized Linear weight element, scales included (Precision.linear_weight_bytes):
# int8 SmoothQuant: one byte plus a float32 per-channel scale (counted for 4096-wide rows);
# int4 AWQ: two weights per byte plus an fp16 scale per group of 128; NVFP4: two e2m1 weights per
# byte plus one FP8 scale per block of 16 (the per-tensor global scale is negligible).
INT8_SQ_BYTES = 1.0 + 4 / 4096
INT4_GROUP_BYTES = 0.5 + 2 / 128
NVFP4_BYTES = 0.5 + 1 / 16


@dataclass(frozen=True)
class Precision:
    name: str
    modelopt_preset: str | None  # key of modelopt.recipe.presets.QUANT_CFG_CHOICES; None = no quantization
    quant_algo: str | None  # TensorRT-LLM checkpoint `quantization.quant_algo`
    description: str
    # Shipped gate thresholds: gate key (trtconv.gate.gates.GATES) -> threshold; every gate has one.
    default_gates: dict[str, float]
    # Bytes per quantized Linear weight element in the export, scales included (the memory plan's
    # checkpoint and serving sizes); None = not quantized, the export dtype's bytes.
    linear_weight_bytes: float | None
    # Rung on the accuracy ladder (more bits, more accuracy; docs/accuracy.md): a failed gate's advice
    # names the precisions on higher rungs (trtconv.gate.sensitivity.higher_precisions). Unique per row.
    ladder_rung: int
    min_sm: int | None = None  # lowest GPU SM that runs it (89 = Ada, 90 = Hopper); None = any
    uses_group_size: bool = False  # AWQ: weights quantized in groups along the input dim
    # ModelOpt's fake-quant forward of this format runs only on CUDA (dynamic block quantization:
    # "amax must be a CUDA tensor"); the gate's independent check runs that forward, so the
    # pipeline refuses such a precision on a CPU before any work (engine.plan.preflight).
    needs_cuda: bool = False
    # Calibration rescales the weights themselves (AWQ's and SmoothQuant's per-input-channel scales, folded into
    # the weight; measured on tiny models of every family: fp8 and none leave every parameter as it was). precision
    # auto gives such a candidate its own copy of the weights; the others share the original's (stages.search).
    rewrites_weights: bool = False


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(
            "none",
            None,
            None,
            "No quantization: the baseline build in the export dtype.",
            default_gates={
                "max_ppl_increase_pct": 1.0,
                "max_kl": 0.002,
                "min_top1_agreement": 0.98,
                "max_task_accuracy_drop_pp": TASK_ACCURACY_DROP_PP,
            },
            linear_weight_bytes=None,
            ladder_rung=5,
        ),
        Precision(
            "fp8",
            "fp8",
            "FP8",
            "FP8 (e4m3) weights and activations, per-tensor scales.",
            min_sm=SM_FP8,
            default_gates={
                "max_ppl_increase_pct": 3.0,
                "max_kl": 0.01,
                "min_top1_agreement": 0.93,
                "max_task_accuracy_drop_pp": TASK_ACCURACY_DROP_PP,
            },
            linear_weight_bytes=1.0,
            ladder_rung=4,
        ),
        Precision(
            "int8_sq",
            "int8_smoothquant",
            "W8A8_SQ_PER_CHANNEL",
            "INT8 SmoothQuant: int8 weights (per channel) and activations (per tensor), smoothed.",
            default_gates={
                "max_ppl_increase_pct": 3.0,
                "max_kl": 0.01,
                "min_top1_agreement": 0.93,
                "max_task_accuracy_drop_pp": TASK_ACCURACY_DROP_PP,
            },
            linear_weight_bytes=INT8_SQ_BYTES,
            rewrites_weights=True,
            ladder_rung=3,
        ),
        Precision(
            "int4_awq",
            "int4_awq",
            "W4A16_AWQ",
            "INT4 AWQ: 4-bit weights in groups, 16-bit activations.",
            uses_group_size=True,
            default_gates={
                "max_ppl_increase_pct": 6.0,
                "max_kl": 0.02,
                "min_top1_agreement": 0.9,
                "max_task_accuracy_drop_pp": TASK_ACCURACY_DROP_PP,
            },
            linear_weight_bytes=INT4_GROUP_BYTES,
            rewrites_weights=True,
            ladder_rung=1,
        ),
        Precision(
            "w4a8_awq",
            "w4a8_awq_beta",
            "W4A8_AWQ",
            "INT4 AWQ weights with FP8 activations.",
            min_sm=SM_FP8,
            uses_group_size=True,
            default_gates={
                "max_ppl_increase_pct": 6.0,
                "max_kl": 0.02,
                "min_top1_agreement": 0.9,
                "max_task_accuracy_drop_pp": TASK_ACCURACY_DROP_PP,
            },
            linear_weight_bytes=INT4_GROUP_BYTES,
            rewrites_weights=True,
            ladder_rung=2,
        ),
        Precision(
            "nvfp4",
            "nvfp4",  # NVFP4_DEFAULT_CFG
            "NVFP4",
            "NVFP4: e2m1 weights and activations in blocks of 16 with FP8 block scales and a global scale (Blackwell).",
            min_sm=SM_FP4,
            needs_cuda=True,
            # Provisional (docs/accuracy.md): 4-bit activations cost about 5x FP8's KL on the reference model.
            default_gates={
                "max_ppl_increase_pct": 8.0,
                "max_kl": 0.04,
                "min_top1_agreement": 0.85,
                "max_task_accuracy_drop_pp": TASK_ACCURACY_DROP_PP,
            },
            linear_weight_bytes=NVFP4_BYTES,
            ladder_rung=0,
        ),
    )
}


@dataclass(frozen=True)
class KVCacheFormat:
    name: str
    modelopt_preset: str | None  # key of modelopt.recipe.presets.KV_QUANT_CFG_CHOICES
    kv_cache_quant_algo: str | None
    min_sm: int | None = None


KV_CACHE_FORMATS: dict[str, KVCacheFormat] = {
    k.name: k
    for k in (
        KVCacheFormat("none", None, None),
        KVCacheFormat("fp8", "fp8", "FP8", min_sm=SM_FP8),
    )
}

# quant_algos of TensorRT-LLM checkpoints that trtconv does not make but still checks when it builds
# an engine from one (`trtconv engine` reads the checkpoint's own config), with the GPU each needs.
OTHER_CHECKPOINT_ALGOS_MIN_SM: dict[str, int] = {
    "FP8_PER_CHANNEL_PER_TOKEN": SM_FP8,
    "FP8_BLOCK_SCALES": SM_FP8,
    "W4A8_NVFP4_FP8": SM_FP4,
}


def _min_sm_by_algo() -> dict[str, int]:
    table = dict(OTHER_CHECKPOINT_ALGOS_MIN_SM)
    rows = [(p.quant_algo, p.min_sm) for p in PRECISIONS.values()]
    rows += [(k.kv_cache_quant_algo, k.min_sm) for k in KV_CACHE_FORMATS.values()]
    for algo, sm in rows:
        if algo is not None and sm is not None:
            table[algo] = sm
    return table


# checkpoint quant_algo or kv_cache_quant_algo -> the lowest SM that runs it (absent: any CUDA GPU).
# Derived from the rows above, so a precision's GPU need is written once (its row).
QUANT_ALGO_MIN_SM: dict[str, int] = _min_sm_by_algo()


def linear_bytes(precision: str, export_dtype_bytes: int) -> float:
    """Bytes per Linear weight element in the export: the row's, or the export dtype's where it does not quantize."""
    return PRECISIONS[precision].linear_weight_bytes or export_dtype_bytes


def min_sm(precision: str, kv_cache: str) -> int | None:
    """The lowest GPU SM that serves this precision and KV-cache format (None: any CUDA GPU)."""
    needs = [sm for sm in (PRECISIONS[precision].min_sm, KV_CACHE_FORMATS[kv_cache].min_sm) if sm is not None]
    return max(needs, default=None)


def get_precision(name: str) -> Precision:
    from trtconv.core.errors import RecipeError

    if name not in PRECISIONS:
        raise RecipeError(f"unknown precision {name!r}; allowed: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
