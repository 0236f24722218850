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


def detect_device(prefer: str = "auto") -> DeviceInfo:
    """The device the pipeline will use: the first CUDA GPU when available (unless prefer == "cpu")."""
    import torch

    if prefer != "cpu" and torch.cuda.is_available():
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
    return DeviceInfo(kind="cpu", name=cpu_model_name(), count=os.cpu_count() or 1)


def numeric_environment() -> dict[str, str]:
    return {k: os.environ[k] for k in NUMERIC_ENV_VARS if k in os.environ}


def host_summary() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "python_executable": sys.executable}
