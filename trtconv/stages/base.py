"""What every stage shares: the meter that times a stage and records its peak memory.

A stage is a module with a small entry point (`run`) that takes its section of the recipe and the
previous stage's result; the pipeline times each one with `StageMeter` and keeps the records, so
no stage appends to a list it was handed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from trtconv.artifact.manifest import InputRecord, StageRecord
from trtconv.cache.store import StageCache
from trtconv.core import interrupts
from trtconv.core.environment import DeviceInfo
from trtconv.core.ui import stage_phase


def _status_mib(field: str = "VmRSS") -> float | None:
    """A memory line of /proc/self/status in MiB (None off Linux). VmRSS counts the pages of
    memory-mapped files too (a safetensors checkpoint read through mmap: page cache, shared and
    reclaimable); RssAnon is the process's own memory, what it needs the host to have."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rss_mib() -> float | None:
    return _status_mib("VmRSS")


class Laps:
    """Where a stage's time went, lap by lap, in one dict of seconds (the stage record's `seconds`)."""

    def __init__(self):
        self.t = time.monotonic()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> dict[str, float]:
        t = time.monotonic()
        self.seconds[name] = round(t - self.t, 3)
        self.t = t
        return self.seconds


class StageMeter:
    """Wall time, peak resident memory and its anonymous part (sampled every 50 ms) and peak CUDA memory of one stage."""

    def __init__(self, name: str):
        self.name = name
        self.peak_rss = 0.0
        self.peak_anon: float | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._take()

    def _take(self) -> None:
        rss, anon = _rss_mib(), _status_mib("RssAnon")
        if rss is not None:
            self.peak_rss = max(self.peak_rss, rss)
        if anon is not None:
            self.peak_anon = max(self.peak_anon or 0.0, anon)

    def __enter__(self) -> StageMeter:
        import torch

        interrupts.check(f"{self.name}:start")  # a stage boundary; before any thread starts

        self.cuda = torch.cuda.is_available()
        # Every visible device: a split run (--gpus) computes on several. Only once CUDA is initialised: before
        # that nothing was allocated, and an explicit index does not initialise it (torch raises "Invalid device
        # argument"; run G2, a Gemma run whose first stage came before any CUDA call).
        if self.cuda and torch.cuda.is_initialized():
            for idx in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(idx)
        self.peak_rss = _rss_mib() or 0.0
        self._take()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._phase = stage_phase(self.name)  # spinner / CI heartbeat, and a closing line with the time
        self._phase.__enter__()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._phase.__exit__(*exc)
        self.wall_s = time.monotonic() - self._t0
        self._stop.set()
        self._thread.join()
        self._take()
        # The per-GPU peak: the largest device's (one entry per device when several were used).
        self.peak_gpus = [torch.cuda.max_memory_allocated(i) / 2**20 for i in range(torch.cuda.device_count())] if self.cuda else []
        self.peak_gpu = max(self.peak_gpus) if self.peak_gpus else None
        if exc[0] is None:
            interrupts.check(f"{self.name}:end")  # a stage boundary (an exception already unwinding goes on)

    def record(self, status: str = "ok", **details) -> StageRecord:
        return StageRecord(
            name=self.name,
            status=status,
            wall_s=round(self.wall_s, 3),
            peak_rss_mib=round(self.peak_rss, 1),
            peak_gpu_mib=round(self.peak_gpu, 1) if self.peak_gpu is not None else None,
            details={**details, **({"peak_rss_anon_mib": round(self.peak_anon, 1)} if self.peak_anon is not None else {}),
                     **({"peak_gpu_mib_per_device": [round(g, 1) for g in self.peak_gpus]}
                        if sum(g > 0 for g in getattr(self, "peak_gpus", [])) > 1 else {})},
        )


# ---------------------------------------------------------------------------------------------
# The stage cache as stages use it: key parts every stage shares, and restore with the reason of a miss


def device_part(device: DeviceInfo) -> dict:
    # Calibration numerics differ between CPU and GPU kernels, and between GPU generations.
    return {"kind": device.kind, "name": device.name if device.kind == "cuda" else None, "sm": device.sm}


def files_part(inputs: list[InputRecord]) -> list:
    return sorted((rec.role, f.path, f.sha256) for rec in inputs for f in rec.files)


def restore_entry(cache: StageCache, stage: str, key: str, dest: Path, reporter) -> dict | None:
    """The entry's files copied into dest and its metadata, or None on a miss (reason reported).

    `restore` checks sizes, then hashes while copying: the data is read once, and a corrupted
    entry leaves nothing in dest.
    """
    if cache.restore(stage, key, dest) is None:
        miss = cache.last_miss
        if miss is not None and miss.kind != "absent":
            reporter.warn(f"{stage}: cache entry not used ({miss.kind}: {miss.detail}); rebuilding")
        return None
    return cache.read_record(cache.entry_dir(stage, key))["meta"]
