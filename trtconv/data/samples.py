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

from trtconv.data.packs import pack_sha256, read_text_documents
from trtconv.core.errors import DataError

# Evaluation documents shorter than this give too few next-token predictions to be worth a row.
MIN_EVAL_TOKENS = 16


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


def _load_documents(path: Path, role: str):
    docs = read_text_documents(path)
    if not docs:
        raise DataError(f"{role} data {path} holds no text documents")
    return docs


def _seeded_order(n: int, seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).permutation(n)


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_rows(path: Path, tokenizer, num_samples: int, seq_len: int, seed: int) -> TokenSet:
    docs = _load_documents(path, "calibration")
    need = num_samples * seq_len
    stream: list[int] = []
    used: list[str] = []
    for i in _seeded_order(len(docs), seed):
        doc = docs[int(i)]
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
        used.append(doc.id)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise DataError(
            f"calibration data {path} has {len(stream)} tokens in {len(docs)} documents; "
            f"calibration.num_samples x seq_len = {num_samples} x {seq_len} = {need} tokens are needed: "
            "add text, or lower num_samples or seq_len"
        )
    rows = [stream[k * seq_len : (k + 1) * seq_len] for k in range(num_samples)]
    by_id = {d.id: d for d in docs}
    return TokenSet(
        rows=rows,
        lengths=[seq_len] * num_samples,
        doc_ids=used,
        data_path=str(path),
        data_sha256=pack_sha256(path),
        seed=seed,
        extra={"document_sha256": [_text_sha(by_id[i].text) for i in used], "num_documents_available": len(docs)},
    )


def evaluation_rows(path: Path, tokenizer, num_samples: int, seq_len: int, seed: int) -> TokenSet:
    docs = _load_documents(path, "evaluation")
    rows, lengths, ids, shas = [], [], [], []
    for i in _seeded_order(len(docs), seed):
        doc = docs[int(i)]
        toks = tokenizer(doc.text, add_special_tokens=False)["input_ids"][:seq_len]
        if len(toks) < MIN_EVAL_TOKENS:
            continue
        lengths.append(len(toks))
        rows.append(toks + [tokenizer.eos_token_id] * (seq_len - len(toks)))
        ids.append(doc.id)
        shas.append(_text_sha(doc.text))
        if len(rows) == num_samples:
            break
    if len(rows) < num_samples:
        raise DataError(
            f"evaluation data {path} has {len(rows)} documents of at least {MIN_EVAL_TOKENS} tokens; "
            f"evaluate.num_samples asks for {num_samples}: lower it or add documents"
        )
    return TokenSet(
        rows=rows,
        lengths=lengths,
        doc_ids=ids,
        data_path=str(path),
        data_sha256=pack_sha256(path),
        seed=seed,
        extra={"document_sha256": shas, "num_documents_available": len(docs)},
    )


def check_disjoint(calib: TokenSet, evaluation: TokenSet) -> None:
    """Held-out means held out: no evaluation document may have been used for calibration."""
    overlap = set(calib.extra.get("document_sha256", [])) & set(evaluation.extra.get("document_sha256", []))
    if overlap:
        raise DataError(
            f"{len(overlap)} evaluation documents were also used for calibration "
            f"({calib.data_path} and {evaluation.data_path}); the accuracy gate needs held-out text"
        )
