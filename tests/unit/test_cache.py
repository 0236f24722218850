"""trtconv.cache.store: keys, atomic entries, corruption handling, locking, and ls/du/prune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock
from typer.testing import CliRunner

from trtconv.cache import store as cache_mod
from trtconv.cache.store import (
    CACHE_FORMAT,
    ENTRY_RECORD,
    PAYLOAD_DIR,
    CacheBusy,
    CacheCorrupted,
    CacheError,
    StageCache,
    parse_size,
    stage_key,
    versions_for_key,
)
from trtconv.cli.cache import cache_app
from trtconv.core.errors import ArtifactError, UserError

PARTS = {
    "model_files": {"model.safetensors": "ab" * 32, "config.json": "cd" * 32},
    "recipe": {"precision": "fp8", "kv_cache": "none", "exclude": ["*lm_head*"]},
    "data_sha256": "ef" * 32,
    "versions": {"torch": "2.13.0", "nvidia-modelopt": "0.47.0", "tensorrt_llm": None},
    "device": {"kind": "cuda", "sm": "9.0"},
    "upstream": None,
}


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TRTCONV_CACHE", str(root))
    return root


@pytest.fixture
def cache(root) -> StageCache:
    return StageCache()


@pytest.fixture
def source(tmp_path) -> Path:
    """A small stage output: a checkpoint-like folder with a subfolder."""
    src = tmp_path / "export-out"
    (src / "checkpoint").mkdir(parents=True)
    (src / "checkpoint" / "config.json").write_text('{"architecture": "LlamaForCausalLM"}')
    (src / "checkpoint" / "rank0.safetensors").write_bytes(bytes(range(256)) * 64)
    (src / "tokenizer.json").write_text("{}")
    return src


def key_of(name: str = "export", **changes) -> str:
    return stage_key(name, {**PARTS, **changes})


def payload(entry: Path) -> Path:
    return entry / PAYLOAD_DIR


def make_writable(path: Path) -> None:
    path.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# Keys


def test_key_is_stable_across_dict_order():
    reordered = dict(reversed(list(PARTS.items())))
    reordered["recipe"] = dict(reversed(list(PARTS["recipe"].items())))
    assert stage_key("export", PARTS) == stage_key("export", reordered)
    assert len(stage_key("export", PARTS)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"model_files": {**PARTS["model_files"], "model.safetensors": "00" * 32}},
        {"recipe": {**PARTS["recipe"], "precision": "int4_awq"}},
        {"recipe": {**PARTS["recipe"], "exclude": []}},
        {"data_sha256": "00" * 32},
        {"versions": {**PARTS["versions"], "nvidia-modelopt": "0.47.1"}},
        {"versions": {**PARTS["versions"], "tensorrt_llm": "1.2.0"}},
        {"device": {"kind": "cuda", "sm": "8.9"}},
        {"upstream": "12" * 32},
        {"new_part": 1},
    ],
)
def test_key_changes_when_any_part_changes(change):
    assert key_of(**change) != key_of()


def test_key_covers_stage_name_and_format(monkeypatch):
    assert stage_key("calibrate", PARTS) != stage_key("export", PARTS)
    before = stage_key("export", PARTS)
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT", CACHE_FORMAT + 1)
    assert stage_key("export", PARTS) != before


def test_key_refuses_reserved_parts_and_non_json_values(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        stage_key("export", {"stage": "x"})
    with pytest.raises(TypeError):
        stage_key("export", {"path": tmp_path})  # a Path must be turned into a string by the caller
    with pytest.raises(ValueError):
        stage_key("../escape", PARTS)


def test_versions_for_key_names_the_packages_that_change_outputs():
    versions = versions_for_key()
    for name in ("trtconv", "torch", "transformers", "nvidia-modelopt", "tensorrt_llm", "tensorrt", "trtconv_source"):
        assert name in versions
    assert len(versions["trtconv_source"]) == 64


# ---------------------------------------------------------------------------------------------
# put / get / materialize


def test_put_get_round_trip(cache, root, source, tmp_path):
    key = key_of()
    assert cache.get("export", key) is None
    assert cache.last_miss.kind == "absent"

    entry = cache.put("export", key, source, meta={"stage_seconds": 3600})
    assert entry == root / "stages" / "export" / key
    assert cache.get("export", key) == entry
    assert cache.last_miss is None and cache.last_miss_reason is None

    record = json.loads((entry / ENTRY_RECORD).read_text())
    assert record["stage"] == "export" and record["key"] == key and record["meta"] == {"stage_seconds": 3600}
    assert {f["path"] for f in record["files"]} == {"checkpoint/config.json", "checkpoint/rank0.safetensors", "tokenizer.json"}

    out = cache.materialize(entry, tmp_path / "artifact")
    for rel in ("checkpoint/config.json", "checkpoint/rank0.safetensors", "tokenizer.json"):
        assert (out / rel).read_bytes() == (source / rel).read_bytes()
    # The artifact's file is the cache's (hard link, read-only) or an independent clone (reflink):
    # an edit through the artifact either leaves the cache intact or is found by the next lookup.
    linked = os.path.samefile(out / "tokenizer.json", entry / PAYLOAD_DIR / "tokenizer.json")
    assert not linked or (out / "tokenizer.json").stat().st_mode & 0o777 == 0o444
    (out / "tokenizer.json").chmod(0o644)
    (out / "tokenizer.json").write_text("edited")
    assert cache.get("export", key) == (None if linked else entry)
    assert not linked or cache.last_miss.kind == "corrupted"


def test_restore_copies_a_hit_and_reports_a_miss(cache, source, tmp_path):
    key = key_of()
    assert cache.restore("export", key, tmp_path / "a") is None
    assert cache.last_miss.kind == "absent"
    cache.put("export", key, source)
    assert cache.restore("export", key, tmp_path / "b") == tmp_path / "b"
    assert (tmp_path / "b" / "checkpoint" / "rank0.safetensors").read_bytes() == (source / "checkpoint" / "rank0.safetensors").read_bytes()


def test_materialize_never_overwrites(cache, source, tmp_path):
    entry = cache.put("export", key_of(), source)
    dest = tmp_path / "artifact"
    dest.mkdir()
    (dest / "tokenizer.json").write_text("mine")
    with pytest.raises(CacheError, match="already exists"):
        cache.materialize(entry, dest)
    assert (dest / "tokenizer.json").read_text() == "mine"


def test_put_keeps_an_existing_valid_entry(cache, source):
    key = key_of()
    entry = cache.put("export", key, source, meta={"run": 1})
    assert cache.put("export", key, source, meta={"run": 2}) == entry
    assert cache.read_record(entry)["meta"] == {"run": 1}


def test_put_refuses_pickle(cache, source):
    (source / "modelopt_state.pth").write_bytes(b"\x80\x04")
    with pytest.raises(CacheError, match="pickle"):
        cache.put("calibrate", key_of("calibrate"), source)


def test_put_into_an_unwritable_root_names_the_env_var(tmp_path, source, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRTCONV_CACHE", str(blocker / "cache"))
    with pytest.raises(CacheError, match="TRTCONV_CACHE") as err:
        StageCache().put("export", key_of(), source)
    assert isinstance(err.value, ArtifactError) and isinstance(err.value, UserError)


# ---------------------------------------------------------------------------------------------
# Corruption: every damage is a miss with a reason, and the entry is gone


def flip_byte(entry: Path) -> None:
    f = payload(entry) / "checkpoint" / "rank0.safetensors"
    make_writable(f)
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))


def truncate(entry: Path) -> None:
    f = payload(entry) / "checkpoint" / "rank0.safetensors"
    make_writable(f)
    f.write_bytes(f.read_bytes()[:1000])


def add_extra(entry: Path) -> None:
    (payload(entry) / "checkpoint" / "rank1.safetensors").write_bytes(b"x")


def drop_record(entry: Path) -> None:
    (entry / ENTRY_RECORD).unlink()


def drop_file(entry: Path) -> None:
    (payload(entry) / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [(flip_byte, "changed"), (truncate, "changed"), (add_extra, "extra"), (drop_record, "entry.json is missing"), (drop_file, "missing")],
)
def test_damaged_entry_is_a_miss_with_reason_and_removed(cache, source, damage, reason):
    key = key_of()
    entry = cache.put("export", key, source)
    damage(entry)
    assert cache.get("export", key) is None
    assert cache.last_miss.kind == "corrupted"
    assert reason in cache.last_miss_reason
    assert not entry.exists()
    assert not list(entry.parent.glob(f"{key}.*"))  # nothing half-removed left behind
    assert cache.put("export", key, source) == entry  # and it can be rebuilt
    assert cache.get("export", key) == entry


def test_size_verify_misses_a_flipped_byte_but_restore_catches_it(cache, source, tmp_path):
    key = key_of()
    entry = cache.put("export", key, source)
    flip_byte(entry)
    assert cache.get("export", key, verify="size") == entry  # the documented trade-off
    dest = tmp_path / "artifact"
    assert cache.restore("export", key, dest) is None
    assert cache.last_miss.kind == "corrupted" and "changed" in cache.last_miss_reason
    assert not entry.exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # partial copies removed


def test_materialize_of_corrupted_entry_raises(cache, source, tmp_path):
    entry = cache.put("export", key_of(), source)
    flip_byte(entry)
    with pytest.raises(CacheCorrupted):
        cache.materialize(entry, tmp_path / "artifact")
    assert not entry.exists()


# ---------------------------------------------------------------------------------------------
# Locking and atomicity


def test_concurrent_put_of_the_same_key_is_refused(cache, source):
    key = key_of()
    lock = FileLock(str(cache.stage_dir("export") / f".{key}.lock"))
    cache.stage_dir("export").mkdir(parents=True)
    with lock:
        with pytest.raises(CacheBusy, match="another trtconv run is writing cache entry"):
            cache.put("export", key, source)
    assert cache.get("export", key) is None
    assert cache.put("export", key, source).is_dir()  # free again once the other run is done


def test_lock_held_by_another_process_is_refused(cache, source, tmp_path):
    key = key_of()
    lock_path = cache.stage_dir("export") / f".{key}.lock"
    lock_path.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from filelock import FileLock; l=FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(30)", str(lock_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheBusy):
            cache.put("export", key, source)
    finally:
        holder.kill()
        holder.wait()
    assert cache.put("export", key, source).is_dir()


def test_interrupted_put_leaves_no_entry(cache, source, monkeypatch):
    key = key_of()
    real_store = cache_mod._link_or_copy
    calls = []

    def store_then_die(src, dst, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C half way through the payload
        return real_store(src, dst, **kwargs)

    monkeypatch.setattr(cache_mod, "_link_or_copy", store_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache.put("export", key, source)
    stage_dir = cache.stage_dir("export")
    assert [p.name for p in stage_dir.iterdir() if not p.name.startswith(".")] == []
    assert cache.get("export", key) is None and cache.last_miss.kind == "absent"


def test_killed_put_leftover_is_ignored_and_cleaned(cache, source):
    key = key_of()
    leftover = cache.stage_dir("export") / f"{key}.tmp-99999"
    (leftover / PAYLOAD_DIR).mkdir(parents=True)
    (leftover / ENTRY_RECORD).write_text("{}")  # a kill -9 right before the rename
    assert cache.get("export", key) is None and cache.last_miss.kind == "absent"
    entry = cache.put("export", key, source)
    assert not leftover.exists()
    assert cache.get("export", key) == entry


# ---------------------------------------------------------------------------------------------
# ls / du / prune


def invoke(*args: str):
    result = CliRunner().invoke(cache_app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def aged(entry: Path, days_ago: float) -> None:
    """Pretend the entry was last used days_ago."""
    t = time.time() - days_ago * 86400
    os.utime(entry / ENTRY_RECORD, (t, t))


@pytest.fixture
def three_entries(cache, source, root):
    """calibrate (used 30 days ago), export (10 days ago), engine (now), plus a reference model."""
    entries = {}
    for stage, days in (("calibrate", 30), ("export", 10), ("engine", 0)):
        entries[stage] = cache.put(stage, key_of(stage), source)
        aged(entries[stage], days)
    ref = root / "reference-models" / "llama-ref-0123456789abcdef"
    ref.mkdir(parents=True)
    (ref / "model.safetensors").write_bytes(b"w" * 100)
    (ref / "training.json").write_text("{}")
    entries["ref"] = ref
    return entries


def test_ls_lists_stages_and_reference_models_lru_first(three_entries):
    result = invoke("ls", "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)["entries"]
    stage_rows = [e["stage"] for e in listed if e["kind"] == "stage"]
    assert stage_rows == ["calibrate", "export", "engine"]
    assert any(e["kind"] == "reference-model" and e["stage"] == "llama-ref" for e in listed)
    table = invoke("ls").stdout
    assert "calibrate" in table and key_of("calibrate")[:12] in table and "reference-model" in table


def test_du_counts_per_stage_and_kind(three_entries, source):
    result = invoke("du", "--json")
    data = json.loads(result.stdout)
    assert set(data["groups"]) == {"calibrate", "export", "engine", "reference-models"}
    assert data["total"] == sum(g["size"] for g in data["groups"].values())
    assert data["groups"]["export"]["entries"] == 1
    assert "total" in invoke("du").stdout


def test_prune_dry_run_deletes_nothing(three_entries):
    result = invoke("prune", "--all", "--dry-run")
    assert result.exit_code == 0 and "would remove" in result.stdout
    assert all(p.exists() for p in three_entries.values())


def test_prune_older_than(three_entries):
    result = invoke("prune", "--older-than", "7")
    assert result.exit_code == 0
    assert not three_entries["calibrate"].exists() and not three_entries["export"].exists()
    assert three_entries["engine"].exists() and three_entries["ref"].exists()


def test_prune_max_size_drops_least_recently_used_first(three_entries):
    one = sum(f.stat().st_size for f in three_entries["engine"].rglob("*") if f.is_file())
    result = invoke("prune", "--max-size", str(one + one // 2))  # room for one entry
    assert result.exit_code == 0, result.output
    assert not three_entries["calibrate"].exists() and not three_entries["export"].exists()
    assert three_entries["engine"].exists()
    # Using an entry makes it recent: now export (re-put) is kept and engine goes.
    cache = StageCache()
    cache.put("export", key_of("export"), three_entries["engine"] / PAYLOAD_DIR)
    aged(three_entries["engine"], 1)
    invoke("prune", "--max-size", str(one + one // 2))
    assert three_entries["export"].exists() and not three_entries["engine"].exists()


def test_get_touches_the_entry_for_lru(cache, three_entries):
    before = (three_entries["calibrate"] / ENTRY_RECORD).stat().st_mtime
    assert cache.get("calibrate", key_of("calibrate")) is not None
    assert (three_entries["calibrate"] / ENTRY_RECORD).stat().st_mtime > before + 86400


def test_prune_stage_and_reference_models_scope(three_entries):
    invoke("prune", "--all", "--stage", "export")
    assert not three_entries["export"].exists() and three_entries["calibrate"].exists()
    invoke("prune", "--all")
    assert three_entries["ref"].exists()  # reference models only when asked by name
    invoke("prune", "--all", "--stage", "reference-models")
    assert not three_entries["ref"].exists()


def test_prune_spares_a_locked_entry(cache, three_entries):
    key = key_of("calibrate")
    with FileLock(str(cache.stage_dir("calibrate") / f".{key}.lock")):
        result = invoke("prune", "--all")
    assert "in use by a running build" in result.stdout
    assert three_entries["calibrate"].exists() and not three_entries["export"].exists()


def test_prune_removes_leftovers_and_needs_a_criterion(cache, root):
    leftover = cache.stage_dir("export") / f"{key_of()}.tmp-4242"
    leftover.mkdir(parents=True)
    result = invoke("prune")
    assert result.exit_code == 2 and "--older-than" in result.output
    invoke("prune", "--older-than", "365")
    assert not leftover.exists()


def test_parse_size():
    assert parse_size("10G") == 10 * 2**30
    assert parse_size("1.5k") == 1536
    assert parse_size("512") == 512
    assert parse_size("2GiB") == 2 * 2**30
    with pytest.raises(CacheError):
        parse_size("lots")


def test_materialize_waits_for_a_locked_entry_then_gives_up(cache, source, tmp_path):
    key = key_of()
    entry = cache.put("export", key, source)
    with FileLock(str(entry.parent / f".{key}.lock")):
        with pytest.raises(CacheBusy, match="stayed locked"):
            cache.materialize(entry, tmp_path / "a", lock_wait_s=0.1)
    assert cache.restore("export", key, tmp_path / "c") == tmp_path / "c"
    assert os.access(tmp_path / "c" / "tokenizer.json", os.W_OK)  # the artifact's copy is writable


def test_disk_full_during_put_is_a_clear_error_and_leaves_nothing(cache, source, monkeypatch):
    def no_space(src, dst, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "_link_or_copy", no_space)
    with pytest.raises(CacheError, match="No space left on device.*prune --max-size"):
        cache.put("export", key_of(), source)
    assert [p.name for p in cache.stage_dir("export").iterdir() if not p.name.startswith(".")] == []
