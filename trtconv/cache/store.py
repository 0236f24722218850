"""A content-addressed cache of stage outputs, so a run that dies after an hour of calibration
resumes at the stage it reached, and a cache never hands back the wrong model.

Layout (``<root>`` is ``$TRTCONV_CACHE``, else ``platformdirs.user_cache_dir("trtconv")``)::

    <root>/stages/<stage>/<key>/entry.json   stage, key, created, meta, sha256 + size of every file
    <root>/stages/<stage>/<key>/payload/...  the stage's output, plain files (safetensors, json, ...)
    <root>/stages/<stage>/.<key>.lock        one writer per entry
    <root>/reference-models/...              trtconv.data.reference_models' own cache (listed, not written)

The key is a sha256 over *everything that can change the output* (:func:`stage_key`). Keying on
too little is the failure users have met elsewhere (a cache that returns another model); keying on
too much only costs a rebuild, so when in doubt a part goes in.

An entry appears by an atomic rename after every file and ``entry.json`` were written and fsynced,
so a killed ``put`` leaves no entry, only a ``<key>.tmp-<pid>`` folder that lookups ignore and the
next writer or ``trtconv cache prune`` removes. A lookup re-hashes the files against ``entry.json``;
an entry that does not match (bit rot, a truncated copy, a hand edit) is removed and reported as a
miss with its reason, never returned.

Pickle is never cached: files whose suffix means pickle (``.pt``, ``.bin``, ...) are refused,
because loading them runs code and a shared cache folder is a place others can write to.

See docs/cache.md for what the key covers, locking, and ``trtconv cache ls | du | prune``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from trtconv.artifact.writer import sha256_file
from trtconv.cache.hashes import known_sha256, note_sha256
from trtconv.core.errors import ArtifactError
from trtconv.data.reference_models import CACHE_ENV_VAR, CACHE_SUBDIR as REFERENCE_MODELS_SUBDIR, default_cache_dir

# Part of every key: bump it when the entry layout or the meaning of a key part changes, so old
# entries are never read with new assumptions (they become unreachable and age out by prune).
CACHE_FORMAT = 1

STAGES_SUBDIR = "stages"
ENTRY_RECORD = "entry.json"
PAYLOAD_DIR = "payload"
TMP_MARK = ".tmp-"  # <key>.tmp-<pid>: a put in progress, or one that was killed
DEL_MARK = ".del-"  # <key>.del-<pid>: an entry being removed (renamed first, so it vanishes at once)

Verify = Literal["full", "size"]
DEFAULT_VERIFY: Verify = "full"

# Set to 1 and every restore re-reads and hashes every file it links or copies, instead of trusting a
# file whose inode, size and mtime are the ones put recorded (a write that restores mtime, as only a
# deliberate edit does, is otherwise found only by `trtconv verify` / `check`). docs/cache.md.
REHASH_ENV = "TRTCONV_CACHE_REHASH"

# How long materialize waits for an entry another process holds (a writer replacing a damaged
# entry, or another build copying it out). Copies of multi-GB checkpoints take tens of seconds.
MATERIALIZE_LOCK_WAIT_S = 600.0

# Suffixes of pickle-based formats (torch.save, joblib, ModelOpt's mto.save): never cached.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz"})

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_STAGE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_COPY_CHUNK = 4 << 20
_FILE_MODE = 0o444  # cached files are read-only: an edit through a path from get() is refused
_DIR_MODE = 0o755


class CacheError(ArtifactError):
    """The stage cache could not be written or read (unwritable root, disk full, pickle payload)."""


class CacheBusy(CacheError):
    """Another trtconv process holds the lock of this cache entry."""


class CacheCorrupted(CacheError):
    """An entry's files no longer match its entry.json (the entry has been removed)."""


class CacheEntryGone(CacheError):
    """An entry was removed (by prune, or another run) between lookup and copy."""


# ---------------------------------------------------------------------------------------------
# Location and keys


def cache_root() -> Path:
    """``$TRTCONV_CACHE`` if set, else the platform cache folder (shared with reference models)."""
    return default_cache_dir()


TORCH_EXTENSIONS_SUBDIR = "torch-extensions"


def use_torch_extensions_cache() -> Path:
    """Point TORCH_EXTENSIONS_DIR into the cache (unless the user set it) and return it.

    ModelOpt compiles its CUDA extension (fp8/int4 kernels) with torch.utils.cpp_extension on first
    use: about 80 s. Under the cache, per trtconv and ModelOpt version, a second process on the
    host finds it built. Must run before ModelOpt loads its extension.
    """
    current = os.environ.get("TORCH_EXTENSIONS_DIR")
    if current:
        return Path(current)
    from importlib.metadata import PackageNotFoundError, version

    from trtconv import __version__

    try:
        modelopt = version("nvidia-modelopt")
    except PackageNotFoundError:
        modelopt = "none"
    folder = cache_root() / TORCH_EXTENSIONS_SUBDIR / f"trtconv-{__version__}-modelopt-{modelopt}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def canonical_json(value: Any) -> str:
    """The one JSON text of a value: sorted keys, no whitespace, ASCII, no NaN.

    Raises TypeError for values JSON cannot hold (a Path, a set): the caller must turn them into
    strings or lists itself, so that what goes into a key is visible and stable.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def stage_key(stage: str, parts: Mapping[str, Any]) -> str:
    """sha256 hex of ``{"stage": stage, "cache_format": CACHE_FORMAT, **parts}`` as canonical JSON.

    ``parts`` must hold EVERYTHING that can change the stage's output, for example the model file
    hashes, the stage's resolved recipe section, the calibration data hash, :func:`versions_for_key`,
    the device kind or GPU SM, and the key of the stage upstream of this one. Two calls with equal
    parts in any dict order give the same key; any changed value gives another.
    """
    _check_stage(stage)
    reserved = {"stage", "cache_format"} & set(parts)
    if reserved:
        raise ValueError(f"stage_key parts may not use the reserved names {sorted(reserved)}")
    material = {"stage": stage, "cache_format": CACHE_FORMAT, **parts}
    return hashlib.sha256(canonical_json(material).encode("ascii")).hexdigest()


def versions_for_key() -> dict[str, str | None]:
    """Versions that can change a stage's bytes, for ``stage_key`` parts.

    All of ``package_versions()`` (python, trtconv, torch, transformers, nvidia-modelopt,
    tensorrt_llm, tensorrt, and the tokenizers/safetensors/datasets/accelerate that shape
    calibration data and files), plus ``trtconv_source``: a hash of trtconv's own code, because
    the version string does not change between edits of a development checkout.
    """
    from trtconv.core.environment import package_versions

    versions = package_versions()
    versions["trtconv_source"] = trtconv_source_sha256()
    return versions


@lru_cache(maxsize=1)
def trtconv_source_sha256() -> str:
    """sha256 over the relative path and bytes of every .py file of the installed trtconv package."""
    package = Path(__file__).resolve().parent.parent  # trtconv/
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _check_stage(stage: str) -> None:
    # The stage is a folder name: keep it a plain word so it cannot climb out of <root>/stages.
    if not _STAGE_RE.match(stage):
        raise ValueError(f"stage name {stage!r} must be lowercase letters, digits, '-' or '_'")


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise ValueError(f"cache key {key!r} is not a sha256 hex digest (use stage_key())")


# ---------------------------------------------------------------------------------------------
# Files: copy while hashing, so a put or a materialize reads every byte once


def _copy_file(src: Path, dst: Path, *, fsync: bool) -> tuple[str, int]:
    """Copy src to a new file dst; return (sha256, size) of the bytes copied.

    Module-level so tests can make it fail half way (an interrupted put).
    """
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        if fsync:
            fout.flush()
            os.fsync(fout.fileno())
    return digest.hexdigest(), size


# errno values with which os.link says "not here": another filesystem, links unsupported or refused
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}
_FICLONE = 0x40049409  # Linux ioctl: dst shares src's blocks (btrfs, xfs, bcachefs), an independent file


def _reflink(src: Path, dst: Path) -> bool:
    """Clone src into a new dst where the filesystem can (copy-on-write); False, and no dst, where not."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return True
    except OSError:
        Path(dst).unlink(missing_ok=True)
        return False


def _link_or_copy(src: Path, dst: Path, *, fsync: bool, sha256: str | None = None,
                  linked: Callable[[Path], None] | None = None) -> tuple[str, int, str]:
    """dst gets src's bytes as cheaply as the filesystem allows: a reflink (an independent file
    sharing blocks), else a hard link (the same file), else a copy made while hashing (another
    filesystem). Returns (sha256, size, "reflink" | "link" | "copy"). ``sha256`` is the file's
    hash when already known and trusted; a reflinked or linked file is otherwise read once to hash it.
    ``linked(dst)`` is called once a reflink or link exists, before the hashing (to start its fsync).
    """
    if _reflink(src, dst):
        how = "reflink"
    else:
        try:
            os.link(src, dst)
            how = "link"
        except OSError as err:
            if err.errno not in _NO_LINK_ERRNOS:
                raise
            sha, size = _copy_file(src, dst, fsync=fsync)
            return sha, size, "copy"
    if linked is not None:
        linked(dst)
    size = os.stat(dst).st_size
    return (sha256 or sha256_file(dst)), size, how


def payload_files(folder: Path) -> list[str]:
    """What put would store from folder now (relative POSIX paths, sorted)."""
    return _payload_files(folder)


def _payload_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under folder, sorted. Directory symlinks are refused."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise CacheError(f"{os.path.join(dirpath, name)} is a symlink to a folder; a cache entry holds plain files only")
        for name in filenames:
            files.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(files)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a folder whose files may be read-only; missing is fine."""
    if not path.exists():
        return
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, _DIR_MODE | 0o200)  # read-only files go with their folder's write bit
    shutil.rmtree(path, ignore_errors=True)


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class CacheMiss:
    """Why a lookup found nothing usable: ``absent``, ``corrupted`` (removed) or ``busy`` (locked)."""

    kind: Literal["absent", "corrupted", "busy"]
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class StageCache:
    """Stage outputs by (stage, key). Not thread-safe: one instance per thread.

    Typical use in the pipeline::

        cache = StageCache()
        key = stage_key("export", {..., "upstream": calibrate_key, "versions": versions_for_key()})
        if cache.restore("export", key, writer.tmp) is None:
            if cache.last_miss.kind == "corrupted":
                reporter.warn(f"cache entry corrupted, rebuilding ({cache.last_miss.detail})")
            ... run the stage into a folder ...
            try:
                cache.put("export", key, folder, meta={"recipe": ...})
            except CacheError as err:       # busy, disk full: the run goes on uncached
                reporter.warn(str(err))
    """

    def __init__(self, root: Path | None = None, *, verify: Verify = DEFAULT_VERIFY, max_size: int | None = None):
        self.root = Path(root) if root is not None else cache_root()
        self.verify = verify
        self.max_size = max_size if max_size is not None else max_size_setting()  # a bad setting fails here, before any work
        self.last_miss: CacheMiss | None = None
        self.last_evicted: list[ListedEntry] = []  # what the last put removed to stay under max_size

    @property
    def last_miss_reason(self) -> str | None:
        """Why the last get/restore returned None ("corrupted: changed payload/x (...)"), else None."""
        return str(self.last_miss) if self.last_miss else None

    # -- paths ---------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        _check_stage(stage)
        return self.root / STAGES_SUBDIR / stage

    def entry_dir(self, stage: str, key: str) -> Path:
        _check_key(key)
        return self.stage_dir(stage) / key

    def _lock(self, stage: str, key: str) -> FileLock:
        return FileLock(str(self.stage_dir(stage) / f".{key}.lock"))

    # -- lookup --------------------------------------------------------------------------------
    def get(self, stage: str, key: str, verify: Verify | None = None) -> Path | None:
        """The entry folder (payload in ``payload/``), or None with the reason in ``last_miss``.

        ``verify="full"`` (default) re-hashes every payload file: about 1-2 GB/s of sha256 plus
        the disk read, i.e. seconds to a minute for a multi-GB checkpoint, small next to the
        calibration it saves. ``"size"`` only checks that exactly the recorded files are there
        with their recorded sizes (catches truncation and missing/extra files, not flipped bytes);
        :meth:`restore` uses it and then hashes while copying, so it reads the data once.
        A damaged entry is removed before None is returned.
        """
        entry = self.entry_dir(stage, key)
        self.last_miss = None
        if not entry.is_dir():
            self.last_miss = CacheMiss("absent", f"no entry {entry}")
            return None
        problem = entry_problem(entry, stage, key, verify or self.verify)
        if problem is not None:
            self._discard(stage, key, entry, problem)
            return None
        touch(entry)
        return entry

    def _discard(self, stage: str, key: str, entry: Path, problem: str) -> None:
        if not entry.exists():  # pruned while we read it: not a corruption
            self.last_miss = CacheMiss("absent", f"{entry} was removed while being read")
            return
        lock = self._lock(stage, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            # Someone holds it (a writer replacing this very entry): leave the entry to them.
            self.last_miss = CacheMiss("corrupted", f"{entry}: {problem} (left in place: it is locked by another run)")
            return
        try:
            _remove_entry(entry)
        finally:
            lock.release()
        self.last_miss = CacheMiss("corrupted", f"{entry}: {problem}; removed")

    def read_record(self, entry: Path) -> dict:
        """The parsed entry.json of an entry folder (stage, key, created, meta, files, size)."""
        return json.loads((Path(entry) / ENTRY_RECORD).read_text(encoding="utf-8"))

    # -- copy out ------------------------------------------------------------------------------
    def materialize(self, entry: Path, dest: Path, *, lock_wait_s: float = MATERIALIZE_LOCK_WAIT_S, rehash: bool = False) -> Path:
        """Copy an entry's payload into ``dest`` (created if missing; existing files are never
        overwritten) and return ``dest``.

        Hard links where the filesystem allows, a copy across filesystems: an 8B export is 8-16 GB,
        and copying it costs tens of seconds. A linked artifact file *is* the cache file, so both
        are read-only (mode 0444); a file forced open and edited gets a new mtime, and the next
        restore, finding the entry file changed since put, hashes it and discards the entry. A
        file unchanged since put (same inode, size, mtime) is not re-read; any other is hashed and
        must match entry.json, else the links/copies are removed, the entry is removed and
        CacheCorrupted is raised (`get(verify="full")` re-hashes everything, whatever the stat
        says; ``rehash`` hashes every file whatever its stat says). The entry's lock is held
        meanwhile, so prune cannot delete it half way; CacheBusy after ``lock_wait_s``.
        """
        entry = Path(entry)
        lock = FileLock(str(entry.parent / f".{entry.name}.lock"))  # the entry's own lock, whatever root it is in
        try:
            lock.acquire(timeout=lock_wait_s)
        except Timeout:
            raise CacheBusy(
                f"cache entry {entry} stayed locked by another trtconv run for {lock_wait_s:.0f} s "
                f"(lock {lock.lock_file}); run again, or rebuild without the cache"
            ) from None
        try:
            if not entry.is_dir():
                raise CacheEntryGone(f"cache entry {entry} was removed (pruned?) before it could be copied")
            try:
                record = self.read_record(entry)
            except (OSError, ValueError) as err:
                raise CacheCorrupted(f"cache entry {entry} has no readable {ENTRY_RECORD} ({err}); it is rebuilt on the next run") from None
            problem = _copy_payload(entry / PAYLOAD_DIR, Path(dest), record.get("files", []), rehash=rehash)
            if problem is not None:
                _remove_entry(entry)
                raise CacheCorrupted(f"cache entry {entry}: {problem}; removed")
        finally:
            lock.release()
        touch(entry)
        return Path(dest)

    def restore(self, stage: str, key: str, dest: Path) -> Path | None:
        """get + materialize with one read of the data: ``dest`` on a hit, else None and ``last_miss``.

        On None, ``dest`` holds nothing from the cache (copies made before a mismatch was found
        are removed).
        """
        entry = self.get(stage, key, verify="size")
        if entry is None:
            return None
        try:
            return self.materialize(entry, dest, rehash=os.environ.get(REHASH_ENV, "").strip().lower() in ("1", "true", "yes"))
        except CacheCorrupted as err:
            self.last_miss = CacheMiss("corrupted", str(err))
        except CacheBusy as err:
            self.last_miss = CacheMiss("busy", str(err))
        except CacheEntryGone as err:
            self.last_miss = CacheMiss("absent", str(err))
        return None

    # -- store ---------------------------------------------------------------------------------
    def put(self, stage: str, key: str, source_dir: Path, meta: Mapping[str, Any] | None = None, *, wait: float = 0.0,
            files: list[str] | None = None) -> Path:
        """Store a copy of ``source_dir`` as entry (stage, key) and return the entry folder.

        Writes ``<key>.tmp-<pid>/`` (payload, then entry.json, each fsynced) and renames it into
        place, so the entry appears whole or not at all. Holds the entry's lock meanwhile: if
        another run holds it, waits ``wait`` seconds (default 0: fail at once), then raises
        CacheBusy. The result is in ``source_dir`` either way, so callers should warn and go on.
        A valid entry already under this key is kept (same key, same inputs) and returned.
        ``meta`` must be JSON-serializable; it is stored, not part of the key. ``files`` (relative
        paths) fixes which files are stored, for a folder others keep writing into meanwhile;
        default: every file under source_dir now.
        """
        source_dir = Path(source_dir)
        if not source_dir.is_dir():
            raise CacheError(f"cannot cache {source_dir}: not a folder")
        files = sorted(files) if files is not None else _payload_files(source_dir)
        _refuse_pickle(source_dir, files)
        meta_json = json.loads(canonical_json(dict(meta or {})))  # fails early on non-JSON meta
        final = self.entry_dir(stage, key)
        _make_dir(final.parent)
        lock = self._lock(stage, key)
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            raise CacheBusy(
                f"another trtconv run is writing cache entry {final} (lock {lock.lock_file}); "
                "this run's output is not cached. Wait for the other run, or remove the lock file if no run is alive"
            ) from None
        try:
            if final.is_dir() and entry_problem(final, stage, key, "size") is None:
                return final
            _remove_leftovers(final)
            tmp = final.parent / f"{key}{TMP_MARK}{os.getpid()}"
            try:
                _write_entry(tmp, source_dir, files, {"stage": stage, "key": key, "meta": meta_json})
                if final.exists():  # damaged: move it out of the way so the rename can land
                    _remove_entry(final)
                os.rename(tmp, final)
                _fsync_dir(final.parent)
            except OSError as err:
                raise CacheError(
                    f"could not write cache entry {final}: {err.strerror or err}; free space with "
                    f"`trtconv cache prune --max-size ...` or point {CACHE_ENV_VAR} elsewhere"
                ) from None
            finally:
                _remove_tree(tmp)
        finally:
            lock.release()
        self.last_evicted = evict_to_max_size(self.root, self.max_size, keep=final)
        return final


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {path} ({err.strerror}); set {CACHE_ENV_VAR} to a writable folder") from None


def _refuse_pickle(source_dir: Path, files: list[str]) -> None:
    pickled = [f for f in files if Path(f).suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        raise CacheError(
            f"refusing to cache {source_dir}: {', '.join(pickled[:5])} may be pickle, which runs code when loaded; "
            "write safetensors / json instead"
        )


def _write_entry(tmp: Path, source_dir: Path, files: list[str], header: dict) -> None:
    """The payload by reflink or hard link from source_dir (a copy across filesystems), then entry.json.

    A hard-linked payload file and the source file are one file: both become read-only, so the entry
    cannot be edited through the artifact by accident. An edit that forces its way in changes the
    file's mtime, which makes the next restore hash the entry again and find the damage.
    """
    payload = tmp / PAYLOAD_DIR
    payload.mkdir(parents=True)
    records = []
    # A linked file's fsync (writing back what the export left in the page cache: 4 s for 8.5 GB on
    # the H200 host) runs on a thread of its own while the file is hashed (8.7 s), not after it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtconv-cache-fsync") as syncer:
        syncing = []
        for rel in files:
            src, dst = source_dir / rel, payload / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            sha256, size, how = _link_or_copy(src, dst, fsync=True, sha256=known_sha256(src),
                                              linked=lambda p: syncing.append(syncer.submit(_fsync_file, p)))
            st = os.stat(dst)
            note_sha256(dst, sha256)  # the artifact's file too, when linked: the manifest reuses it
            records.append({"path": rel, "sha256": sha256, "size": size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino})
        for done in syncing:
            done.result()  # an fsync error fails the put
    for r in records:
        os.chmod(payload / r["path"], _FILE_MODE)
    record = {
        "cache_format": CACHE_FORMAT,
        **header,
        "created": _utc(time.time()),
        "size": sum(r["size"] for r in records),
        "files": records,
    }
    with open(tmp / ENTRY_RECORD, "x", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp / ENTRY_RECORD, _FILE_MODE)
    for dirpath, _dirs, _files in os.walk(tmp, topdown=False):
        _fsync_dir(Path(dirpath))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(final: Path) -> None:
    """Temp folders of killed puts of this key. Only called under the entry's lock."""
    for leftover in final.parent.glob(f"{final.name}{TMP_MARK}*"):
        _remove_tree(leftover)
    for leftover in final.parent.glob(f"{final.name}{DEL_MARK}*"):
        _remove_tree(leftover)


def _remove_entry(entry: Path) -> None:
    """Rename first (the entry vanishes at once for every reader), then delete. Under the lock."""
    doomed = entry.parent / f"{entry.name}{DEL_MARK}{os.getpid()}"
    try:
        os.rename(entry, doomed)
    except FileNotFoundError:
        return
    _remove_tree(doomed)


def touch(entry: Path) -> None:
    """Mark an entry used now (entry.json's mtime is its last use; prune drops the oldest first)."""
    try:
        os.utime(Path(entry) / ENTRY_RECORD)
    except OSError:
        pass  # a read-only shared cache still serves hits; it just cannot track use


def entry_problem(entry: Path, stage: str, key: str, verify: Verify) -> str | None:
    """What is wrong with an entry folder, or None if it matches its entry.json."""
    try:
        record = json.loads((entry / ENTRY_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{ENTRY_RECORD} is missing"
    except (OSError, ValueError) as err:
        return f"{ENTRY_RECORD} is not readable JSON ({err})"
    if not isinstance(record, dict) or not isinstance(record.get("files"), list):
        return f"{ENTRY_RECORD} has no file list"
    if (record.get("stage"), record.get("key"), record.get("cache_format")) != (stage, key, CACHE_FORMAT):
        return f"{ENTRY_RECORD} names another stage/key/format"
    extra_top = sorted(set(os.listdir(entry)) - {ENTRY_RECORD, PAYLOAD_DIR})
    if extra_top:
        return f"extra: {extra_top[0]} (not part of an entry)"
    try:
        expected = {r["path"]: r for r in record["files"]}
        actual = _payload_files(entry / PAYLOAD_DIR) if (entry / PAYLOAD_DIR).is_dir() else []
    except (KeyError, TypeError, CacheError) as err:
        return f"unreadable file list ({err})"
    extra = sorted(set(actual) - set(expected))
    if extra:
        return f"extra: {PAYLOAD_DIR}/{extra[0]} (not in {ENTRY_RECORD})"
    present = set(actual)
    for rel, rec in sorted(expected.items()):
        path = entry / PAYLOAD_DIR / rel
        if rel not in present:
            return f"missing: {PAYLOAD_DIR}/{rel}"
        size = path.stat().st_size
        if size != rec.get("size"):
            return f"changed: {PAYLOAD_DIR}/{rel} is {size} bytes, {ENTRY_RECORD} says {rec.get('size')}"
        if verify == "full":
            sha256 = sha256_file(path)
            if sha256 != rec.get("sha256"):
                return f"changed: {PAYLOAD_DIR}/{rel} (sha256 {sha256[:12]}..., {ENTRY_RECORD} says {str(rec.get('sha256'))[:12]}...)"
    return None


def _unchanged_since_put(src: Path, rec: dict) -> bool:
    """The entry file is the very file put wrote (same inode, size and mtime): its recorded hash
    still holds, so a restore need not read it. Any edit, truncation or replacement changes one."""
    if not all(k in rec for k in ("mtime_ns", "ino")):
        return False  # an entry from before these were recorded: hash it
    try:
        st = os.stat(src)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns, st.st_ino) == (rec["size"], rec["mtime_ns"], rec["ino"])


def _copy_payload(payload: Path, dest: Path, records: list[dict], rehash: bool = False) -> str | None:
    """Link (or copy) every recorded file into dest; on a mismatch undo and say why.

    A file unchanged since put (stat identity) is linked without being read, unless ``rehash``;
    any other is hashed (while copied, or after linking) and must match entry.json.
    """
    created: list[Path] = []
    made_dirs: list[Path] = []

    def mkdirs(folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            d.mkdir()
            made_dirs.append(d)

    problem = None
    try:
        for rec in records:
            src, dst = payload / rec["path"], dest / rec["path"]
            if dst.exists():
                raise CacheError(f"{dst} already exists; the cache never overwrites a file in {dest}")
            mkdirs(dst.parent)
            trusted = rec["sha256"] if not rehash and _unchanged_since_put(src, rec) else None
            try:
                sha256, size, how = _link_or_copy(src, dst, fsync=False, sha256=trusted)
            except FileNotFoundError:
                problem = f"missing: {PAYLOAD_DIR}/{rec['path']}"
                break
            created.append(dst)
            if (sha256, size) != (rec["sha256"], rec["size"]):
                problem = (f"changed: {PAYLOAD_DIR}/{rec['path']} (sha256 {sha256[:12]}..., {ENTRY_RECORD} says {rec['sha256'][:12]}...)"
                           + _shared_damage(src, own_links=2 if how == "link" else 1))
                break
            note_sha256(dst, sha256)
    except BaseException:
        _undo(created, made_dirs)
        raise
    if problem is not None:
        _undo(created, made_dirs)
    return problem


def _shared_damage(src: Path, own_links: int) -> str:
    """Where a damaged entry file is hard-linked elsewhere (artifacts restored from it, the build
    that stored it), those files are the same damaged bytes: say so, so they get verified."""
    try:
        others = os.stat(src).st_nlink - own_links
    except OSError:
        return ""
    if others <= 0:
        return ""
    return (f"; {others} other hard link{'s' if others > 1 else ''} share{'' if others > 1 else 's'} this file: artifacts "
            "restored from this entry hold the same damaged bytes, run `trtconv verify` on them")


def _undo(created: list[Path], made_dirs: list[Path]) -> None:
    for f in created:
        f.unlink(missing_ok=True)
    for d in reversed(made_dirs):
        try:
            d.rmdir()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Management: list, measure, prune (the `trtconv cache` commands call these)

Kind = Literal["stage", "reference-model", "temporary"]


@dataclass
class ListedEntry:
    """One thing in the cache. ``stage`` is the stage name, or the reference model's name."""

    kind: Kind
    stage: str
    key: str
    path: Path
    size: int
    created: float  # epoch seconds
    last_used: float

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(path=str(self.path), created=_utc(self.created), last_used=_utc(self.last_used))
        return d


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def unique_sizes(entries: list[ListedEntry]) -> list[int]:
    """Each entry's bytes with every file counted once by inode: the run entry shares the export
    entry's files through hard links, and `du` must not count those twice. A file linked from
    several entries counts for the first one listed."""
    seen: set[tuple[int, int]] = set()
    sizes = []
    for entry in entries:
        total = 0
        for dirpath, _dirs, files in os.walk(entry.path):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        sizes.append(total)
    return sizes


def list_entries(root: Path | None = None) -> list[ListedEntry]:
    """Stage entries, reference models and leftover temp folders under root, least recently used first."""
    root = Path(root) if root is not None else cache_root()
    found = list(_stage_entries(root / STAGES_SUBDIR)) + list(_reference_models(root / REFERENCE_MODELS_SUBDIR))
    return sorted(found, key=lambda e: (e.last_used, e.stage, e.key))


def _stage_entries(stages: Path) -> Iterator[ListedEntry]:
    if not stages.is_dir():
        return
    for stage_dir in sorted(p for p in stages.iterdir() if p.is_dir()):
        for path in sorted(stage_dir.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue  # lock files
            try:
                stat = path.stat()
            except OSError:  # removed by another process while we list
                continue
            if _KEY_RE.match(path.name):
                record = path / ENTRY_RECORD
                used = record.stat().st_mtime if record.is_file() else stat.st_mtime
                yield ListedEntry("stage", stage_dir.name, path.name, path, _tree_size(path), _created(record, stat.st_mtime), used)
            elif TMP_MARK in path.name or DEL_MARK in path.name:
                key = path.name.split(".", 1)[0]
                yield ListedEntry("temporary", stage_dir.name, key, path, _tree_size(path), stat.st_mtime, stat.st_mtime)


def _created(record: Path, fallback: float) -> float:
    try:
        return _dt.datetime.fromisoformat(json.loads(record.read_text(encoding="utf-8"))["created"]).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


def _reference_models(folder: Path) -> Iterator[ListedEntry]:
    # Names are <model>-<16 hex key> (trtconv.data.reference_models); hidden ones are its temp folders.
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        name, _, key = path.name.rpartition("-")
        mtime = path.stat().st_mtime
        yield ListedEntry("reference-model", name or path.name, key, path, _tree_size(path), mtime, mtime)


def _entry_lock(entry: ListedEntry) -> FileLock:
    """The lock a running build holds on this entry (the same file its writer/reader uses)."""
    if entry.kind == "reference-model":
        return FileLock(str(entry.path.parent / f"{entry.path.name}.lock"))
    return FileLock(str(entry.path.parent / f".{entry.key}.lock"))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """"10G" -> 10 GiB in bytes. Units K, M, G, T are powers of 1024 (KiB...); a plain number is bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise CacheError(f"--max-size {text!r} is not a size; write e.g. 500M, 10G or 1.5T (powers of 1024)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


MAX_SIZE_ENV = "TRTCONV_CACHE_MAX_SIZE"
DEFAULT_MAX_SIZE = "50G"  # an 8B export is 5-16 GB: a handful of recent ones


def max_size_setting() -> int:
    """``cache.max_size`` in bytes: $TRTCONV_CACHE_MAX_SIZE (e.g. 20G, 500M; 0 keeps nothing) or 50G."""
    text = os.environ.get(MAX_SIZE_ENV, "").strip() or DEFAULT_MAX_SIZE
    try:
        return parse_size(text)
    except CacheError:
        raise CacheError(f"{MAX_SIZE_ENV}={text!r} is not a size; write e.g. 500M, 50G or 1.5T (powers of 1024)") from None


def evict_to_max_size(root: Path, max_size: int, keep: Path | None = None) -> list[ListedEntry]:
    """Remove least recently used stage entries until the stage entries fit in max_size.

    Runs after every put. ``keep`` (the entry just written) is never removed, even if it alone
    is larger than max_size: the run that wrote it is about to use it. Entries another run has
    locked are kept (prune's rule); reference models are not counted (they have their own folder
    and are retrained on demand). Returns what was removed.
    """
    entries = list_entries(root)
    candidates = [e for e in plan_prune(entries, max_size=max_size) if keep is None or e.path != keep]
    return prune(candidates).remove


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass
class PrunePlan:
    remove: list[ListedEntry]
    kept_in_use: list[ListedEntry]

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.remove)


def plan_prune(
    entries: list[ListedEntry],
    *,
    older_than_days: float | None = None,
    max_size: int | None = None,
    stage: str | None = None,
    everything: bool = False,
    now: float | None = None,
) -> list[ListedEntry]:
    """What prune would remove, least recently used first (locks not yet considered).

    Scope: stage entries and temp leftovers; reference models only with ``stage="reference-models"``
    (they are trtconv.data.reference_models' cache, retrained on demand). Within the scope, an entry
    goes if ``everything``, or last used more than ``older_than_days`` ago, or it is among the least
    recently used whose removal brings the scope's total to ``max_size`` or below. Temp leftovers
    always go (the locks spare those of a running put).
    """
    now = time.time() if now is None else now
    if stage == REFERENCE_MODELS_SUBDIR:
        scope = [e for e in entries if e.kind == "reference-model"]
    else:
        scope = [e for e in entries if e.kind != "reference-model" and (stage is None or e.stage == stage)]
    scope.sort(key=lambda e: (e.last_used, e.stage, e.key))
    chosen = {id(e) for e in scope if everything or e.kind == "temporary"}
    if older_than_days is not None:
        chosen |= {id(e) for e in scope if now - e.last_used > older_than_days * 86400}
    if max_size is not None:
        total = sum(e.size for e in scope if id(e) not in chosen)
        for e in scope:  # least recently used first
            if total <= max_size:
                break
            if id(e) not in chosen:
                chosen.add(id(e))
                total -= e.size
    return [e for e in scope if id(e) in chosen]


def prune(candidates: list[ListedEntry], *, dry_run: bool = False) -> PrunePlan:
    """Remove each candidate unless a running build holds its lock (then it is kept and reported)."""
    plan = PrunePlan(remove=[], kept_in_use=[])
    for entry in candidates:
        lock = _entry_lock(entry)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            plan.kept_in_use.append(entry)
            continue
        try:
            if not dry_run:
                _remove_listed(entry)
            plan.remove.append(entry)
        finally:
            lock.release()
    return plan


def _remove_listed(entry: ListedEntry) -> None:
    if entry.kind == "stage":
        _remove_entry(entry.path)
    elif entry.kind == "reference-model":
        # Renamed to the temp-folder name trtconv.data.reference_models cleans up, so a half-deleted
        # model never looks like a cached one, even if this process dies mid-delete.
        doomed = entry.path.parent / f".{entry.path.name}.tmp-del-{os.getpid()}"
        try:
            os.rename(entry.path, doomed)
        except FileNotFoundError:
            return
        _remove_tree(doomed)
    else:
        _remove_tree(entry.path)
