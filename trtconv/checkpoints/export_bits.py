"""Was the export really quantized? Bits per weight of the exported linears, from the safetensors headers alone.

Users of ModelOpt and llm-compressor have shipped "quantized" MoE checkpoints that were not: experts
kept in BF16, an export the size of the original (Model-Optimizer #569, #1255; an NVFP4 label over 6.1
bits per parameter, #868). The gate would judge such files as accurate (they are: they are barely
quantized), so the size is checked on its own, cheaply: the headers name every tensor's dtype and
shape, no tensor data is read (seconds at 70B).

The rule, valid for every family: every 2-D ``.weight`` inside the decoder layers (``.layers.``) whose
module the checkpoint's ``exclude_modules`` does not name is a quantized linear, and over those the
stored bits per weight must not exceed what the precision implies (8 x Precision.linear_weight_bytes:
8 for fp8 / int8, 4.125 for int4 groups, ...). Packed 4-bit weights (two per uint8/int8 byte) count
two weights a byte. A BF16 linear among FP8 ones fails, naming the tensors stored wider.
"""

from __future__ import annotations

import fnmatch
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from trtconv.core.errors import CheckpointError
from trtconv.precisions import PRECISIONS

# Bits per stored element of the safetensors dtypes an export holds.
DTYPE_BITS = {"F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8, "BF16": 16, "F16": 16, "F32": 32, "I32": 32, "F64": 64}


@dataclass(frozen=True)
class WeightBits:
    bits_per_weight: float  # over the quantized linears' weights (scales not counted)
    limit: float  # what the precision implies
    linears: int  # how many linear weights were counted
    wider: tuple[str, ...]  # tensors stored wider than the precision's weights

    def record(self) -> dict:
        return {"bits_per_weight": round(self.bits_per_weight, 3), "limit": self.limit, "linears": self.linears,
                "wider": list(self.wider[:20])}


def read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header


def _excluded(hf_dir: Path) -> list[str]:
    path = hf_dir / "hf_quant_config.json"
    if not path.is_file():
        return []
    return list((json.loads(path.read_text(encoding="utf-8")).get("quantization") or {}).get("exclude_modules") or [])


def _tally(hf_dir: Path, limit_of) -> tuple[float, int, list[str]]:
    """Every decoder-layer linear weight of a unified HF checkpoint against its format's bit limit
    (limit_of(module) -> bits, or None to skip it): (stored bits per logical weight, count, those stored wider).
    Packed 4-bit weights (two per byte in U8/I8) count as two logical weights per element."""
    stored = logical = 0
    count, wider = 0, []
    for path in sorted(hf_dir.glob("*.safetensors")):
        for name, info in read_header(path).items():
            module = name.removesuffix(".weight")
            if module == name or ".layers." not in name or len(info["shape"]) != 2:
                continue
            limit = limit_of(module)
            if limit is None:
                continue
            bits = DTYPE_BITS.get(info["dtype"], 16)
            numel = info["shape"][0] * info["shape"][1]
            packed = 2 if limit < 8 and info["dtype"] in ("U8", "I8") else 1
            stored, logical, count = stored + bits * numel, logical + numel * packed, count + 1
            if bits / packed > limit:
                wider.append(f"{name} ({info['dtype']})")
    return (stored / logical if logical else 0.0), count, wider


def linear_weight_bits(hf_dir: Path, weight_bytes: float) -> WeightBits:
    """The quantized linears' stored bits per weight in a unified HF checkpoint (weight_bytes: the precision's)."""
    excluded = _excluded(hf_dir)
    limit = 8 * weight_bytes
    bits, count, wider = _tally(hf_dir, lambda m: None if any(fnmatch.fnmatchcase(m, p) for p in excluded) else limit)
    return WeightBits(bits, limit, count, tuple(wider))


def check_quantized_size(hf_dir: Path, precision: str, weight_bytes: float | None) -> WeightBits | None:
    """Refuse (exit 2) an export whose linears are stored wider than ``precision`` implies; None when unquantized."""
    if weight_bytes is None:
        return None
    found = linear_weight_bits(hf_dir, weight_bytes)
    if found.bits_per_weight > found.limit:
        raise CheckpointError(
            f"{hf_dir}: the export is not really {precision}: its decoder-layer linears store {found.bits_per_weight:.2f} "
            f"bits per weight, {precision} implies at most {found.limit:g}; {len(found.wider)} of {found.linears} are stored "
            f"wider: {', '.join(found.wider[:5])}{' …' if len(found.wider) > 5 else ''}. Exclude those modules on purpose "
            "(quantization.exclude) or report the export as a ModelOpt bug"
        )
    return found


# Stored bits per weight of each quant_algo a mixed checkpoint's `quantized_layers` names (scales not counted):
# from the precisions table (its bytes per weight include the scales, hence the floor).
ALGO_BITS = {p.quant_algo: int(8 * p.linear_weight_bytes) for p in PRECISIONS.values() if p.quant_algo and p.linear_weight_bytes}


def mixed_weight_bits(hf_dir: Path) -> WeightBits:
    """A MIXED_PRECISION checkpoint (`quantization.precision: auto`): every decoder-layer linear against its own
    entry of `quantized_layers` (unlisted: unquantized, 16 bits); bits_per_weight over all of them, as the search counts."""
    path = hf_dir / "hf_quant_config.json"  # absent when the search kept every layer in 16 bits
    quant = (json.loads(path.read_text(encoding="utf-8")).get("quantization") or {}) if path.is_file() else {}
    layers = quant.get("quantized_layers") or {}
    one, excluded = quant.get("quant_algo"), quant.get("exclude_modules") or []
    if one not in (None, "MIXED_PRECISION"):  # the mix was one format (plus `none`): ModelOpt writes that format
        algo_of = lambda m: None if any(fnmatch.fnmatchcase(m, p) for p in excluded) else one  # noqa: E731
    else:
        algo_of = lambda m: (layers.get(m) or {}).get("quant_algo")  # noqa: E731
    bits, count, wider = _tally(hf_dir, lambda m: ALGO_BITS.get(algo_of(m), 16))
    if wider:
        raise CheckpointError(f"{hf_dir}: {len(wider)} decoder-layer linears are stored wider than their quantized_layers "
                              f"format: {', '.join(wider[:5])}; report the export as a ModelOpt bug")
    return WeightBits(bits, 16.0, count, ())
