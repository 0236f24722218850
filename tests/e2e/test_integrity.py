"""Issue 23, integrity: every file the load reads is an input, a manifest is checked against itself,
damage shared through the cache's hard links is reported, the default artifact is the same on every machine.

Every test here failed on the code before the fix it covers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trtconv.core.errors import ModelError


# ---------------------------------------------------------------------------------------------
# 1. A shard named outside the model folder is refused; a symlink inside it is followed and hashed


def _outside_shard_pair(tiny: Path, root: Path) -> tuple[Path, Path]:
    """good/ = a whole tiny model; evil/ = its config and tokenizer, with an index naming ../good's weights."""
    from safetensors import safe_open

    good = shutil.copytree(tiny, root / "good")
    evil = root / "evil"
    evil.mkdir()
    for f in good.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, evil / f.name)
    with safe_open(good / "model.safetensors", "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "../good/model.safetensors" for n in names}}
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    return good, evil


def _inspect(model_dir: Path):
    from trtconv.recipe.schema import ModelSection
    from trtconv.stages import load

    return load.inspect_checkpoint(ModelSection(path=str(model_dir)))


@pytest.mark.parametrize("shard", ["../good/model.safetensors", "{abs}", "sub/../../good/model.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(tiny_llama, tmp_path, shard):
    good, evil = _outside_shard_pair(tiny_llama, tmp_path)
    shard = shard.format(abs=good / "model.safetensors")
    index = json.loads((evil / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard for k in index["weight_map"]}
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as err:
        _inspect(evil)
    msg = str(err.value)
    assert str(evil / "model.safetensors.index.json") in msg
    assert f"names shard {shard!r}" in msg and "weight_map['" in msg
    assert "not inside the model folder" in msg and "without '..'" in msg


@pytest.mark.integration
def test_cli_refuses_the_outside_shard_before_any_work(cli, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.delenv("TRTCONV_NO_CACHE", raising=False)  # the whole-run cache's look-up reads the index too
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    _good, evil = _outside_shard_pair(tiny_llama, tmp_path)
    r = cli("calibrate", "--model", evil, "--precision", "fp8", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "'../good/model.safetensors'" in r.output and "not inside the model folder" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_an_artifacts_hf_checkpoint_index_naming_an_outside_shard_is_refused(tiny_llama, tmp_path):
    """The gate must judge the artifact's own (hashed) files, not a file its index points to elsewhere."""
    from trtconv.checkpoints.hf_reader import HFTensors

    _good, evil = _outside_shard_pair(tiny_llama, tmp_path)
    with pytest.raises(ModelError, match=r"names shard '\.\./good/model\.safetensors', which is not inside"):
        HFTensors(evil)


def test_a_symlinked_shard_inside_the_folder_is_hashed_by_its_bytes(tiny_llama, tmp_path):
    """Followed like any symlink: the bytes it leads to are the input, so editing them changes the key."""
    from trtconv.stages import load

    good, evil = _outside_shard_pair(tiny_llama, tmp_path)
    (evil / "model.safetensors.index.json").unlink()
    (evil / "weights").mkdir()
    (evil / "weights" / "model.safetensors").symlink_to(good / "model.safetensors")
    index = {"metadata": {}, "weight_map": {n: "weights/model.safetensors" for n in _tensor_names(good)}}
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))

    def model_files():
        model_dir, _cfg, _arch, weights = _inspect(evil)
        record = load.describe_inputs(model_dir, weights, load.start_hashing(model_dir, weights, remembered=False))[0]
        return {f.path: f.sha256 for f in record.files}

    before = model_files()
    assert "weights/model.safetensors" in before  # recorded under the name it is read by
    _rewrite_one_tensor(good / "model.safetensors")
    after = model_files()
    assert after["weights/model.safetensors"] != before["weights/model.safetensors"]


@pytest.mark.parametrize("name", ["modeling_custom.py", "vocab.txt", "extra.tiktoken", "chat_template.json"])
def test_remote_code_and_every_tokenizer_file_are_inputs(tiny_llama, tmp_path, name):
    """Files transformers reads beside the weights (remote code, any vocabulary) are hashed too."""
    from trtconv.stages import load

    m = shutil.copytree(tiny_llama, tmp_path / "m")
    (m / name).write_text("one\n")

    def recorded():
        weights = load.check_weight_files(m)
        records = load.describe_inputs(m, weights, load.start_hashing(m, weights, remembered=False))
        return {f.path: f.sha256 for rec in records for f in rec.files}

    before = recorded()
    assert name in before
    (m / name).write_text("two\n")
    assert recorded()[name] != before[name]


def _tensor_names(model: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "pt") as f:
        return list(f.keys())


def _rewrite_one_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = "model.norm.weight"
    tensors[name] = tensors[name] + 1
    save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# 7. Damage shared through the cache's hard links: reported by check and verify, never reused

FAST = ["--precision", "none", "--num-samples", "4", "--seq-len", "64", "--batch-size", "4",
        "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64", "--set", "evaluate.allow_inconclusive=true",
        "--set", "evaluate.gates.max_ppl_increase_pct=1000", "--set", "evaluate.gates.max_kl=100",
        "--set", "evaluate.gates.min_top1_agreement=0"]
RANK0 = "checkpoint/rank0.safetensors"


def _flip_in_place(path: Path, keep_mtime: bool = False) -> None:
    """One byte flipped in place, as root's tools would (the read-only bit does not stop root)."""
    import os

    st = os.stat(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    os.chmod(path, st.st_mode & 0o777)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _digest(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["artifact_digest"]


@pytest.fixture
def stage_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("TRTCONV_NO_CACHE", raising=False)
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.integration
def test_a_byte_flipped_in_one_artifact_is_reported_and_never_reused(cli, tiny_llama, tmp_path, stage_cache):
    a, b, c = (tmp_path / name for name in ("a", "b", "c"))
    assert cli("calibrate", "--model", tiny_llama, "-o", a, *FAST).exit_code == 0
    hit = cli("calibrate", "--model", tiny_llama, "-o", b, *FAST)
    assert hit.exit_code == 0 and "the whole artifact reused from the cache" in hit.output
    assert cli("verify", b).exit_code == 0  # a whole-run hit's new manifest is consistent with itself
    shared = (a / RANK0).stat().st_ino == (b / RANK0).stat().st_ino  # hard links (ext4); reflinks would not share
    _flip_in_place(a / RANK0)

    checked = cli("check", a)
    assert checked.exit_code == 1, checked.output
    assert f"changed: {RANK0}" in checked.output and "no longer match manifest.json" in checked.output
    assert f"{a}: passed" not in checked.output
    if shared:  # the other artifact holds the same bytes: verify says so
        other = cli("verify", b)
        assert other.exit_code == 1 and f"changed: {RANK0}" in other.output

    again = cli("calibrate", "--model", tiny_llama, "-o", c, *FAST)
    assert again.exit_code == 0, again.output
    assert "cache entry not used (corrupted" in again.output
    if shared:
        assert "share this file: artifacts restored from this entry hold the same damaged bytes" in again.output
    assert cli("verify", c).exit_code == 0 and _digest(c) == _digest(a)


@pytest.mark.integration
def test_rehash_finds_a_flip_that_kept_its_mtime(cli, tiny_llama, tmp_path, stage_cache, monkeypatch):
    """A deliberate edit that restores the mtime passes the stat check; TRTCONV_CACHE_REHASH=1 reads every file."""
    a, c = tmp_path / "a", tmp_path / "c"
    assert cli("calibrate", "--model", tiny_llama, "-o", a, *FAST).exit_code == 0
    _flip_in_place(a / RANK0, keep_mtime=True)
    monkeypatch.setenv("TRTCONV_CACHE_REHASH", "1")
    again = cli("calibrate", "--model", tiny_llama, "-o", c, *FAST)
    assert again.exit_code == 0, again.output
    assert "cache entry not used (corrupted" in again.output
    assert cli("verify", c).exit_code == 0 and _digest(c) == _digest(a)
