"""Token sequences for calibration and evaluation, picked deterministically from a seed.

Calibration packs documents (EOS-separated, in a seeded order) into rows of exactly seq_len tokens:
no padding, so every token a quantizer sees is real text. Evaluation keeps one document per row
(truncated to seq_len), so the gate can resample *documents* when it bootstraps its intervals.
Both record which documents were used (ids + sha256 of their text) for the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtconv.data.packs import MissingField, pack_sha256, read_text_documents
from trtconv.core.errors import DataError

# Evaluation documents shorter than this give too few next-token predictions to be worth a row.
MIN_EVAL_TOKENS = 16
# A generous upper bound on the characters one token covers. A document is cut to (tokens still
# needed + 1) x this many characters before it is tokenized: one 51 MB line of calibration text
# took 100 s and 8 GB to tokenize for the 1024 tokens it gave. Tokens before the cut are the
# same as the whole text's (the cut keeps a token more than needed), so the rows do not change.
MAX_CHARS_PER_TOKEN = 64
TOKENIZE_RULE = f"each document cut to (tokens still needed + 1) x {MAX_CHARS_PER_TOKEN} characters before tokenizing"


@dataclass
class TokenSet:
    """Rows of token ids (right-padded with pad_id where `lengths` < seq_len) and their provenance."""

    rows: list[list[int]]
    lengths: list[int]
    doc_ids: list[str]  # per row for evaluation; documents used, in order, for calibration
    data_path: str
    data_sha256: str
    seed: int
    extra: dict = field(default_factory=dict)

    def manifest_record(self) -> dict:
        return {
            "data": self.data_path,
            "data_sha256": self.data_sha256,
            "seed": self.seed,
            "num_rows": len(self.rows),
            "num_tokens": int(sum(self.lengths)),
            "document_ids": self.doc_ids,
            **self.extra,
        }


# The recipe key that names each role's data (what a message about that data points at).
DATA_KEYS = {"calibration": "calibration.data", "evaluation": "evaluate.data"}


def _load_documents(path: Path, role: str):
    try:
        docs = read_text_documents(path)
    except MissingField as exc:  # build has no --field: say what the recipe key reads and how to repack
        key = DATA_KEYS[role]
        raise exc.with_advice(
            f"{key} (the recipe key) reads the field 'text' of each line: rename the field, or repack the file with "
            f"`trtconv data pack {path} --field NAME -o pack.jsonl` and set {key} to the pack"
        ) from None
    if not docs:
        raise DataError(f"{role} data {path} holds no text documents")
    return docs


def _seeded_order(n: int, seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).permutation(n)


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Pack:
    """One pack of a data set: a short name (the file's stem) and where it is."""

    name: str
    path: Path


def as_packs(data: Path | str | list[Pack]) -> list[Pack]:
    """A pack list from one path (a file or folder is one pack) or an existing list."""
    if isinstance(data, (str, Path)):
        return [Pack(Path(data).stem, Path(data))]
    return list(data)


def builtin_packs(role: str) -> list[Pack]:
    """The built-in mix for 'calibration' or 'evaluation' (trtconv.data.packs.BUILTIN_MIXES)."""
    from trtconv.data.packs import BUILTIN_MIXES, builtin_pack

    return [Pack(name, builtin_pack(name)) for name in BUILTIN_MIXES[role]]


def packs_sha256(packs: list[Pack]) -> str:
    """sha256 of a pack set: one pack hashes exactly as the file (so one-file keys are unchanged);
    several hash their names and sha256s in order."""
    if len(packs) == 1:
        return pack_sha256(packs[0].path)
    digest = hashlib.sha256()
    for p in packs:
        digest.update(f"{p.name}\0{pack_sha256(p.path)}\n".encode())
    return digest.hexdigest()


def split_evenly(total: int, parts: int) -> list[int]:
    """total split into `parts` shares that differ by at most one, the larger ones first."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def _token_ids(tokenizer, text: str, tokens_needed: int) -> list[int]:
    """The token ids of text, reading only as much of it as `tokens_needed` tokens can cover."""
    return tokenizer(text[: (max(tokens_needed, 0) + 1) * MAX_CHARS_PER_TOKEN], add_special_tokens=False)["input_ids"]


def row_prefix(tokenizer) -> list[int]:
    """[bos] where the model's own tokenizer puts one before any text, else [].

    What a runtime feeds the model is the tokenizer's output, so every calibration and evaluation row
    starts as served text does. Without it a BOS-trained model runs out of its range: on Gemma 3 270M the
    same text's perplexity went from about 45 to 244 and FP8's KL against the original from 0.022 to 0.14
    (the gate judged a case serving never sees). Tokenizers that add none (Llama 3 base, Qwen, the
    reference models) are unchanged."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _pack_stream(pack: Pack, tokenizer, need: int, seed: int) -> tuple[list[int], list[str], list]:
    """EOS-separated token stream of a pack's documents in seeded order, stopping once `need` tokens are there."""
    docs = _load_documents(pack.path, "calibration")
    stream: list[int] = []
    used: list[str] = []
    for i in _seeded_order(len(docs), seed):
        doc = docs[int(i)]
        ids = _token_ids(tokenizer, doc.text, need - len(stream))
        if not ids:
            continue
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
        used.append(doc.id)
        if len(stream) >= need:
            break
    return stream, used, docs


def calibration_rows(data: Path | list[Pack], tokenizer, num_samples: int, seq_len: int, seed: int) -> TokenSet:
    """num_samples rows of seq_len tokens; with several packs each gives an equal share of rows
    (split_evenly), packed from its own documents in seeded order, and the rows are interleaved
    pack by pack so every calibration batch sees every kind of text."""
    packs = as_packs(data)
    prefix = row_prefix(tokenizer)
    body = seq_len - len(prefix)  # each row: the prefix, then the next `body` tokens of the packed stream
    per_pack, used, shas, records, available = [], [], [], [], 0
    for pack, quota in zip(packs, split_evenly(num_samples, len(packs))):
        need = quota * body
        stream, pack_used, docs = _pack_stream(pack, tokenizer, need, seed)
        if len(stream) < need:
            raise DataError(
                f"calibration data {pack.path} has {len(stream)} tokens in {len(docs)} documents; "
                f"calibration.num_samples x seq_len = {quota} x {seq_len} = {need} tokens are needed"
                + (f" from this pack (one of {len(packs)})" if len(packs) > 1 else "")
                + ": add text, or lower num_samples or seq_len"
            )
        per_pack.append([prefix + stream[k * body : (k + 1) * body] for k in range(quota)])
        by_id = {d.id: d for d in docs}
        used += pack_used
        shas += [_text_sha(by_id[i].text) for i in pack_used]
        available += len(docs)
        records.append({"name": pack.name, "data": str(pack.path), "data_sha256": pack_sha256(pack.path),
                        "rows": quota, "documents_used": len(pack_used)})
    rows = [chunk[k] for k in range(max(map(len, per_pack), default=0)) for chunk in per_pack if k < len(chunk)]
    extra = {"document_sha256": shas, "num_documents_available": available, "tokenize_rule": TOKENIZE_RULE,
             **_prefix_record(prefix)}
    if len(packs) > 1:
        extra["packs"] = records
    return TokenSet(
        rows=rows,
        lengths=[seq_len] * num_samples,
        doc_ids=used,
        data_path=", ".join(str(p.path) for p in packs),
        data_sha256=packs_sha256(packs),
        seed=seed,
        extra=extra,
    )


def _prefix_record(prefix: list[int]) -> dict:
    """The manifest's note of the row prefix; absent without one (so records made before it keep their bytes)."""
    return {"row_prefix": {"token_ids": prefix, "why": "the tokenizer starts every text with it (bos)"}} if prefix else {}


def _pack_eval_rows(pack: Pack, tokenizer, quota: int, seq_len: int, seed: int, of: int):
    docs = _load_documents(pack.path, "evaluation")
    prefix = row_prefix(tokenizer)  # a position that is never scored: the first prediction is of the text's first token
    rows, lengths, ids, shas = [], [], [], []
    for i in _seeded_order(len(docs), seed):
        doc = docs[int(i)]
        toks = prefix + _token_ids(tokenizer, doc.text, seq_len)[: seq_len - len(prefix)]
        if len(toks) < MIN_EVAL_TOKENS:
            continue
        lengths.append(len(toks))
        rows.append(toks + [tokenizer.eos_token_id] * (seq_len - len(toks)))
        ids.append(doc.id)
        shas.append(_text_sha(doc.text))
        if len(rows) == quota:
            break
    if len(rows) < quota:
        raise DataError(
            f"evaluation data {pack.path} has {len(rows)} documents of at least {MIN_EVAL_TOKENS} tokens; "
            f"evaluate.num_samples asks for {quota}"
            + (f" from this pack (an equal share of the total over {of} packs)" if of > 1 else "")
            + ": lower it or add documents"
        )
    return rows, lengths, ids, shas, len(docs)


def evaluation_rows(data: Path | list[Pack], tokenizer, num_samples: int, seq_len: int, seed: int) -> TokenSet:
    """One document per row; with several packs each gives an equal share of the rows, kept together
    in pack order (extra["packs"] says which rows are whose) so the gate can judge each pack."""
    packs = as_packs(data)
    rows, lengths, ids, shas, records, available = [], [], [], [], [], 0
    for pack, quota in zip(packs, split_evenly(num_samples, len(packs))):
        r, lens, i, sh, n_docs = _pack_eval_rows(pack, tokenizer, quota, seq_len, seed, len(packs))
        records.append({"name": pack.name, "data": str(pack.path), "data_sha256": pack_sha256(pack.path),
                        "first_row": len(rows), "rows": len(r)})
        rows += r
        lengths += lens
        ids += i
        shas += sh
        available += n_docs
    extra = {"document_sha256": shas, "num_documents_available": available, "tokenize_rule": TOKENIZE_RULE,
             **_prefix_record(row_prefix(tokenizer))}
    if len(packs) > 1:
        extra["packs"] = records
    return TokenSet(
        rows=rows,
        lengths=lengths,
        doc_ids=ids,
        data_path=", ".join(str(p.path) for p in packs),
        data_sha256=packs_sha256(packs),
        seed=seed,
        extra=extra,
    )


def validation_rows(data: Path | list[Pack], tokenizer, num_samples: int, seq_len: int, seed: int, after: int) -> TokenSet:
    """Evaluation-pack documents the gate does not use: in each pack, the documents that come after the
    evaluation's share (`after` = evaluate.num_samples) in the same seeded order, so they are disjoint from the
    gate's by construction and drawn from the same text. `quantization.precision: auto` tunes on them
    (tune on validation, judge on test). Packs with one pack's record each, as evaluation_rows gives them."""
    packs = as_packs(data)
    rows, lengths, ids, shas, records = [], [], [], [], []
    for pack, quota, skip in zip(packs, split_evenly(num_samples, len(packs)), split_evenly(after, len(packs))):
        r, lens, i, sh, _ = _pack_eval_rows(pack, tokenizer, skip + quota, seq_len, seed, len(packs))
        records.append({"name": pack.name, "data": str(pack.path), "data_sha256": pack_sha256(pack.path),
                        "first_row": len(rows), "rows": quota})
        rows, lengths, ids, shas = rows + r[skip:], lengths + lens[skip:], ids + i[skip:], shas + sh[skip:]
    extra = {"document_sha256": shas, "tokenize_rule": TOKENIZE_RULE, **_prefix_record(row_prefix(tokenizer))}
    if len(packs) > 1:
        extra["packs"] = records
    return TokenSet(rows=rows, lengths=lengths, doc_ids=ids, data_path=", ".join(str(p.path) for p in packs),
                    data_sha256=packs_sha256(packs), seed=seed, extra=extra)


def check_disjoint(calib: TokenSet, evaluation: TokenSet) -> None:
    """Held-out means held out: no evaluation document may have been used for calibration."""
    overlap = set(calib.extra.get("document_sha256", [])) & set(evaluation.extra.get("document_sha256", []))
    if overlap:
        raise DataError(
            f"{len(overlap)} evaluation documents were also used for calibration "
            f"({calib.data_path} and {evaluation.data_path}); the accuracy gate needs held-out text"
        )
