"""trtconv.data.reference_models: cache, atomicity, lock, reproducibility (tiny spec), and real quality (slow)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import pytest

from trtconv.data import reference_models as rm
from trtconv.data.packs import builtin_pack, file_sha256, read_text_documents
from trtconv.core.errors import ModelError

# A model small enough to train in well under a second: the cache machinery is what is tested.
TINY = dataclasses.replace(
    rm.REFERENCE_MODELS["llama-ref"],
    name="tiny-ref",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    vocab_size=300,
    steps=3,
    batch_size=2,
    seq_len=32,
    warmup_steps=1,
    threads=1,
)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Register the tiny spec, give it a small corpus, and count trainings."""
    monkeypatch.setitem(rm.REFERENCE_MODELS, "tiny-ref", TINY)
    corpus = tmp_path / "corpus.jsonl"
    lines = builtin_pack("reference-train").read_text(encoding="utf-8").splitlines()[:40]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    calls = []
    real_train = rm.train_reference_model

    def counting_train(*args, **kwargs):
        calls.append(args[1])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(rm, "train_reference_model", counting_train)
    return {"corpus": corpus, "calls": calls, "cache": tmp_path / "cache"}


def model_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / rm.CACHE_SUBDIR).iterdir() if p.is_dir())


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"Unknown reference model 'gpt-ref'; known reference models: llama-ref, qwen2-ref\."):
        rm.ensure_reference_model("gpt-ref", tmp_path)


def test_unwritable_cache_is_a_model_error_naming_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelError, match=r"Cannot create the reference-model cache .*file/reference-models .*set TRTCONV_CACHE"):
        rm.ensure_reference_model("qwen2-ref", blocker)  # llama-ref is shipped: it needs no cache


def test_registry_specs_match_the_brief() -> None:
    llama, qwen = rm.REFERENCE_MODELS["llama-ref"], rm.REFERENCE_MODELS["qwen2-ref"]
    assert (llama.architecture, qwen.architecture) == ("LlamaForCausalLM", "Qwen2ForCausalLM")
    for spec in (llama, qwen):
        assert spec.hidden_size % 128 == 0 and spec.intermediate_size % 128 == 0
        assert spec.num_key_value_heads < spec.num_attention_heads  # grouped-query attention
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0


def test_first_use_trains_a_loadable_folder_and_then_reuses_it(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TRTCONV_CACHE", str(tiny["cache"]))  # the env var is the default cache root
    messages: list[str] = []
    folder = rm.ensure_reference_model("tiny-ref", corpus=tiny["corpus"], progress=messages.append)
    assert folder.parent == tiny["cache"] / "reference-models" and folder.name.startswith("tiny-ref-")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "training.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert any("step 3/3" in m for m in messages)
    assert (folder.stat().st_mode & 0o777, (folder / "model.safetensors").stat().st_mode & 0o777) == (0o755, 0o644)

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert not model.config.tie_word_embeddings
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    record = json.loads((folder / "training.json").read_text())
    assert record["steps"] == 3 and len(record["losses"]) == 3 and record["seed"] == 0
    assert record["corpus_sha256"] == file_sha256(tiny["corpus"])
    assert record["uniform_loss"] == pytest.approx(math.log(len(tokenizer)), abs=1e-4)
    assert set(record["versions"]) == {"torch", "transformers", "tokenizers"}

    again = rm.ensure_reference_model("tiny-ref", corpus=tiny["corpus"])
    assert again == folder and len(tiny["calls"]) == 1


def test_cache_key_changes_with_spec_and_corpus(tiny: dict, tmp_path: Path) -> None:
    eval_pack = builtin_pack("eval")
    base = rm.cache_key(TINY, tiny["corpus"], eval_pack)
    assert rm.cache_key(TINY, tiny["corpus"], eval_pack) == base
    assert rm.cache_key(dataclasses.replace(TINY, steps=4), tiny["corpus"], eval_pack) != base
    other = tmp_path / "other.jsonl"
    other.write_bytes(tiny["corpus"].read_bytes() + b'{"text": "one more line of text"}\n')
    assert rm.cache_key(TINY, other, eval_pack) != base


def test_interrupted_training_leaves_nothing_that_looks_complete(tiny: dict) -> None:
    def interrupt(message: str) -> None:
        if "step 1/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rm.ensure_reference_model("tiny-ref", tiny["cache"], corpus=tiny["corpus"], progress=interrupt)
    leftovers = [p.name for p in (tiny["cache"] / rm.CACHE_SUBDIR).iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    folder = rm.ensure_reference_model("tiny-ref", tiny["cache"], corpus=tiny["corpus"])
    assert (folder / "training.json").is_file()


def test_leftovers_of_a_killed_training_are_cleaned_and_it_trains_again(tiny: dict) -> None:
    key = rm.cache_key(TINY, tiny["corpus"], builtin_pack("eval"))
    parent = tiny["cache"] / rm.CACHE_SUBDIR
    stale_temp = parent / f".tiny-ref-{key}.tmp-killed"
    (stale_temp).mkdir(parents=True)
    (stale_temp / "model.safetensors").write_bytes(b"half")
    damaged = parent / f"tiny-ref-{key}"  # no training.json: not complete
    damaged.mkdir()
    (damaged / "config.json").write_text("{}")

    folder = rm.ensure_reference_model("tiny-ref", tiny["cache"], corpus=tiny["corpus"])
    assert folder == damaged and (folder / "training.json").is_file()
    assert not stale_temp.exists()
    assert model_folders(tiny["cache"]) == [damaged.name]


def test_concurrent_callers_train_once(tiny: dict) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(rm.ensure_reference_model("tiny-ref", tiny["cache"], corpus=tiny["corpus"]))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 3
    assert len(tiny["calls"]) == 1


def test_a_caller_waits_while_another_holds_the_lock(tiny: dict) -> None:
    from filelock import FileLock

    key = rm.cache_key(TINY, tiny["corpus"], builtin_pack("eval"))
    parent = tiny["cache"] / rm.CACHE_SUBDIR
    parent.mkdir(parents=True)
    waiting = threading.Event()
    results: list[Path] = []

    def progress(message: str) -> None:
        if "another process is training it" in message:
            waiting.set()

    holder = FileLock(parent / f"tiny-ref-{key}.lock")
    holder.acquire()
    worker = threading.Thread(
        target=lambda: results.append(rm.ensure_reference_model("tiny-ref", tiny["cache"], corpus=tiny["corpus"], progress=progress))
    )
    worker.start()
    try:
        assert waiting.wait(timeout=60), "the second caller did not wait for the lock"
        assert tiny["calls"] == []  # nothing trained while the lock is held
    finally:
        holder.release()
    worker.join(timeout=120)
    assert len(results) == 1 and (results[0] / "training.json").is_file()


def test_training_is_byte_reproducible(tiny: dict, tmp_path: Path) -> None:
    digests = []
    for attempt in (1, 2):
        out = tmp_path / f"run{attempt}"
        rm.train_reference_model(TINY, out, corpus=tiny["corpus"])
        digests.append((file_sha256(out / "model.safetensors"), file_sha256(out / "tokenizer.json")))
    assert digests[0] == digests[1]


def test_too_little_training_text_is_a_model_error(tiny: dict, tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text('{"text": "def f(): pass"}\n')
    with pytest.raises(ModelError, match="too short"):
        rm.train_reference_model(TINY, tmp_path / "out", corpus=corpus)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-ref", "qwen2-ref"])
def test_real_reference_model_learns_far_below_uniform(name: str) -> None:
    """Trains (about a minute on 2 cores) into the default cache, or reuses it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = rm.ensure_reference_model(name)
    record = json.loads((folder / "training.json").read_text())
    assert record["steps"] == rm.REFERENCE_MODELS[name].steps
    # Uniform over 2048 tokens is ln(2048) = 7.62 nats; a real model must be far below it.
    assert record["final_loss"] < record["uniform_loss"] - 2.0
    assert record["eval_loss"] < record["uniform_loss"] - 2.0

    # The saved bf16 folder (not the in-memory fp32 model) predicts held-out text as well.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = rm.token_blocks(tokenizer, [doc.text for doc in read_text_documents(builtin_pack("eval"))], 128)
    with rm.torch_threads(1):
        loss = rm.mean_loss(model, blocks)  # the whole held-out pack
    assert loss < record["uniform_loss"] - 2.0


# ---------------------------------------------------------------------------------------------
# Issue 23.8: llama-ref ships, pinned, so the default artifact is the same bytes on every machine


def test_llama_ref_is_the_shipped_folder_and_is_never_trained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("llama-ref ships with trtconv: it must not be trained")

    monkeypatch.setattr(rm, "train_reference_model", no_training)
    folder = rm.ensure_reference_model("llama-ref", tmp_path / "cache")
    assert folder == rm.SHIPPED_DIR / "llama-ref"
    assert {p.name: file_sha256(p) for p in folder.iterdir()} == rm.SHIPPED_MODELS["llama-ref"]
    assert not (tmp_path / "cache" / rm.CACHE_SUBDIR).exists() or model_folders(tmp_path / "cache") == []


def test_shipped_model_was_trained_from_this_spec_and_corpus() -> None:
    """Edit the spec or the corpus and this fails: regenerate with scripts/train_reference_models.py --ship."""
    record = json.loads((rm.SHIPPED_DIR / "llama-ref" / rm.TRAINING_RECORD).read_text())
    assert record["spec"] == rm.REFERENCE_MODELS["llama-ref"].to_json()
    assert record["corpus_sha256"] == file_sha256(builtin_pack("reference-train"))
    assert record["eval_pack_sha256"] == file_sha256(builtin_pack("eval"))
    assert record["final_loss"] < 0.8 * record["uniform_loss"]  # trained, not random


@pytest.mark.parametrize("damage", ["flip", "remove", "extra"])
def test_a_damaged_shipped_model_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, damage: str) -> None:
    import shutil

    shipped = tmp_path / "reference"
    shutil.copytree(rm.SHIPPED_DIR / "llama-ref", shipped / "llama-ref")
    monkeypatch.setattr(rm, "SHIPPED_DIR", shipped)
    target = shipped / "llama-ref" / "config.json"
    if damage == "flip":
        target.write_bytes(target.read_bytes().replace(b"silu", b"gelu"))
        match = r"config\.json has sha256 [0-9a-f]{64}, not the pinned 45debb88"
    elif damage == "remove":
        target.unlink()
        match = r"config\.json is missing: the reference model shipped with trtconv is damaged; reinstall trtconv"
    else:
        (shipped / "llama-ref" / "special_tokens_map.json").write_text("{}")
        match = r"holds special_tokens_map\.json, not part of the shipped reference model llama-ref \(allowed: config\.json"
    with pytest.raises(ModelError, match=match):
        rm.ensure_reference_model("llama-ref", tmp_path / "cache")


def test_the_package_data_ships_every_pinned_file() -> None:
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["trtconv.data"]
    for name, pins in rm.SHIPPED_MODELS.items():
        for file in pins:
            assert any(fnmatch.fnmatch(f"reference/{name}/{file}", p) for p in patterns), file
