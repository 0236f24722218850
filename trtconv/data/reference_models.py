"""Small *trained* reference models, made on first use and cached, for accuracy checks on CPU.

A random-init model has near-uniform logits, so top-1 agreement between an original and a
quantized copy is noise (0.52-0.77 even for FP8; modelopt-notes §0.9). A few hundred CPU
training steps on real text give peaked, stable logits. Two models cover the export paths we care
about: ``llama-ref`` (GQA, untied lm_head, Llama-3 rope scaling, so a dropped rotary setting in
an export changes the logits) and ``qwen2-ref`` (qkv bias).

Both train from ``calibration_data/reference-train.jsonl`` (committed) with a byte-level BPE
tokenizer trained on the same text. Training is seeded, single-process CPU, at a fixed thread
count, so the same code, corpus and package versions give byte-identical ``model.safetensors``.

The cache folder is ``<cache>/reference-models/<name>-<key>``, where ``<cache>`` is the
``cache_dir`` argument, else ``$TRTCONV_CACHE``, else ``platformdirs.user_cache_dir("trtconv")``.
The key hashes the source of the training functions, the spec, the corpus and evaluation
pack sha256 and the torch/transformers/tokenizers versions: anything that could change the bytes.
Training runs under a file lock into a temporary sibling that is renamed into place when
complete, so an interrupted run never leaves a folder that looks complete, and two processes
asking at once train only once.

``llama-ref``, the default recipe's model, ships with trtconv (``trtconv/data/reference/llama-ref``,
7 MB) with every file's sha256 pinned in ``SHIPPED_MODELS``: seeded single-thread training is
reproducible on one machine, but the bytes depend on the CPU's float kernels (the default recipe
gave digest 3d11f241... on one host and 133ab2df... on another), so a model trained per machine made
the default artifact per machine too. ``ensure_reference_model`` returns the shipped folder after
checking the pins, and trains only models that are not shipped (``qwen2-ref``, kept out to stay
under 10 MB of binary) or when given another corpus. ``scripts/train_reference_models.py --ship``
regenerates the shipped folder and prints the pins after a change to the training code or corpus
(tests/unit/test_reference_models.py checks the shipped record against the spec and corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtconv.data.packs import builtin_pack, file_sha256, read_text_documents
from trtconv.core.errors import ModelError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

EOS_TOKEN = "<|endoftext|>"
CACHE_ENV_VAR = "TRTCONV_CACHE"
CACHE_SUBDIR = "reference-models"
TRAINING_RECORD = "training.json"
# Steps averaged for the reported final loss: one step's loss is noisy (one batch).
FINAL_LOSS_WINDOW = 20

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
QWEN2_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}


@dataclass(frozen=True)
class ReferenceModelSpec:
    """Architecture and training recipe of one reference model (all of it goes into the cache key)."""

    name: str
    model_type: str  # transformers model_type: "llama" or "qwen2"
    architecture: str
    # Linear input dims (hidden, intermediate) are multiples of 128 so AWQ group 128 applies everywhere.
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 2048
    # Training. Chosen to finish in about 90 s on one CPU thread with a loss far below uniform.
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    # Fixed so the float reduction order, hence the bytes, cannot depend on the machine's core count.
    # One thread: with two, a second busy process on a 2-core machine made training 13x slower
    # (OpenMP threads spin-waiting for each other: 251 s vs 19 s for 40 steps), and 1 and 2
    # threads gave byte-identical weights here anyway.
    threads: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REFERENCE_MODELS: dict[str, ReferenceModelSpec] = {
    "llama-ref": ReferenceModelSpec(
        name="llama-ref",
        model_type="llama",
        architecture="LlamaForCausalLM",
        rope_parameters=LLAMA3_ROPE,
    ),
    "qwen2-ref": ReferenceModelSpec(
        name="qwen2-ref",
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        rope_parameters=QWEN2_ROPE,
    ),
}


# --------------------------------------------------------------------------------------------
# Cache location and key


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("trtconv"))


def package_versions() -> dict[str, str | None]:
    """From the installed distributions' metadata (the same strings as the modules' __version__):
    finding a trained model must not import transformers (seconds), or a whole-run cache hit would."""
    from trtconv.core.environment import package_version

    return {name: package_version(name) for name in ("torch", "transformers", "tokenizers")}


def training_code_sha256() -> str:
    """sha256 of the source of the functions that produce the trained bytes.

    Only the training code is hashed, not this whole module, so an edit to the cache or lock
    handling does not make every machine retrain. A new helper that affects the bytes must be
    added to ``_TRAINING_CODE``.
    """
    import inspect

    digest = hashlib.sha256(f"{EOS_TOKEN}\0{FINAL_LOSS_WINDOW}\0".encode())
    for function in _TRAINING_CODE:
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


def cache_key(spec: ReferenceModelSpec, corpus: Path, eval_pack: Path) -> str:
    """16 hex chars of sha256 over everything that can change the trained bytes."""
    material = {
        "training_code_sha256": training_code_sha256(),
        "spec": spec.to_json(),
        "corpus_sha256": file_sha256(corpus),
        "eval_pack_sha256": file_sha256(eval_pack),
        "versions": package_versions(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def get_spec(name: str) -> ReferenceModelSpec:
    if name not in REFERENCE_MODELS:
        known = ", ".join(sorted(REFERENCE_MODELS))
        raise ModelError(f"Unknown reference model {name!r}; known reference models: {known}.")
    return REFERENCE_MODELS[name]


# --------------------------------------------------------------------------------------------
# Training pieces


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (any byte sequence encodes) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def token_blocks(tokenizer, texts: list[str], seq_len: int):
    """Documents joined by EOS into one stream, cut into [n_blocks, seq_len] (the tail dropped)."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise ModelError(f"The training text is too short: {len(stream)} tokens, fewer than one block of {seq_len}.")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def model_config(spec: ReferenceModelSpec, tokenizer):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=dict(spec.rope_parameters),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def learning_rate_at(step: int, spec: ReferenceModelSpec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def mean_loss(model, blocks) -> float:
    import torch

    with torch.no_grad():
        losses = [model(input_ids=blocks[i : i + 8], labels=blocks[i : i + 8]).loss.item() for i in range(0, len(blocks), 8)]
    return sum(losses) / len(losses)


def run_training(model, blocks, spec: ReferenceModelSpec, progress: Progress) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    losses = []
    model.train()
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, spec)
        batch = blocks[torch.randint(len(blocks), (spec.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 5))
        if step % 50 == 0 or step == spec.steps - 1:
            progress(f"{spec.name}: step {step + 1}/{spec.steps}, loss {loss.item():.3f}")
    model.eval()
    return losses


def train_reference_model(
    spec: ReferenceModelSpec,
    out_dir: Path,
    *,
    corpus: Path | None = None,
    eval_pack: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train ``spec`` from scratch and save a normal HF folder (bf16) plus ``training.json`` into ``out_dir``.

    Writes into ``out_dir`` directly; ``ensure_reference_model`` is the atomic, cached entry point.
    Returns the training record.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    report = _reporter(progress)
    corpus = Path(corpus) if corpus else builtin_pack("reference-train")
    eval_pack = Path(eval_pack) if eval_pack else builtin_pack("eval")
    started = time.perf_counter()
    with torch_threads(spec.threads):
        texts = [doc.text for doc in read_text_documents(corpus)]
        report(f"{spec.name}: training a {spec.vocab_size}-token BPE tokenizer on {len(texts)} documents")
        tokenizer = train_tokenizer(texts, spec.vocab_size)
        blocks = token_blocks(tokenizer, texts, spec.seq_len)
        eval_blocks = token_blocks(tokenizer, [doc.text for doc in read_text_documents(eval_pack)], spec.seq_len)[:32]
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer), dtype=torch.float32)
        report(f"{spec.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {len(blocks)} blocks of {spec.seq_len} tokens")
        losses = run_training(model, blocks, spec, report)
        eval_loss = mean_loss(model, eval_blocks)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = _training_record(spec, losses, eval_loss, len(tokenizer), blocks, corpus, eval_pack, time.perf_counter() - started)
    (out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    report(f"{spec.name}: done in {record['wall_time_s']:.0f} s, final loss {record['final_loss']:.3f}, eval loss {eval_loss:.3f}")
    return record


def _training_record(spec, losses, eval_loss, vocab, blocks, corpus, eval_pack, wall_time) -> dict[str, Any]:
    window = losses[-FINAL_LOSS_WINDOW:]
    return {
        "name": spec.name,
        "spec": spec.to_json(),
        "steps": spec.steps,
        "seed": spec.seed,
        "threads": spec.threads,
        "tokens_per_step": spec.batch_size * spec.seq_len,
        "train_blocks": len(blocks),
        "losses": losses,
        "final_loss": round(sum(window) / len(window), 5),
        "eval_loss": round(eval_loss, 5),
        "uniform_loss": round(math.log(vocab), 5),
        "corpus": corpus.name,
        "corpus_sha256": file_sha256(corpus),
        "eval_pack": eval_pack.name,
        "eval_pack_sha256": file_sha256(eval_pack),
        "versions": package_versions(),
        "wall_time_s": round(wall_time, 2),
    }


# Everything that decides the bytes of a trained folder (see training_code_sha256).
_TRAINING_CODE = (
    train_tokenizer, token_blocks, model_config, learning_rate_at, torch_threads, mean_loss, run_training,
    train_reference_model, _training_record,
)


def _reporter(progress: Progress | None) -> Progress:
    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    return report


# --------------------------------------------------------------------------------------------
# Shipped weights: the same bytes on every machine

SHIPPED_DIR = Path(__file__).resolve().parent / "reference"
# Every file of each shipped folder with its sha256 (scripts/train_reference_models.py --ship prints
# these). Trained on a 2-core AMD EPYC (x86-64) host with torch 2.13.0+cpu, transformers 5.14.1, tokenizers 0.22.2.
SHIPPED_MODELS: dict[str, dict[str, str]] = {
    "llama-ref": {
        "config.json": "45debb88800a6adbc4fbad1a8854162e866370ad8679c7edc3bd7172796d737d",
        "generation_config.json": "c33c192c3447ef9e3280a009bff83594244f9f621b2378aa730b6b8daabec828",
        "model.safetensors": "66d6cfa26eb463054c210249307ba903005fa9f4e8290252554a5a7b2f415ef9",
        "tokenizer.json": "13db2f081e30981db78a596f8e42ef9e7789910773651bd3ce0b25df2e41714c",
        "tokenizer_config.json": "de578ae5e85861e5081eeb2b7eb94fa3f81b5db1d1d0d463bc330acca51de4dc",
        "training.json": "5b6bb1b2132595577258a6860fa2c0c7c3fb152aee71471ae09a63c20f991d54",
    },
}


def shipped_reference_model(name: str) -> Path:
    """The folder of a shipped reference model, after checking every file against its pinned sha256
    (7 MB: milliseconds). A missing, changed or extra file is an error: the install is damaged."""
    folder = SHIPPED_DIR / name
    pins = SHIPPED_MODELS[name]
    try:
        present = {p.name for p in folder.iterdir()}
    except OSError:
        present = set()
    for file, pinned in sorted(pins.items()):
        found = file_sha256(folder / file) if file in present else None
        if found != pinned:
            state = "is missing" if found is None else f"has sha256 {found}, not the pinned {pinned}"
            raise ModelError(f"{folder / file} {state}: the reference model shipped with trtconv is damaged; "
                             "reinstall trtconv (pip install --force-reinstall trtconv)")
    extra = sorted(present - set(pins))
    if extra:
        raise ModelError(f"{folder} holds {', '.join(extra)}, not part of the shipped reference model {name} "
                         f"(allowed: {', '.join(sorted(pins))}); remove it or reinstall trtconv")
    return folder


# --------------------------------------------------------------------------------------------
# Cached, atomic, locked entry point


def ensure_reference_model(
    name: str,
    cache_dir: Path | None = None,
    *,
    corpus: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The folder of reference model ``name``: the shipped one (verified) where trtconv ships it,
    else trained into the cache on first use.

    ``cache_dir`` is the cache root (default ``$TRTCONV_CACHE`` or the platform cache dir);
    ``corpus`` replaces the committed training text (tests use a small one): it always trains.
    """
    from filelock import FileLock, Timeout

    spec = get_spec(name)
    if corpus is None and name in SHIPPED_MODELS:
        return shipped_reference_model(name)
    corpus = Path(corpus) if corpus else builtin_pack("reference-train")
    eval_pack = builtin_pack("eval")
    parent = Path(cache_dir) if cache_dir else default_cache_dir()
    parent = parent / CACHE_SUBDIR
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(
            f"Cannot create the reference-model cache {parent} ({err.strerror}); "
            f"set {CACHE_ENV_VAR} to a writable folder."
        ) from None
    folder_name = f"{name}-{cache_key(spec, corpus, eval_pack)}"
    final = parent / folder_name
    if _is_complete(final):
        return final
    report = _reporter(progress)
    lock = FileLock(parent / f"{folder_name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report(f"{name}: another process is training it; waiting for {lock.lock_file}")
        lock.acquire()
    try:
        if _is_complete(final):  # trained by the process we waited for
            return final
        _remove_leftovers(parent, folder_name, final)
        temp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder_name}.tmp-"))
        try:
            report(f"{name}: not in the cache; training it into {final} (about 90 s on one CPU thread)")
            train_reference_model(spec, temp, corpus=corpus, eval_pack=eval_pack, progress=progress)
            _make_readable(temp)
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return final
    finally:
        lock.release()


def _make_readable(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; a shared cache must be readable by all."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _is_complete(folder: Path) -> bool:
    # The folder only ever appears by an atomic rename after training.json was written, so both
    # checks together mean a finished training (unless someone edited the cache by hand).
    return (folder / TRAINING_RECORD).is_file() and (folder / "model.safetensors").is_file()


def _remove_leftovers(parent: Path, folder_name: str, final: Path) -> None:
    """Temp folders of killed trainings, and a final folder someone damaged. Only called under the lock."""
    for leftover in parent.glob(f".{folder_name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():
        logger.warning("%s is incomplete (no %s or model.safetensors); training it again", final, TRAINING_RECORD)
        shutil.rmtree(final)
