"""The built-in data is a mix: calibration takes equal seeded shares, evaluation gates every pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trtconv.data import samples
from trtconv.data.packs import BUILTIN_MIXES
from trtconv.gate import stats
from trtconv.recipe.schema import EvaluateSection


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.factories import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def pack(tmp_path: Path, name: str, word: str, n: int = 30) -> samples.Pack:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": f"{name}:{i}", "text": f"{word} {i} " * 12}) + "\n" for i in range(n)))
    return samples.Pack(name, path)


def test_calibration_takes_equal_interleaved_shares_deterministically(tmp_path, tokenizer):
    packs = [pack(tmp_path, "a", "alpha"), pack(tmp_path, "b", "beta"), pack(tmp_path, "c", "gamma")]
    rows = samples.calibration_rows(packs, tokenizer, 7, 16, seed=3)
    assert [p["rows"] for p in rows.extra["packs"]] == [3, 2, 2]
    first = [tokenizer.decode(r[:4]) for r in rows.rows[:3]]  # one row of each pack, in pack order
    assert "alpha" in first[0] and "beta" in first[1] and "gamma" in first[2]
    again = samples.calibration_rows(packs, tokenizer, 7, 16, seed=3)
    assert again.rows == rows.rows and again.data_sha256 == rows.data_sha256
    assert samples.calibration_rows(packs, tokenizer, 7, 16, seed=4).rows != rows.rows


def test_one_pack_is_read_exactly_as_before(tmp_path, tokenizer):
    only = pack(tmp_path, "a", "alpha")
    from trtconv.data.packs import pack_sha256

    rows = samples.calibration_rows(only.path, tokenizer, 4, 16, seed=3)
    assert "packs" not in rows.extra and rows.data_sha256 == pack_sha256(only.path)


def test_evaluation_rows_are_kept_per_pack_and_every_pack_is_gated(tmp_path, tokenizer):
    packs = [pack(tmp_path, "a", "alpha"), pack(tmp_path, "b", "beta")]
    tokens = samples.evaluation_rows(packs, tokenizer, 6, 32, seed=0)
    assert [(p["name"], p["first_row"], p["rows"]) for p in tokens.extra["packs"]] == [("a", 0, 3), ("b", 3, 3)]
    n = np.full(6, 10.0)
    kl = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # pack b is damaged, pack a is not
    doc = stats.DocumentStats(n, n * 2, n * 2 + kl, kl, n.copy())
    summary = stats.summarize(doc, 0, packs=tokens.extra["packs"])
    assert summary["packs"]["a"]["mean_kl"]["value"] == 0 and summary["packs"]["b"]["mean_kl"]["value"] == pytest.approx(0.1)
    gates = {g.metric: g.verdict for g in stats.apply_gates(summary, EvaluateSection(gates={"max_kl": 0.05}))}
    assert gates == {"max_kl[a]": "pass", "max_kl[b]": "fail"}


def test_builtin_mixes_are_docstrings_prose_and_code():
    assert BUILTIN_MIXES == {"calibration": ("calib", "calib-prose", "calib-code"),
                             "evaluation": ("eval", "eval-prose", "eval-code")}
    assert [p.path.name for p in samples.builtin_packs("evaluation")] == ["eval.jsonl", "eval-prose.jsonl", "eval-code.jsonl"]


def test_validation_rows_are_the_evaluation_packs_other_documents(tmp_path, tokenizer):
    """precision auto measures its trials on documents of the evaluation packs that the gate does not use: the ones
    after the gate's share in the same seeded order (tune on validation, judge on test), per pack."""
    packs = [pack(tmp_path, "a", "alpha"), pack(tmp_path, "b", "beta")]
    gate = samples.evaluation_rows(packs, tokenizer, 10, 32, seed=5)
    val = samples.validation_rows(packs, tokenizer, 8, 32, seed=5, after=10)
    assert not set(val.doc_ids) & set(gate.doc_ids) and len(set(val.doc_ids)) == 8
    assert [p["rows"] for p in val.extra["packs"]] == [4, 4] and [p["first_row"] for p in val.extra["packs"]] == [0, 4]
    assert all(d.startswith("a:") for d in val.doc_ids[:4]) and all(d.startswith("b:") for d in val.doc_ids[4:])
    longer = samples.evaluation_rows(packs, tokenizer, 18, 32, seed=5)  # the same order continued
    assert set(val.doc_ids) == set(longer.doc_ids) - set(gate.doc_ids)
    assert samples.validation_rows(packs, tokenizer, 8, 32, seed=5, after=10).rows == val.rows
    with pytest.raises(samples.DataError, match="asks for 35"):  # 5 for the gate + 30 beyond it, of a pack's 30 documents
        samples.validation_rows(packs, tokenizer, 60, 32, seed=5, after=10)
