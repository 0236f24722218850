"""The artifact folder: written whole or not at all.

A run writes into a temporary sibling of OUT and renames it into place only at the end, so an
interrupted run never leaves a half artifact that looks whole, and a failed run never replaces an
earlier good artifact. A lock file beside OUT (.OUT.lock, removed at the end) refuses a second
concurrent build into the same OUT.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from trtconv.artifact.layout import MANIFEST_NAME
from trtconv.core.errors import ArtifactError

_HASH_CHUNK = 1 << 20
# What a run leaves beside OUT when it is killed (kill -9, power loss): the temporary artifact, the
# evaluation's and --repro-check's scratch folders, a replaced artifact not yet removed.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:\.eval|\.repro)?$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_artifact(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def artifact_status(path: Path) -> str | None:
    """The manifest's status ("passed", "failed", ...), or None where it cannot be read."""
    import json

    try:
        return json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _unused(parent: Path, name: str) -> bool:
    """No run holds OUT's lock now (a run holds it for as long as its temporary folder exists)."""
    lock = FileLock(str(parent / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        Path(lock.lock_file).unlink(missing_ok=True)
    finally:
        lock.release()
    return True


def remove_stale_leftovers(parent: Path, own: str) -> list[Path]:
    """Remove the hidden folders killed runs left in parent (`.OUT.tmp-PID`, a full copy of an
    artifact); returns them. A folder goes when its process is gone and no run holds its OUT's lock;
    for `own` (the OUT whose lock the caller holds) any process's but this one's."""
    removed = []
    for path in parent.iterdir():
        m = _LEFTOVER.match(path.name)
        if not m or not path.is_dir() or int(m["pid"]) == os.getpid():
            continue
        if m["name"] != own and (_pid_alive(int(m["pid"])) or not _unused(parent, m["name"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class ArtifactWriter:
    """Owns OUT for one run: lock, temporary sibling, and the final rename.

    Use as a context manager; call :meth:`commit` (good run) or :meth:`commit_failed` (gate failed)
    before leaving it. Leaving it any other way (exception, Ctrl-C) removes the temporary folder.
    """

    def __init__(self, out: Path, force: bool = False, note=None):
        self.out = Path(out).resolve()
        self.force = force
        self._note = note  # says which leftovers of killed runs were removed (the run's reporter.info)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._lock = FileLock(str(self.out.parent / f".{self.out.name}.lock"))
        self.final_path: Path | None = None
        self._before_exit: list = []  # work still reading tmp (a cache store on a thread): waited for before tmp goes

    def wait_on_exit(self, fn) -> None:
        """Call fn (e.g. a thread's join) before the temporary folder is removed or renamed away."""
        self._before_exit.append(fn)

    # -- checks made before any work, so a mistake costs nothing -------------------------------
    def preflight(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ArtifactError(f"output {out} exists and is a file, not a folder; choose another -o path")
        if out.is_dir() and any(out.iterdir()):
            if not is_artifact(out):
                raise ArtifactError(
                    f"output {out} exists, is not empty and holds no trtconv artifact ({MANIFEST_NAME}); "
                    "refusing to replace it: choose an empty or new folder"
                )
            if not self.force:
                raise ArtifactError(
                    f"output {out} already holds an artifact; pass --force to replace it "
                    "(a failed run keeps the existing artifact)"
                )
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create the folder {parent} for output {out}: {exc.strerror}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ArtifactError(f"output folder {parent} is not writable; choose another -o path")

    def __enter__(self) -> ArtifactWriter:
        self.preflight()
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise ArtifactError(
                f"another trtconv run is writing {self.out} (lock {self._lock.lock_file}); wait for it or choose another -o"
            ) from None
        for path in remove_stale_leftovers(self.out.parent, own=self.out.name):
            if self._note is not None:
                self._note(f"removed {path}: left by a run that was killed (its process is gone)")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for fn in self._before_exit:
                fn()
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            # Remove the lock file while still holding the lock, so no 0-byte .OUT.lock stays beside the
            # artifact. Safe: a waiter that opened the old file finds it unlinked after flock and retries.
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.release()

    def _replace(self, target: Path) -> None:
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(self.tmp, target)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        self.final_path = target

    def commit(self) -> Path:
        """A good run: the new artifact takes OUT's place."""
        self._replace(self.out)
        return self.out

    def commit_failed(self) -> Path:
        """A run whose gate failed: kept for inspection, but never in place of a good artifact."""
        if is_artifact(self.out) and artifact_status(self.out) == "passed":
            target = self.out.parent / f"{self.out.name}.failed"
            self._replace(target)
            return target
        self._replace(self.out)
        return self.out
