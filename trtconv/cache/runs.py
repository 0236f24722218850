"""A whole build remembered: a second run of an unchanged recipe links the finished artifact back.

The stage entries (the export, the evaluation statistics) already skip the expensive work, but a
run that reuses them still imports transformers and ModelOpt, checks the checkpoint's tensors,
tokenizes the data, recomputes the gates' bootstrap intervals and redraws the report: 17 s of a
74 s 8B conversion on an H200 (docs/performance.md), where the cache-hit target is 10 %. When
nothing that can change the artifact has changed, the finished artifact is the answer. That is:
the resolved recipe (every section, gates included), every input file's hash, the versions with
trtconv's own source, the device, the numeric environment variables and the build options that
shape the result. The input hashes come from the hash table (no file is read), so any file not in
it, or changed since, is a miss and the run goes through the stages as before.

A hit restores the artifact by hard link from the ``run`` entry stored when it was built, keeps
its verdict (a failed gate fails again, the same way), and writes a new manifest whose run facts
(command, time, host, stages marked ``reused``) are this run's. report.md says it was reused; the
artifact digest does not cover report.md, so the digest is the built one's.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from trtconv.artifact.layout import REPORT_NAME
from trtconv.artifact.manifest import InputRecord, Manifest, StageRecord, hash_tree
from trtconv.cache.store import CacheError, StageCache, stage_key, versions_for_key
from trtconv.core.environment import DeviceInfo, host_summary, numeric_environment

RUN_STAGE = "run"
CACHE_KEY_COVERS: tuple[str, ...] = ("resolved recipe (every section)", "input file hashes (model, tokenizer, data)",
                                       "versions and trtconv source", "device", "numeric environment",
                                       "build options: require_engine, max_gpu_memory, gpus (above 1)")


def run_key(recipe, inputs: list[InputRecord], device: DeviceInfo, require_engine: bool, max_gpu_memory_gib: float | None,
            gpus: int = 1) -> str:
    """The whole run's key. `gpus` above 1 is part of it: the entry is restored before the build's own checks
    run, so a --gpus N entry must come from a --gpus N run that passed them (and its manifest records N
    devices). One device keeps the keys it always had."""
    from trtconv.stages.base import device_part

    return stage_key(RUN_STAGE, {
        "recipe": recipe.model_dump(mode="json"),
        "inputs": [rec.model_dump(mode="json") for rec in inputs],
        "versions": versions_for_key(),
        "device": device_part(device),
        "environment": numeric_environment(),
        "options": {"require_engine": require_engine, "max_gpu_memory_gib": max_gpu_memory_gib, **({"gpus": gpus} if gpus > 1 else {})},
    })


def store(cache: StageCache, key: str, folder: Path, manifest: Manifest, reporter) -> None:
    """The finished artifact (every output, not manifest.json) as the run entry. Its files were
    hashed once already, and hard links cost no space beside the export entry."""
    try:
        cache.put(RUN_STAGE, key, folder, {"manifest": manifest.model_dump(mode="json")}, files=[f.path for f in manifest.outputs])
    except CacheError as exc:
        reporter.warn(f"not cached: {exc}")


def restore(cache: StageCache, key: str, dest: Path, command: list[str], started: float, reporter) -> Manifest | None:
    """The artifact of an identical earlier run linked into dest, with this run's manifest; None on a miss."""
    from trtconv.stages.base import restore_entry

    meta = restore_entry(cache, RUN_STAGE, key, dest, reporter)
    if meta is None:
        return None
    built = Manifest.model_validate(meta["manifest"])
    saved = sum(s.wall_s for s in built.stages)
    reporter.stage("load", f"the whole artifact reused from the cache (key {key[:12]}, built {built.created_utc}, "
                   f"saves {saved:.1f} s): every input, the recipe and the versions are unchanged")
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    check = StageRecord(name="load", status="ok", wall_s=round(time.monotonic() - started, 3),
                        details={"run_cache_key": key, "built_utc": built.created_utc})
    reused = [s.model_copy(update={"status": "reused" if s.status == "ok" else s.status, "details": {**s.details, "run_cache_key": key}})
              for s in built.stages if s.name != "load"]
    _note_in_report(dest, key, built.created_utc)
    manifest = built.model_copy(update={"command": command, "created_utc": now, "host": host_summary(),
                                        "stages": [check, *reused]})
    manifest.outputs = hash_tree(dest, reuse_noted=True)  # noted while linking: only the new report.md is read
    return manifest


def _note_in_report(folder: Path, key: str, built_utc: str) -> None:
    """Say in report.md that it is a reuse (a new file: the linked one belongs to the cache entry)."""
    report = folder / REPORT_NAME
    if not report.is_file():
        return
    text = report.read_text(encoding="utf-8")
    report.unlink()
    report.write_text(text.rstrip("\n") + f"\n\n_Reused whole from the stage cache (key `{key[:12]}`): every input, the "
                      f"recipe and the versions are those of the run that built it at {built_utc}; its stage times are "
                      "shown above._\n", encoding="utf-8")
