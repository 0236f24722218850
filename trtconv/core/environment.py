"""What this run ran on: package versions and the compute device.

Recorded in every manifest and part of every cache key, because each of these can change the
bytes an export writes or the numbers an evaluation prints.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Distribution names whose versions a manifest records. `tensorrt_llm` / `tensorrt` are null where
# they are not installed (the common case off a GPU host).
TRACKED_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "nvidia-modelopt": "nvidia-modelopt",
    "datasets": "datasets",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "accelerate": "accelerate",
    "tensorrt_llm": "tensorrt_llm",
    "tensorrt": "tensorrt",
}

# Environment variables that change numerics or what gets loaded; recorded so a run can be redone.
NUMERIC_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        # tensorrt_llm's distribution is published as "tensorrt-llm"; try the other spelling.
        alt = dist.replace("_", "-") if "_" in dist else dist.replace("-", "_")
        try:
            return importlib.metadata.version(alt)
        except importlib.metadata.PackageNotFoundError:
            return None


def package_versions() -> dict[str, str | None]:
    from trtconv import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "trtconv": __version__}
    for key, dist in TRACKED_PACKAGES.items():
        versions[key] = package_version(dist)
    return versions


@dataclass(frozen=True)
class DeviceInfo:
    """The device a stage computes on. `sm` is e.g. "9.0" for H100/H200, None on CPU."""

    kind: str  # "cpu" | "cuda"
    name: str
    sm: str | None = None
    count: int = 0
    memory_gib: float | None = None
    cuda: str | None = None
    driver: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sm_number(self) -> int | None:
        """SM as an integer (9.0 -> 90, 8.9 -> 89), for comparisons with requirements."""
        if self.sm is None:
            return None
        major, minor = self.sm.split(".")
        return int(major) * 10 + int(minor)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect_device(prefer: str = "auto", memo: Path | None = None) -> DeviceInfo:
    """The device the pipeline will use: the first CUDA GPU when available (unless prefer == "cpu").

    Asking torch means importing it (4-5 s on the H200 host), which is most of an unchanged
    recipe's whole-run cache hit. With ``memo`` (a JSON file in trtconv's cache) the answer is
    remembered under a fingerprint of everything that can change it without torch being imported:
    the preference, torch's installed version, the device-selection variables, the boot, the NVIDIA
    driver and `nvidia-smi -L` (GPUs, MIG instances, UUIDs). Without nvidia-smi on a machine with
    an NVIDIA driver nothing is remembered. "cpu" never imports torch."""
    if prefer == "cpu":
        return _cpu_device()
    fingerprint = _host_fingerprint(prefer) if memo is not None else None
    remembered = _read_memo(memo).get(fingerprint) if fingerprint else None
    if remembered is not None:
        return DeviceInfo(**remembered)
    info = _ask_torch(prefer)
    if fingerprint:
        _write_memo(memo, fingerprint, info)
    return info


def _cpu_device() -> DeviceInfo:
    return DeviceInfo(kind="cpu", name=cpu_model_name(), count=os.cpu_count() or 1)


DEVICE_SELECTION_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HIP_VISIBLE_DEVICES",
                         "ROCR_VISIBLE_DEVICES")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _host_fingerprint(prefer: str) -> str | None:
    import hashlib
    import shutil
    import subprocess

    driver = _read_text("/proc/driver/nvidia/version")
    gpus = ""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            gpus = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    elif driver:
        return None  # a driver whose GPUs cannot be listed: ask torch every time
    parts = [prefer, sys.prefix, package_version("torch") or "", _read_text("/proc/sys/kernel/random/boot_id"), driver, gpus,
             str(os.path.exists("/dev/kfd"))] + [f"{k}={os.environ.get(k)}" for k in DEVICE_SELECTION_VARS]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _read_memo(memo: Path) -> dict:
    import json

    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: Path, fingerprint: str, info: DeviceInfo) -> None:
    """Best effort (a read-only cache only means asking torch next time); one entry per fingerprint, latest kept."""
    import json

    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({fingerprint: info.to_dict()}), encoding="utf-8")
        os.replace(tmp, memo)
    except OSError:
        pass


def _ask_torch(prefer: str) -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return DeviceInfo(
            kind="cuda",
            name=props.name,
            sm=f"{props.major}.{props.minor}",
            count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    if prefer == "cuda":
        from trtconv.core.errors import UserError

        raise UserError("device 'cuda' was asked for, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return _cpu_device()


def numeric_environment() -> dict[str, str]:
    return {k: os.environ[k] for k in NUMERIC_ENV_VARS if k in os.environ}


def host_summary() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "python_executable": sys.executable}
