"""The quantization formats trtconv can check and run: one ``QuantFormat`` row per ``quant_algo``.

A checkpoint's ``quant_algo`` decides, for every quantized linear: which tensors a TensorRT-LLM
rank file holds and their shapes (the validator, trtconv.checkpoints.trtllm_format), how the
stored weight becomes what the GEMM multiplies (both readers), in which format the GEMM's input
runs (the activation quantizer both readers emulate), and, in ModelOpt's unified HF checkpoint,
which scale tensors must sit next to each weight and in which dtype the weight is stored. Those
facts used to live in five tables and two if-chains; each is now a field of one row, so a new
format (NVFP4, ...) is one row here with its functions.

NVFP4 (added as one row) brings the only new numerics: e2m1 unpacking and rounding, and a dynamic
activation quantizer (nvfp4_round_trip), checked against ModelOpt's NVFP4QTensor in
tests/contract/test_nvfp4.py. The older numerics were moved here verbatim from the two readers; the reference executor's outputs
are bit-identical to before (tests/test_reference_executor.py, tests/test_hf_checkpoint_executor.py).
Shapes and dtypes were measured on ModelOpt 0.47 exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trtconv.core.errors import CheckpointError

FP8_E4M3_MAX = 448.0
INT8_MIN, INT8_MAX = -128, 127

# NVFP4: e2m1 values in blocks of 16 along the input dim, one FP8 e4m3 scale per block, and a
# float32 global scale (TensorRT-LLM's block size is fixed: config group_size must be 16).
NVFP4_BLOCK = 16
E2M1_MAX = 6.0
# e2m1 magnitudes by code (bit 3 is the sign), and the midpoints between neighbours.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# --------------------------------------------------------------------------------------------
# Numeric primitives the engine's kernels apply
# --------------------------------------------------------------------------------------------


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to FP8 e4m3 with a per-tensor scale (saturating, as the kernels do), back in x's dtype."""
    q = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def int8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.round(x.float() / scale).clamp(INT8_MIN, INT8_MAX)
    return (q * scale).to(x.dtype)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """(out/2, in) int8 bytes -> (out, in) signed int4 values: low nibble = even output row."""
    as_int = packed.to(torch.int16)
    low = ((as_int & 0x0F) ^ 0x08) - 0x08  # sign-extend a nibble
    high = (((as_int >> 4) & 0x0F) ^ 0x08) - 0x08
    return torch.stack((low, high), dim=1).reshape(-1, packed.shape[1]).float()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) float32 e2m1 values: low nibble = even input column (ModelOpt's packing)."""
    as_int = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((as_int & 0x0F, as_int >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[codes & 0x07]
    return torch.where(codes >= 8, -magnitudes, magnitudes)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) rounded to the nearest e2m1 value, ties to the even code,
    saturating at +-6: what the hardware's cvt.rn.satfinite.e2m1 and ModelOpt's _cast_fp4 do."""
    magnitude = x.abs().float().clamp(max=E2M1_MAX)
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=x.device)
    index = torch.bucketize(magnitude, midpoints)  # a tie lands on the lower code
    tie = (index < len(_E2M1_MIDPOINTS)) & (magnitude == midpoints[index.clamp(max=len(_E2M1_MIDPOINTS) - 1)])
    index = torch.where(tie & (index % 2 == 1), index + 1, index)  # ... unless that code is odd
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)[index]
    return torch.where(x < 0, -values, values)


def nvfp4_round_trip(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """x quantized to NVFP4 on the fly and back, as TensorRT-LLM's FP4 activation quantizer does.

    What is emulated (TensorRT-LLM's fp4_quantize / cvt_warp_fp16_to_fp4 kernel): the input is cut
    into blocks of 16 along its last dim; each block's scale is amax(block) / 6 divided by the
    static global scale (the checkpoint's activation_scaling_factor, amax / (6 x 448)), rounded to
    FP8 e4m3 (saturating at 448); the block is divided by fp8_scale x global_scale, rounded to
    e2m1 (nearest, ties to even, saturating at 6) and multiplied back. Not emulated: the kernel
    computes in the model dtype with a reciprocal, so a value on a rounding boundary can land one
    code away; the interleaved (swizzled) scale layout is a storage detail without numeric effect.
    """
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    g = global_scale.float().reshape(())
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (block_amax / E2M1_MAX / g).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    scale = block_scale * g
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.where(scale == 0, torch.zeros_like(blocks), round_to_e2m1(blocks / safe))
    return (q * scale).reshape(shape).to(x.dtype)


# Activation kind (QuantFormat.activation) -> x, static scale -> x as the GEMM sees it.
ACTIVATION_ROUND_TRIPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fp8": fp8_round_trip,
    "int8": int8_round_trip,
    "nvfp4": nvfp4_round_trip,
}


# --------------------------------------------------------------------------------------------
# TensorRT-LLM rank files: shape rules of one linear's tensors
# --------------------------------------------------------------------------------------------
# A rule gets the rank-local (out, in) and the AWQ group size. "model" as a dtype means the
# checkpoint's own dtype (config "dtype"); the others are safetensors dtype strings.

ShapeRule = Callable[[int, int, int], tuple[int, ...]]


def _weight_shape(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (out, inp)


def _int4_packed_shape(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (out // 2, inp)  # two int4 per byte along out


def _per_tensor(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (1,)


def _scalar(out: int, inp: int, group: int) -> tuple[int, ...]:
    return ()  # NVFP4's global scales are 0-d tensors (measured on ModelOpt 0.47 exports)


def _e2m1_packed_shape(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (out, inp // 2)  # two e2m1 per byte along in


def _per_nvfp4_block(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (out, inp // NVFP4_BLOCK)


def _per_out_channel(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (out,)


def _per_in_channel(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (inp,)


def _per_group(out: int, inp: int, group: int) -> tuple[int, ...]:
    return (out, inp // group)


# --------------------------------------------------------------------------------------------
# Stored weight -> what the GEMM multiplies (TensorRT-LLM names; the HF reader maps onto them)
# --------------------------------------------------------------------------------------------
# (weight, weights_scaling_factor as float32, weights_scaling_factor_2, group_size) -> float32 (out, in)


def _dequantize_per_tensor(weight, wsf, wsf_2, group_size) -> torch.Tensor:
    return weight.float() * wsf


def _dequantize_per_out_channel(weight, wsf, wsf_2, group_size) -> torch.Tensor:
    return weight.float() * wsf[:, None]  # per output channel


def _dequantize_int4_groups(weight, wsf, wsf_2, group_size) -> torch.Tensor:
    # One scale per (output row, group of `group_size` inputs).
    return unpack_int4_rows(weight) * wsf.repeat_interleave(group_size, dim=1)


def _dequantize_int4_groups_fp8(weight, wsf, wsf_2, group_size) -> torch.Tensor:
    dequantized = _dequantize_int4_groups(weight, wsf, wsf_2, group_size)
    # The W4A8 kernel turns int4*scale into FP8 with the per-tensor weights_scaling_factor_2
    # and restores it in alpha: that FP8 rounding is part of what the engine computes.
    return fp8_round_trip(dequantized, wsf_2.float())


def _dequantize_nvfp4(weight, wsf, wsf_2, group_size) -> torch.Tensor:
    # e2m1 value x FP8 block scale (one per 16 inputs) x float32 global scale.
    if wsf_2 is None:
        raise CheckpointError("quant_algo NVFP4: a linear has no weights_scaling_factor_2 (the global scale)")
    return unpack_e2m1(weight) * wsf.repeat_interleave(NVFP4_BLOCK, dim=1) * wsf_2.float().reshape(())


def dequantize_linear_weight(
    algo: str | None,
    weight: torch.Tensor,
    weights_scaling_factor: torch.Tensor | None,
    weights_scaling_factor_2: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """A linear's stored weight -> float32 (out, in), as the engine's GEMM sees it."""
    if algo is None:
        return weight.float()
    if weights_scaling_factor is None:
        raise CheckpointError(f"quant_algo {algo}: a linear has no weights_scaling_factor")
    return QUANT_FORMATS[algo].dequantize(weight, weights_scaling_factor.float(), weights_scaling_factor_2, group_size)


# --------------------------------------------------------------------------------------------
# Unified HF checkpoint: one fused GEMM's members (q/k/v, gate/up) as the runtime loads them
# --------------------------------------------------------------------------------------------
# A member is an hf_reader.StoredLinear (weight, weight_scale, weight_scale_2, input_scale,
# pre_quant_scale, prefix). (group, group_size, runtime dtype, file) -> each member's float32 weight.


def check_group_size(stored: Any, group_size: int, where: Path) -> None:
    inputs, groups = stored.weight.shape[1], stored.weight_scale.shape[-1]
    if groups * group_size != inputs:
        raise CheckpointError(
            f"{where}: tensor {stored.prefix}.weight_scale has {groups} groups for {inputs} inputs, "
            f"but group_size is {group_size}"
        )


def same_across_group(group: list, field: str, where: Path) -> torch.Tensor | None:
    """A value a fused GEMM can hold once: present on all members or none, and equal."""
    values = [getattr(s, field) for s in group]
    if all(v is None for v in values):
        return None
    for member, value in zip(group, values):
        if value is None or not torch.equal(value, values[0]):
            raise CheckpointError(
                f"{where}: {member.prefix}.{field} differs from {group[0].prefix}.{field} (or is missing), "
                "but they are fused into one GEMM and must be equal"
            )
    return values[0]


def requantize_fp8(weight: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """TensorRT-LLM's fused FP8 load: FP8 -> model dtype, x own scale, / group max, -> FP8 (in that dtype)."""
    rescaled = weight.to(dtype) * scale.to(dtype)
    return (rescaled / group_scale.to(dtype)).to(torch.float8_e4m3fn)


def w4a8_weight(stored: Any, weight_scale_2: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 x float16(weight_scale / weight_scale_2) -> FP8, then x weight_scale_2 (the kernel's alpha)."""
    kernel_scale = (stored.weight_scale.float() / weight_scale_2.float()).to(torch.float16).float()
    fp8_weight = dequantize_linear_weight("W4A8_AWQ", stored.weight.view(torch.int8), kernel_scale, torch.ones(()), group_size)
    return fp8_weight * weight_scale_2.float()


def _hf_unquantized(group: list, group_size: int, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    return [s.weight.float() for s in group]


def _hf_fp8(group: list, group_size: int, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    # The runtime re-quantizes every member to the group's largest scale (a second FP8 rounding).
    group_scale = torch.stack([s.weight_scale.float().reshape(()) for s in group]).max()
    return [
        dequantize_linear_weight("FP8", requantize_fp8(s.weight, s.weight_scale.float(), group_scale, runtime_dtype), group_scale, None, 0)
        for s in group
    ]


def _hf_per_channel(group: list, group_size: int, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    return [dequantize_linear_weight("W8A8_SQ_PER_CHANNEL", s.weight, s.weight_scale.reshape(-1), None, 0) for s in group]


def _hf_int4_groups(group: list, group_size: int, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    for s in group:
        check_group_size(s, group_size, where)
    return [dequantize_linear_weight("W4A16_AWQ", s.weight.view(torch.int8), s.weight_scale, None, group_size) for s in group]


def _hf_int4_groups_fp8(group: list, group_size: int, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    for s in group:
        check_group_size(s, group_size, where)
    weight_scale_2 = same_across_group(group, "weight_scale_2", where)
    return [w4a8_weight(s, weight_scale_2, group_size) for s in group]


def _hf_nvfp4(group: list, group_size: int, runtime_dtype: torch.dtype, where: Path) -> list[torch.Tensor]:
    # ModelOpt unifies weight_scale_2 across q/k/v and gate/up; a fused GEMM has one global scale.
    if group_size != NVFP4_BLOCK:
        raise CheckpointError(f"{where}: NVFP4 group_size is {group_size}; TensorRT-LLM runs only {NVFP4_BLOCK}")
    for s in group:
        inputs, blocks = s.weight.shape[1] * 2, s.weight_scale.shape[-1]  # two e2m1 per byte along in
        if blocks * NVFP4_BLOCK != inputs:
            raise CheckpointError(
                f"{where}: tensor {s.prefix}.weight_scale has {blocks} blocks for {inputs} inputs; NVFP4 needs one per {NVFP4_BLOCK}"
            )
    weight_scale_2 = same_across_group(group, "weight_scale_2", where)
    return [dequantize_linear_weight("NVFP4", s.weight, s.weight_scale, weight_scale_2, NVFP4_BLOCK) for s in group]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

HFGroupDequantize = Callable[[list, int, torch.dtype, Path], list[torch.Tensor]]


@dataclass(frozen=True)
class QuantFormat:
    quant_algo: str | None  # TensorRT-LLM / ModelOpt `quant_algo`; None = unquantized
    # TensorRT-LLM rank file: tensor suffix of one linear -> (dtype, shape rule), in file order.
    trtllm_tensors: dict[str, tuple[str, ShapeRule]]
    # The format the GEMM's input runs in (ACTIVATION_ROUND_TRIPS): "fp8" / "int8" static per-tensor,
    # "nvfp4" dynamic blocks of 16 under a static global scale; None = unquantized.
    activation: str | None
    # Stored weight -> float32 (weight, weights_scaling_factor, weights_scaling_factor_2, group_size); None row: unused.
    dequantize: Callable[..., torch.Tensor] | None
    # Unified HF checkpoint: scales every quantized linear must carry (pre_quant_scale is optional:
    # AWQ folds it into the norm for q/k/v and gate/up), the weight's stored dtypes, values a fused
    # group must share, and how a fused group's weights are loaded.
    hf_scales: tuple[str, ...]
    hf_weight_dtypes: tuple[torch.dtype, ...]
    hf_equal_in_fused_group: tuple[str, ...]
    hf_dequantize: HFGroupDequantize
    uses_groups: bool = False  # weights_scaling_factor holds one scale per group of inputs (AWQ)


QUANT_FORMATS: dict[str | None, QuantFormat] = {
    f.quant_algo: f
    for f in (
        QuantFormat(
            None,
            trtllm_tensors={"weight": ("model", _weight_shape)},
            activation=None,
            dequantize=None,
            hf_scales=(),
            hf_weight_dtypes=(),
            hf_equal_in_fused_group=(),
            hf_dequantize=_hf_unquantized,
        ),
        QuantFormat(
            "FP8",
            trtllm_tensors={
                "weight": ("F8_E4M3", _weight_shape),
                "weights_scaling_factor": ("F32", _per_tensor),
                "activation_scaling_factor": ("F32", _per_tensor),
            },
            activation="fp8",
            dequantize=_dequantize_per_tensor,
            hf_scales=("weight_scale", "input_scale"),
            hf_weight_dtypes=(torch.float8_e4m3fn,),
            hf_equal_in_fused_group=(),
            hf_dequantize=_hf_fp8,
        ),
        QuantFormat(
            "W8A8_SQ_PER_CHANNEL",
            trtllm_tensors={
                "weight": ("I8", _weight_shape),
                "weights_scaling_factor": ("F32", _per_out_channel),
                "activation_scaling_factor": ("F32", _per_tensor),
                "prequant_scaling_factor": ("model", _per_in_channel),
            },
            activation="int8",
            dequantize=_dequantize_per_out_channel,
            hf_scales=("weight_scale", "input_scale"),
            hf_weight_dtypes=(torch.int8,),
            hf_equal_in_fused_group=(),
            hf_dequantize=_hf_per_channel,
        ),
        QuantFormat(
            "W4A16_AWQ",
            trtllm_tensors={
                "weight": ("I8", _int4_packed_shape),
                "weights_scaling_factor": ("F32", _per_group),
                "prequant_scaling_factor": ("model", _per_in_channel),
            },
            activation=None,
            dequantize=_dequantize_int4_groups,
            hf_scales=("weight_scale",),
            hf_weight_dtypes=(torch.uint8, torch.int8),
            hf_equal_in_fused_group=(),
            hf_dequantize=_hf_int4_groups,
            uses_groups=True,
        ),
        QuantFormat(
            "W4A8_AWQ",
            trtllm_tensors={
                "weight": ("I8", _int4_packed_shape),
                "weights_scaling_factor": ("F32", _per_group),
                "weights_scaling_factor_2": ("F32", _per_tensor),
                "activation_scaling_factor": ("F32", _per_tensor),
                "prequant_scaling_factor": ("model", _per_in_channel),
            },
            activation="fp8",
            dequantize=_dequantize_int4_groups_fp8,
            hf_scales=("weight_scale", "weight_scale_2", "input_scale"),
            hf_weight_dtypes=(torch.uint8, torch.int8),
            # TensorRT-LLM refuses to load a fused group whose input_scale differs.
            hf_equal_in_fused_group=("input_scale",),
            hf_dequantize=_hf_int4_groups_fp8,
            uses_groups=True,
        ),
        QuantFormat(
            "NVFP4",
            trtllm_tensors={
                "weight": ("U8", _e2m1_packed_shape),
                "weights_scaling_factor": ("F8_E4M3", _per_nvfp4_block),
                "weights_scaling_factor_2": ("F32", _scalar),
                "activation_scaling_factor": ("F32", _scalar),
            },
            activation="nvfp4",
            dequantize=_dequantize_nvfp4,
            hf_scales=("weight_scale", "weight_scale_2", "input_scale"),
            hf_weight_dtypes=(torch.uint8,),
            hf_equal_in_fused_group=("weight_scale_2",),
            hf_dequantize=_hf_nvfp4,
        ),
    )
}

# What the validator and both readers accept, null first (error messages list them in this order).
SUPPORTED_QUANT_ALGOS: tuple[str | None, ...] = tuple(QUANT_FORMATS)
