"""sha256 of files, computed once: remembered across runs for inputs, within a run for outputs.

A second run of an unchanged recipe must not re-read a 16 GB checkpoint just to learn it has not
changed. Like git's index and DVC's state database, a file's hash is remembered with its stat
identity (absolute path, size, mtime in nanoseconds, inode) and reused only while all four are
unchanged; an edit, a copy over it, a `touch` or a restore from backup changes one of them, and the
file is hashed again. The table lives in ``<cache root>/file-hashes.json``; a damaged or unreadable
table is ignored (everything is re-hashed), never trusted.

Files the run writes itself (the exported checkpoint, cache entries linked into the artifact) are
hashed once, when they are stored, and the hash is noted in memory under the file's stat identity
(device, inode, size, mtime), so the manifest's `outputs` do not read them a second time.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from filelock import FileLock, Timeout

HASHES_FILE = "file-hashes.json"
HASHES_FORMAT = 1
_MAX_ENTRIES = 100_000  # a table this long is rebuilt from scratch (least recent first would need more bookkeeping)

_known: dict[tuple, str] = {}  # (dev, ino, size, mtime_ns) -> sha256, for files this process wrote or verified
_known_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def note_sha256(path: Path, sha256: str) -> None:
    """Remember, for this process, that the file now at path (as it is now) has this hash."""
    with _known_lock:
        _known[_identity(os.stat(path))] = sha256


def known_sha256(path: Path) -> str | None:
    """A hash noted for exactly this file (same device, inode, size and mtime), else None."""
    with _known_lock:
        return _known.get(_identity(os.stat(path)))


def sha256_of(path: Path) -> str:
    """The file's sha256: the noted one if the file is unchanged since, else read in full."""
    from trtconv.artifact.writer import sha256_file

    sha = known_sha256(path)
    if sha is None:
        sha = sha256_file(path)
        note_sha256(path, sha)
    return sha


class HashTable:
    """The persistent table of input-file hashes under the cache root. Not shared between threads."""

    def __init__(self, root: Path | None = None, *, enabled: bool = True):
        from trtconv.cache.store import cache_root

        self.path = Path(root if root is not None else cache_root()) / HASHES_FILE
        self.enabled = enabled  # False (--no-cache): every file is hashed, nothing is read or written
        self.entries = self._read() if enabled else {}
        self._dirty = False

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # absent or damaged: start empty, every file is hashed again
        if not isinstance(data, dict) or data.get("format") != HASHES_FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if _valid(v)}

    def lookup(self, path: Path) -> str | None:
        """The remembered hash if path's size, mtime and inode are what they were; else None."""
        path = Path(path).absolute()
        rec = self.entries.get(str(path))
        if rec is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if (rec["size"], rec["mtime_ns"], rec["ino"]) != (st.st_size, st.st_mtime_ns, st.st_ino):
            return None
        return rec["sha256"]

    def remember(self, path: Path, sha256: str, st: os.stat_result) -> None:
        self.entries[str(Path(path).absolute())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                                                    "sha256": sha256}
        self._dirty = True

    def sha256(self, path: Path) -> str:
        """The file's hash, from the table when unchanged, else computed (and remembered)."""
        from trtconv.artifact.writer import sha256_file

        sha = self.lookup(path)
        if sha is not None:
            return sha
        before = os.stat(path)
        sha = sha256_file(path)
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns, before.st_ino) == (after.st_size, after.st_mtime_ns, after.st_ino):
            self.remember(path, sha, after)  # changed while read: hashed again next time
        return sha

    def save(self) -> None:
        """Merge into the file on disk (other runs may have added entries) and replace it atomically.
        A cache folder that cannot be written only costs re-hashing next time."""
        if not self._dirty or not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=10):
                merged = {**self._read(), **self.entries}
                if len(merged) > _MAX_ENTRIES:
                    merged = dict(self.entries)
                tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps({"format": HASHES_FORMAT, "files": merged}, sort_keys=True) + "\n", encoding="utf-8")
                os.replace(tmp, self.path)
        except (OSError, Timeout):
            return
        self._dirty = False


def _valid(rec) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
            and all(isinstance(rec.get(k), int) for k in ("size", "mtime_ns", "ino")))


class BackgroundHashes:
    """Hashes of a list of files: those remembered are ready at once; the rest are read on a
    thread, so the caller can load the model while they are hashed (sha256 releases the GIL).

    ``pending`` says whether any file has to be read; ``result()`` waits and returns
    {path: sha256}, then saves the table.
    """

    def __init__(self, paths: list[Path], table: HashTable | None = None):
        self.table = table if table is not None else HashTable()
        self.paths = [Path(p) for p in paths]
        self._ready = {p: self.table.lookup(p) for p in self.paths}
        todo = [p for p, sha in self._ready.items() if sha is None]
        self.pending = bool(todo)
        self._running = False
        if todo:
            # Up to 4 daemon threads (a sharded checkpoint hashes its shards side by side); daemon,
            # so a run that stops early on a user error does not wait for 16 GB to be hashed.
            # The table is only written by result(), on the caller's thread.
            queue = list(todo)
            lock = threading.Lock()
            self._done: dict[Path, tuple] = {}
            self._threads = [threading.Thread(target=self._work, args=(queue, lock), daemon=True, name="trtconv-hash")
                             for _ in range(min(4, len(todo)))]
            for t in self._threads:
                t.start()
            self._running = True

    def _work(self, queue: list[Path], lock: threading.Lock) -> None:
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop(0)
            try:
                self._done[path] = ("ok", *self._hash(path))
            except OSError as exc:
                self._done[path] = ("error", exc, None)

    def _hash(self, path: Path) -> tuple[str, os.stat_result | None]:
        from trtconv.artifact.writer import sha256_file

        before = os.stat(path)
        sha = sha256_file(path)
        after = os.stat(path)
        same = (before.st_size, before.st_mtime_ns, before.st_ino) == (after.st_size, after.st_mtime_ns, after.st_ino)
        return sha, after if same else None

    def result(self) -> dict[Path, str]:
        if self._running:
            for t in self._threads:
                t.join()
            for path, (status, value, st) in self._done.items():
                if status == "error":
                    raise value
                if st is not None:  # changed while read: not remembered, hashed again next time
                    self.table.remember(path, value, st)
                self._ready[path] = value
            self._running = False
        self.table.save()
        return dict(self._ready)
