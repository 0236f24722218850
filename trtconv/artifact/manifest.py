"""manifest.json: a typed record of what an artifact is and how it was made.

Like lm-eval's results schema, the manifest is a schema (pydantic models), not a loose dict: the
recipe as resolved, every input and output file with sha256, versions, device, per-stage time and
peak memory, metrics, gate results and the final status. `trtconv verify` re-hashes against it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trtconv.artifact.layout import MANIFEST_NAME, RUN_RECORDS, SIGNATURE_NAME
from trtconv.artifact.writer import sha256_file
from trtconv.core.errors import ArtifactError
from trtconv.core.jsonio import read_json_object

MANIFEST_SCHEMA_VERSION = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(Record):
    path: str  # relative to the folder it was hashed in (artifact files) or absolute (inputs)
    sha256: str
    size: int


class InputRecord(Record):
    role: str  # "model", "tokenizer", "calibration_data", "evaluation_data", "reference_training"
    root: str  # the folder or file the paths are relative to
    files: list[FileRecord]


class StageRecord(Record):
    name: str
    status: Literal["ok", "skipped", "not_built", "failed", "reused"]
    wall_s: float
    peak_rss_mib: float | None = None
    peak_gpu_mib: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class GateResult(Record):
    metric: str
    comparator: Literal["<=", ">="]
    threshold: float
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: Literal["pass", "fail", "inconclusive"]
    reason: str = ""


class Manifest(Record):
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION  # read_manifest refuses others by name first
    trtconv_version: str
    command: list[str]
    created_utc: str
    status: Literal["passed", "failed", "incomplete"]
    status_reason: str = ""
    recipe: dict[str, Any]
    recipe_sha256: str
    inputs: list[InputRecord]
    outputs: list[FileRecord] = Field(default_factory=list)
    artifact_digest: str = ""
    versions: dict[str, str | None]
    device: dict[str, Any]
    host: dict[str, Any]
    environment: dict[str, str]
    seeds: dict[str, int]
    calibration: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    engine: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageRecord] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    gates: list[GateResult] = Field(default_factory=list)


# Files that describe the artifact rather than belong to it: not listed in `outputs`. The manifest
# is covered by the signature instead; the signature cannot cover itself.
UNHASHED = {MANIFEST_NAME, SIGNATURE_NAME}


def hash_tree(root: Path, skip: set[str] = UNHASHED, *, reuse_noted: bool = False) -> list[FileRecord]:
    """Every file under root (sorted, relative POSIX paths) with sha256 and size.

    ``reuse_noted``: take the hash this process noted when it stored or restored the very same
    file (trtconv.cache.hashes), so a build reads its multi-GB outputs once. `verify` leaves it
    off: it must read every byte.
    """
    from trtconv.cache.hashes import sha256_of

    records = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            sha = sha256_of(p) if reuse_noted else sha256_file(p)
            records.append(FileRecord(path=rel, sha256=sha, size=p.stat().st_size))
    return records


def artifact_digest(files: list[FileRecord]) -> str:
    """One hash CI can pin: sha256 over the sorted "path sha256" lines of the artifact's payload."""
    payload = [f for f in files if f.path not in RUN_RECORDS]
    lines = "".join(f"{f.path} {f.sha256}\n" for f in sorted(payload, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    path = folder / MANIFEST_NAME
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a trtconv artifact: {MANIFEST_NAME} is missing")
    data = read_json_object(path, "the artifact manifest", ArtifactError)
    _check_schema_version(path, data)
    try:
        return Manifest.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError: report it as a damaged manifest
        raise ArtifactError(f"{path}: does not match the manifest schema: {exc}") from None


def check_integrity(folder: Path, manifest: Manifest) -> list[str]:
    """verify_files, the manifest's digest against its own file list, and the manifest against
    itself: status, gate verdicts, metrics and thresholds (trtconv.artifact.consistency)."""
    from trtconv.artifact.consistency import manifest_problems

    problems = verify_files(folder, manifest)
    if artifact_digest(manifest.outputs) != manifest.artifact_digest:
        problems.append("manifest: artifact_digest does not match its own file list (the manifest was edited)")
    return problems + manifest_problems(folder, manifest)


def _check_schema_version(path: Path, data) -> None:
    """A manifest of another schema is never read as if it were this one."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{path}: schema_version is {version!r}; a trtconv manifest has an integer schema_version "
                            f"(this trtconv reads {MANIFEST_SCHEMA_VERSION})")
    if version > MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(f"{path} was written by a newer trtconv (manifest schema {version}; this trtconv reads "
                            f"schema {MANIFEST_SCHEMA_VERSION}): upgrade trtconv (pip install -U trtconv)")
    if version < 1:
        raise ArtifactError(f"{path}: schema_version {version} is not a trtconv manifest schema (1..{MANIFEST_SCHEMA_VERSION})")


def verify_files(folder: Path, manifest: Manifest) -> list[str]:
    """Problems found re-hashing the artifact: changed, missing and extra files, by name."""
    problems = []
    expected = {f.path: f for f in manifest.outputs}
    actual = {f.path: f for f in hash_tree(Path(folder))}
    for path, rec in expected.items():
        got = actual.get(path)
        if got is None:
            problems.append(f"missing: {path}")
        elif got.sha256 != rec.sha256 or got.size != rec.size:
            problems.append(f"changed: {path} (sha256 {got.sha256[:12]}…, manifest says {rec.sha256[:12]}…)")
    for path in sorted(set(actual) - set(expected)):
        problems.append(f"extra: {path} (not in the manifest)")
    return problems
