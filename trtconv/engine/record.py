"""What the engine stage did (EngineRecord), what TensorRT-LLM is installed, and atomic folder swaps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trtconv.core.errors import EngineUnavailable
from trtconv.engine.targets import ENGINE_TARGETS

BuiltTarget = Literal[tuple(ENGINE_TARGETS)]  # the engine.target values that produce something

NOT_INSTALLED_REASON = "not built: tensorrt_llm is not installed"


class EngineRecord(BaseModel):
    """One engine stage run, as the manifest records it."""

    model_config = ConfigDict(extra="forbid")

    target: BuiltTarget = Field(description="Which engine target ran.")
    status: Literal["built", "not_built", "failed"] = Field(description="built, not_built (could not run here) or failed.")
    reason: str | None = Field(None, description="Why it was not built or failed; null when built.")
    command: list[str] = Field(default_factory=list, description="The exact command that ran, or would have run (argument list).")
    options: dict[str, Any] = Field(default_factory=dict, description="The engine options as JSON (resolved values).")
    engine_dir: str | None = Field(None, description="Folder holding the result; null when nothing was written.")
    tensorrt_llm_version: str | None = Field(None, description="TensorRT-LLM that built it (null: not installed).")
    tensorrt_version: str | None = Field(None, description="TensorRT that built it (null: not installed / unknown).")
    gpu_name: str | None = Field(None, description="GPU it was built on.")
    sm: str | None = Field(None, description="Compute capability it was built for, e.g. 9.0.")
    wall_time_s: float | None = Field(None, description="Seconds the build (or smoke check) took.")
    files: list[str] = Field(default_factory=list, description="Files written, relative to engine_dir.")
    warnings: list[str] = Field(default_factory=list, description="Soft problems found by the plan checks.")
    log_tail: str | None = Field(None, description="Last lines of the build / smoke-check output.")


@dataclass(frozen=True)
class TrtllmInstall:
    """What a fresh Python process sees: can it import tensorrt_llm, and which versions."""

    importable: bool
    version: str | None
    tensorrt_version: str | None
    error: str | None = None


_PROBE_SCRIPT = """
import json
out = {"importable": False, "version": None, "tensorrt_version": None, "error": None}
try:
    import tensorrt_llm
    out["importable"] = True
    out["version"] = str(getattr(tensorrt_llm, "__version__", None))
except ModuleNotFoundError as exc:
    out["error"] = None if exc.name == "tensorrt_llm" else repr(exc)
except Exception as exc:
    out["error"] = repr(exc)
try:
    import tensorrt
    out["tensorrt_version"] = str(getattr(tensorrt, "__version__", None))
except Exception:
    pass
print("TRTCONV_PROBE " + json.dumps(out))
"""


def probe_tensorrt_llm(timeout_s: float = 600) -> TrtllmInstall:
    """Import tensorrt_llm (and tensorrt) in a child process and report versions.

    A child process because importing tensorrt_llm initialises CUDA and MPI, which must not happen
    inside the pipeline process; and because "installed" only counts when it actually imports.
    """
    result = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=timeout_s, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("TRTCONV_PROBE "):
            data = json.loads(line.split(" ", 1)[1])
            return TrtllmInstall(**data)
    return TrtllmInstall(False, None, None, error=f"probe exited {result.returncode}: {result.stderr.strip()[-2000:]}")


def not_built(record: EngineRecord, reason: str, *, require: bool) -> EngineRecord:
    """The record for an engine that cannot be built here; raises EngineUnavailable when one was required."""
    if require:
        command = " ".join(record.command)
        raise EngineUnavailable(f"{reason} (engine required by --require-engine); the command that would run: {command}")
    return record.model_copy(update={"status": "not_built", "reason": reason})


def staging_dir_for(final_dir: Path) -> Path:
    """A hidden sibling of final_dir (same filesystem, so the final rename is atomic)."""
    return final_dir.parent / f".{final_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def swap_into_place(staging_dir: Path, final_dir: Path) -> None:
    """Replace final_dir by staging_dir; a previous final_dir survives until the new one is in place."""
    if not final_dir.exists():
        staging_dir.rename(final_dir)
        return
    previous = final_dir.parent / f".{final_dir.name}.previous-{uuid.uuid4().hex[:8]}"
    final_dir.rename(previous)
    try:
        staging_dir.rename(final_dir)
    except OSError:
        previous.rename(final_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def tail(text: str, max_chars: int = 4000) -> str:
    return text if len(text) <= max_chars else "..." + text[-max_chars:]


def failure_line(output: str) -> str:
    """The most telling line of a failed build's output (the last error line, else the last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|error:|Required but not provided)", line):
            return line
    return lines[-1] if lines else "(no output)"
