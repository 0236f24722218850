"""Where an engine may run: the stamp written next to it, and the check that refuses a mismatch.

A TensorRT plan is tuned for the GPU architecture it was built on (loading it on another SM fails
with "generated on an incompatible device"), carries TensorRT's serialization version (another
TensorRT fails with "Serialization assertion stdVersionRead == kSERIALIZATION_VERSION"), and embeds
TensorRT-LLM's plugins and config format (TensorRT-LLM itself has no version check, so a mismatch
shows up later and less clearly). trtconv stamps all three and refuses a mismatch up front.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import UserError
from trtconv.core.jsonio import read_json_object

STAMP_NAME = "trtconv-engine.json"
STAMP_FORMAT = 1


def write_engine_stamp(
    engine_dir: Path,
    *,
    target: str,
    device: DeviceInfo | None,
    tensorrt_llm_version: str | None,
    tensorrt_version: str | None,
    world_size: int,
) -> Path:
    stamp = {
        "format": STAMP_FORMAT,
        "target": target,
        "sm": device.sm if device else None,
        "gpu_name": device.name if device else None,
        "tensorrt_llm": tensorrt_llm_version,
        "tensorrt": tensorrt_version,
        "world_size": world_size,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(engine_dir) / STAMP_NAME
    path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_engine_stamp(engine_dir: Path) -> dict[str, Any]:
    path = Path(engine_dir) / STAMP_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing: this engine folder was not built by trtconv, so where it may run is unknown. Rebuild it with `trtconv engine`")
    stamp = read_json_object(path, "the engine's build stamp", UserError, hint="rebuild the engine with `trtconv engine`")
    if stamp.get("format") != STAMP_FORMAT:
        raise UserError(f"{path}: format {stamp.get('format')!r} is not one this trtconv reads (expects {STAMP_FORMAT})")
    return stamp


def check_engine_compatible(engine_dir: Path, device: DeviceInfo, versions: dict[str, str | None]) -> None:
    """Refuse to run an engine on a GPU / TensorRT / TensorRT-LLM other than the one it was built with.

    `versions` maps "tensorrt_llm" and "tensorrt" to the installed versions (None = not installed),
    as `trtconv.core.environment.package_versions()` returns them.
    """
    stamp = read_engine_stamp(engine_dir)
    if stamp.get("target") == "pytorch":
        return _check_pytorch_versions(engine_dir, stamp, versions)
    built_for = f"built on {stamp.get('gpu_name')} (SM {stamp.get('sm')})"
    if device.sm is None:
        raise UserError(f"engine {engine_dir} was {built_for}; this machine has no CUDA GPU ({device.name}), and TensorRT engines need one")
    if stamp.get("sm") != device.sm:
        raise UserError(
            f"engine {engine_dir} was {built_for}; this GPU {device.name!r} is SM {device.sm}. TensorRT plans only load on the compute "
            "capability they were built for: rebuild here with `trtconv engine OUT`"
        )
    for package, label in (("tensorrt", "TensorRT"), ("tensorrt_llm", "TensorRT-LLM")):
        built_with, installed = stamp.get(package), versions.get(package)
        if built_with is None:
            continue  # unknown at build time: nothing to compare against
        if installed != built_with:
            here = f"{installed} is installed" if installed else "it is not installed here"
            raise UserError(
                f"engine {engine_dir} was built with {label} {built_with}; {here}. Engines only load under the {label} that built them: "
                f"install {label} {built_with} or rebuild here with `trtconv engine OUT`"
            )


def _check_pytorch_versions(engine_dir: Path, stamp: dict[str, Any], versions: dict[str, str | None]) -> None:
    # The PyTorch target has no compiled plan; only a TensorRT-LLM old enough to lack the LLM-API
    # options matters, which the plan checks cover. Require it to be installed at all.
    if versions.get("tensorrt_llm") is None:
        raise UserError(f"{engine_dir} is for TensorRT-LLM's PyTorch backend (prepared with {stamp.get('tensorrt_llm')}); tensorrt_llm is not installed here")
