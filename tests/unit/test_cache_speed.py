"""Issue 9's cache work: remembered input hashes, hard-linked entries, LRU eviction under cache.max_size."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trtconv.artifact import writer as writer_mod
from trtconv.cache import hashes as hashes_mod
from trtconv.cache import store as store_mod
from trtconv.cache.hashes import HASHES_FILE, BackgroundHashes, HashTable
from trtconv.cache.store import CacheError, StageCache, list_entries, stage_key
from trtconv.cli.cache import cache_app


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TRTCONV_CACHE", str(root))
    monkeypatch.delenv("TRTCONV_CACHE_MAX_SIZE", raising=False)
    return root


@pytest.fixture(autouse=True)
def no_reflink(monkeypatch):
    """Hard links, as on ext4 (where the tests run); a reflinking filesystem would give clones."""
    monkeypatch.setattr(store_mod, "_reflink", lambda src, dst: False)


@pytest.fixture
def counted(monkeypatch) -> list[Path]:
    """Every full read for hashing, by path."""
    reads: list[Path] = []
    real = writer_mod.sha256_file

    def counting(path):
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(writer_mod, "sha256_file", counting)
    monkeypatch.setattr(store_mod, "sha256_file", counting)
    return reads


def make_folder(base: Path, size: int = 4096, tag: bytes = b"x") -> Path:
    (base / "checkpoint").mkdir(parents=True)
    (base / "checkpoint" / "rank0.safetensors").write_bytes(tag * size)
    (base / "checkpoint" / "config.json").write_text('{"a": 1}')
    return base


def key(n: int) -> str:
    return stage_key("export", {"n": n})


# ---------------------------------------------------------------------------------------------
# The hash table: reused while (path, size, mtime_ns, inode) hold, recomputed when any changes


def test_hash_is_reused_across_runs_while_the_file_is_unchanged(root, tmp_path, counted):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"w" * 10_000)
    first = HashTable()
    sha = first.sha256(f)
    first.save()
    assert (root / HASHES_FILE).is_file() and counted == [f]
    second = HashTable()  # a later run: reads the table from disk
    assert second.sha256(f) == sha
    assert counted == [f]  # not read again


@pytest.mark.parametrize("change", ["content_same_size", "size", "touch", "replace_inode"])
def test_hash_is_recomputed_when_size_mtime_or_inode_changes(root, tmp_path, counted, change):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"w" * 10_000)
    table = HashTable()
    old = table.sha256(f)
    table.save()
    st = f.stat()
    if change == "content_same_size":
        f.write_bytes(b"v" * 10_000)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "size":
        f.write_bytes(b"w" * 10_001)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, other size
    elif change == "touch":
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:  # a new file moved over it: same size and mtime, new inode
        g = tmp_path / "new"
        g.write_bytes(b"u" * 10_000)
        os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(g, f)
    again = HashTable()
    assert again.lookup(f) is None
    new = again.sha256(f)
    assert counted == [f, f]
    assert (new == old) == (change == "touch")


@pytest.mark.parametrize("garbage", ["{not json", '{"format": 1, "files": []}', '{"format": 99, "files": {}}',
                                     '{"format": 1, "files": {"/x": {"sha256": 5}}}'])
def test_a_corrupted_hash_table_is_ignored(root, tmp_path, counted, garbage):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"w" * 100)
    root.mkdir(parents=True)
    (root / HASHES_FILE).write_text(garbage)
    table = HashTable()
    assert table.lookup(f) is None
    sha = table.sha256(f)
    table.save()  # replaces the damaged table with a good one
    assert json.loads((root / HASHES_FILE).read_text())["files"][str(f.absolute())]["sha256"] == sha


def test_a_lying_hash_table_entry_for_another_inode_is_not_used(root, tmp_path, counted):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"w" * 100)
    st = f.stat()
    root.mkdir(parents=True)
    table = {"format": 1, "files": {str(f.absolute()): {"size": 100, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino + 1,
                                                        "sha256": "0" * 64}}}
    (root / HASHES_FILE).write_text(json.dumps(table))
    assert HashTable().sha256(f) != "0" * 64


def test_background_hashes_read_only_unknown_files(root, tmp_path, counted):
    known, new = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    known.write_bytes(b"a" * 1000)
    new.write_bytes(b"b" * 1000)
    first = BackgroundHashes([known])
    assert first.pending
    first.result()
    counted.clear()
    second = BackgroundHashes([known, new])
    assert second.pending  # b is new: hashed on the thread
    result = second.result()
    assert counted == [new] and set(result) == {known, new}
    third = BackgroundHashes([known, new])
    assert not third.pending and third.result() == result


# ---------------------------------------------------------------------------------------------
# Hard links: put and restore link; across filesystems they copy; corruption is still found


def test_put_and_restore_hard_link_and_read_each_file_once(root, tmp_path, counted):
    src = make_folder(tmp_path / "artifact-tmp")
    cache = StageCache()
    entry = cache.put("export", key(1), src, {})
    big = src / "checkpoint" / "rank0.safetensors"
    cached = entry / "payload" / "checkpoint" / "rank0.safetensors"
    assert os.path.samefile(big, cached)
    assert cached.stat().st_mode & 0o777 == 0o444  # read-only, and so the artifact's file too
    assert sorted(p.name for p in counted) == ["config.json", "rank0.safetensors"]  # hashed once while stored
    dest = tmp_path / "next-artifact"
    counted.clear()
    assert cache.restore("export", key(1), dest) == dest
    assert os.path.samefile(dest / "checkpoint" / "rank0.safetensors", cached)
    assert counted == []  # unchanged since put (inode, size, mtime): linked without reading
    # The manifest's hashing reuses what put/restore noted: no read either.
    from trtconv.artifact.manifest import hash_tree

    records = hash_tree(dest, reuse_noted=True)
    assert counted == [] and {r.path for r in records} == {"checkpoint/rank0.safetensors", "checkpoint/config.json"}
    assert records == hash_tree(dest)  # and the same as reading every byte


def test_across_filesystems_put_and_restore_copy(root, tmp_path, counted, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(store_mod.os, "link", no_link)
    src = make_folder(tmp_path / "artifact-tmp")
    cache = StageCache()
    entry = cache.put("export", key(2), src, {})
    cached = entry / "payload" / "checkpoint" / "rank0.safetensors"
    assert not os.path.samefile(src / "checkpoint" / "rank0.safetensors", cached)
    assert (src / "checkpoint" / "rank0.safetensors").stat().st_mode & 0o777 != 0o444  # the artifact stays as written
    dest = tmp_path / "next-artifact"
    assert cache.restore("export", key(2), dest) == dest
    assert (dest / "checkpoint" / "rank0.safetensors").read_bytes() == cached.read_bytes()
    assert not os.path.samefile(dest / "checkpoint" / "rank0.safetensors", cached)


def test_other_link_errors_are_not_swallowed(root, tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_mod.os, "link", broken)
    with pytest.raises(CacheError, match="I/O error"):
        StageCache().put("export", key(3), make_folder(tmp_path / "a"), {})


def test_an_edit_through_the_linked_artifact_is_found_on_the_next_restore(root, tmp_path):
    src = make_folder(tmp_path / "artifact")
    cache = StageCache()
    cache.put("export", key(4), src, {})
    victim = src / "checkpoint" / "rank0.safetensors"
    victim.chmod(0o644)  # someone forces the read-only file open and edits the artifact in place
    with open(victim, "r+b") as f:
        f.write(b"EVIL")
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 5_000_000))  # an edit moves mtime on
    dest = tmp_path / "next"
    assert cache.restore("export", key(4), dest) is None
    assert cache.last_miss.kind == "corrupted" and "rank0.safetensors" in cache.last_miss.detail
    assert not dest.exists() or not any(dest.rglob("*.safetensors"))
    assert not cache.entry_dir("export", key(4)).exists()  # the damaged entry is gone


def test_full_verify_reads_everything_whatever_the_stat_says(root, tmp_path):
    src = make_folder(tmp_path / "artifact")
    cache = StageCache()
    entry = cache.put("export", key(5), src, {})
    victim = entry / "payload" / "checkpoint" / "rank0.safetensors"
    st = victim.stat()
    with open(victim, "r+b") as f:  # bit rot: bytes change, mtime put back
        f.write(b"ROT!")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get("export", key(5), verify="full") is None
    assert cache.last_miss.kind == "corrupted"


# ---------------------------------------------------------------------------------------------
# cache.max_size: least recently used entries go after each store


def test_lru_eviction_after_each_store_keeps_the_recently_used(root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_CACHE_MAX_SIZE", "10K")  # room for two 4 KiB entries
    cache = StageCache()
    assert cache.max_size == 10 * 1024
    for n in (1, 2):
        cache.put("export", key(n), make_folder(tmp_path / f"a{n}"), {})
        entry_json = cache.entry_dir("export", key(n)) / "entry.json"
        os.utime(entry_json, (time.time() - 100 + n, time.time() - 100 + n))  # 1 older than 2
    assert cache.get("export", key(1)) is not None  # using 1 makes 2 the least recently used
    cache.put("export", key(3), make_folder(tmp_path / "a3"), {})
    assert [e.key for e in cache.last_evicted] == [key(2)]
    assert sorted(e.key for e in list_entries(root) if e.kind == "stage") == sorted([key(1), key(3)])


def test_the_entry_just_stored_is_kept_even_if_alone_too_big(root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_CACHE_MAX_SIZE", "1K")
    cache = StageCache()
    cache.put("export", key(1), make_folder(tmp_path / "a1"), {})
    cache.put("export", key(2), make_folder(tmp_path / "a2"), {})
    assert [e.key for e in list_entries(root) if e.kind == "stage"] == [key(2)]


def test_a_bad_max_size_setting_is_a_clear_error(root, monkeypatch):
    monkeypatch.setenv("TRTCONV_CACHE_MAX_SIZE", "lots")
    with pytest.raises(CacheError, match="TRTCONV_CACHE_MAX_SIZE='lots' is not a size"):
        StageCache()
    result = CliRunner().invoke(cache_app, ["du"])
    assert result.exit_code == 2 and "TRTCONV_CACHE_MAX_SIZE" in result.output


def test_du_reports_the_bound(root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_CACHE_MAX_SIZE", "20G")
    StageCache().put("export", key(1), make_folder(tmp_path / "a1"), {})
    result = CliRunner().invoke(cache_app, ["du", "--json"])
    data = json.loads(result.output)
    assert data["max_size"] == 20 * 1024**3 and data["bounded"] == data["groups"]["export"]["size"] > 0
    text = CliRunner().invoke(cache_app, ["du"]).output
    assert "of max_size 20.0 GiB" in text


def test_torch_extensions_go_under_the_cache_unless_set(root, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = store_mod.use_torch_extensions_cache()
    assert folder.parent == root / "torch-extensions" and os.environ["TORCH_EXTENSIONS_DIR"] == str(folder)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    assert store_mod.use_torch_extensions_cache() == Path("/mine")


def test_a_disabled_table_hashes_everything_and_writes_nothing(root, tmp_path, counted):
    """--no-cache: the remembered hashes are neither used nor updated."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"w" * 100)
    first = HashTable()
    first.sha256(f)
    first.save()
    counted.clear()
    off = BackgroundHashes([f], HashTable(enabled=False))
    assert off.pending
    off.result()
    assert counted == [f]
    before = (root / HASHES_FILE).stat().st_mtime_ns
    table = HashTable(enabled=False)
    table.remember(f, "0" * 64, f.stat())
    table.save()
    assert (root / HASHES_FILE).stat().st_mtime_ns == before
