"""Task accuracy on a local multiple-choice file (trtconv/gate/tasks.py) and the shipped eval-cloze.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trtconv.gate import tasks
from trtconv.core.errors import DataError

REPO = Path(__file__).resolve().parents[2]
CLOZE = REPO / "calibration_data" / "eval-cloze.jsonl"
GOOD = {"id": "q1", "question": "Pick one", "choices": ["a", "b"], "answer": 1}


def _write(tmp_path: Path, *records, raw: str | None = None) -> Path:
    path = tmp_path / "task.jsonl"
    text = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- reading


def test_reads_items_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, raw=json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "q2", "answer": 0}) + "\n")
    items = tasks.read_multiple_choice(path)
    assert [i.id for i in items] == ["q1", "q2"]
    assert items[0].choices == ("a", "b") and items[0].answer == 1 and items[1].answer == 0


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({k: v for k, v in GOOD.items() if k != "answer"}, r"line 2: missing field 'answer'"),
        ({**GOOD, "answers": 1}, r"line 2: unknown field 'answers'; the allowed fields are: id, question, choices, answer"),
        ({**GOOD, "id": ""}, r"line 2: field 'id' is an empty string; it must be a non-empty string"),
        ({**GOOD, "question": 3}, r"line 2: field 'question' is int; it must be a non-empty string"),
        ({**GOOD, "choices": "ab"}, r"line 2: field 'choices' is a str; it must be a list of 2 to 10 strings"),
        ({**GOOD, "choices": ["a"], "answer": 0}, r"line 2: field 'choices' has 1 entries; 2 to 10 are allowed"),
        ({**GOOD, "choices": [str(i) for i in range(11)]}, r"field 'choices' has 11 entries; 2 to 10"),
        ({**GOOD, "choices": ["a", 2]}, r"line 2: field 'choices\[1\]' is int"),
        ({**GOOD, "choices": ["a", "a"]}, r"line 2: field 'choices' repeats a choice"),
        ({**GOOD, "answer": 2}, r"line 2: field 'answer' is 2; with 2 choices it must be 0..1"),
        ({**GOOD, "answer": -1}, r"field 'answer' is -1"),
        ({**GOOD, "answer": "1"}, r"line 2: field 'answer' is a str; it must be an integer index 0..1"),
        ({**GOOD, "answer": True}, r"field 'answer' is a bool"),
        ({**GOOD, "answer": 1.0}, r"field 'answer' is a float"),
        ({**GOOD, "id": "first"}, r"line 2: field 'id' is 'first', already used on line 1"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path: Path, record: dict, match: str) -> None:
    path = _write(tmp_path, {**GOOD, "id": "first"}, record)
    with pytest.raises(DataError, match=match) as err:
        tasks.read_multiple_choice(path)
    assert str(path) in str(err.value)


def test_not_json_and_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 1: not valid JSON"):
        tasks.read_multiple_choice(_write(tmp_path, raw="{oops\n"))
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, found a list"):
        tasks.read_multiple_choice(_write(tmp_path, raw="[1, 2]\n"))


def test_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no items"):
        tasks.read_multiple_choice(_write(tmp_path, raw="\n  \n"))
    with pytest.raises(DataError, match="does not exist"):
        tasks.read_multiple_choice(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------- scoring


class WordTokenizer:
    """Whitespace-aware toy tokenizer: each word (with its leading spaces) is one token."""

    bos_token_id = 1
    eos_token_id = 1
    pad_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        import re

        pieces = re.findall(r"\s*\S+|\s+$", text)
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab) + 2) for p in pieces]}


def _preferring(favourite: set[int], vocab_size: int = 64):
    """A fake causal model: every position gives the `favourite` tokens high logits."""

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, vocab_size)
        out[..., sorted(favourite)] = 5.0
        return out

    return logits_fn


def test_join_rule_space_and_trailing_whitespace() -> None:
    assert tasks.join_rule("The sky is", "blue") == ("The sky is", " blue")
    assert tasks.join_rule("The sky is ", "blue") == ("The sky is", " blue")
    assert tasks.join_rule("def f():\n", "    return 1") == ("def f():", "\n    return 1")
    assert tasks.join_rule("x =", " 1") == ("x =", " 1")


def test_scoring_picks_the_choice_the_model_prefers() -> None:
    tok = WordTokenizer()
    items = [
        tasks.MCItem("a", "The sky is", ("green", "blue", "red"), 1),
        tasks.MCItem("b", "Two plus two is", ("four", "five"), 0),
        tasks.MCItem("c", "Water is", ("dry", "wet"), 0),  # the model will pick "wet": wrong
    ]
    liked = {tok(" blue")["input_ids"][0], tok(" four")["input_ids"][0], tok(" wet")["input_ids"][0]}
    correct = tasks.score_multiple_choice(items, tok, _preferring(liked), "cpu", max_len=32, batch_size=2)
    assert correct.dtype == bool and correct.tolist() == [True, True, False]
    scores = tasks.choice_loglikelihoods(items, tok, _preferring(liked), "cpu", max_len=32)
    assert tasks.predictions(scores).tolist() == [1, 0, 1]
    # Sums of log-probs: the liked token gets log(e^5 / (3 e^5 + 61)) (3 liked tokens, 64 in all).
    expected = 5.0 - np.log(3 * np.exp(5.0) + 61)
    assert scores[0][1] == pytest.approx(expected, rel=1e-5)


def test_only_continuation_tokens_are_scored_and_padding_does_not_leak() -> None:
    """A model that records what it saw: each choice is scored at the right positions."""
    tok = WordTokenizer()
    long_q = "one two three four five six"
    items = [tasks.MCItem("x", long_q, ("seven", "eight nine"), 0), tasks.MCItem("y", "hi", ("there", "you"), 1)]
    seven, nine = tok(" seven")["input_ids"][0], tok(" nine")["input_ids"][0]

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        # Every position predicts its own next real token with certainty; padding rows predict junk.
        out = torch.full((*ids.shape, 64), -30.0)
        out[:, :-1].scatter_(-1, ids[:, 1:, None], 0.0)
        return out

    scores = tasks.choice_loglikelihoods(items, tok, logits_fn, "cpu", max_len=32, batch_size=4)
    # Every choice is certain under this "oracle of its own input": sums are ~0 for all.
    assert all(np.allclose(s, 0.0, atol=1e-6) for s in scores)
    assert seven != nine


def test_left_truncation_keeps_the_choice_and_too_long_choice_is_an_error() -> None:
    tok = WordTokenizer()
    item = tasks.MCItem("x", " ".join(f"w{i}" for i in range(50)), ("yes", "no"), 0)
    liked = {tok(" yes")["input_ids"][0]}
    assert tasks.score_multiple_choice([item], tok, _preferring(liked), "cpu", max_len=8).tolist() == [True]
    long_choice = tasks.MCItem("z", "q", (" ".join(["a"] * 10), "b"), 1)
    with pytest.raises(DataError, match=r"item 'z', choice 0: 10 tokens"):
        tasks.score_multiple_choice([long_choice], tok, _preferring(set()), "cpu", max_len=8)


# ---------------------------------------------------------------------------- summary and gate


def _arrays(n: int, acc_b: float, acc_c: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.random(n) < acc_b
    cand = base.copy()
    # Flip right answers to wrong (or the reverse) to reach the candidate's accuracy.
    diff = int(round((acc_b - acc_c) * n))
    idx = np.flatnonzero(base if diff > 0 else ~base)[: abs(diff)]
    cand[idx] = ~cand[idx]
    return base, cand


def test_summary_values_and_paired_interval() -> None:
    base, cand = _arrays(400, 0.7, 0.6)
    s = tasks.task_summary(base, cand, seed=1)
    assert s["num_items"] == 400
    assert s["accuracy_baseline"]["value"] == pytest.approx(base.mean())
    assert s["accuracy_candidate"]["value"] == pytest.approx(cand.mean())
    d = s["accuracy_difference_pp"]
    assert d["value"] == pytest.approx((cand.mean() - base.mean()) * 100)
    assert d["ci_low"] <= d["value"] <= d["ci_high"]
    drop = s["accuracy_drop_pp"]
    assert drop["value"] == pytest.approx(-d["value"]) and drop["ci_low"] == pytest.approx(-d["ci_high"])
    # Paired: only the changed items vary, so the interval is far narrower than two independent ones.
    acc = s["accuracy_baseline"]
    assert drop["ci_high"] - drop["ci_low"] < (acc["ci_high"] - acc["ci_low"]) * 100
    assert tasks.task_summary(base, cand, seed=1) == s  # seeded


def test_identical_answers_have_a_zero_width_interval_and_pass() -> None:
    base, _ = _arrays(100, 0.5, 0.5)
    s = tasks.task_summary(base, base, seed=0)
    assert (s["accuracy_drop_pp"]["ci_low"], s["accuracy_drop_pp"]["ci_high"]) == (0.0, 0.0)
    assert tasks.task_gate(s, 1.0).verdict == "pass"


@pytest.mark.parametrize(
    ("acc_c", "threshold", "verdict"),
    [(0.695, 2.0, "pass"), (0.50, 2.0, "fail"), (0.67, 3.0, "inconclusive")],
)
def test_gate_verdicts(acc_c: float, threshold: float, verdict: str) -> None:
    base, cand = _arrays(1000, 0.7, acc_c)
    result = tasks.task_gate(tasks.task_summary(base, cand, seed=3), threshold)
    assert result.verdict == verdict, result.reason
    assert result.metric == "max_task_accuracy_drop_pp" and result.comparator == "<="
    assert result.threshold == threshold and result.ci_low <= result.value <= result.ci_high
    if verdict == "inconclusive":
        assert "add items to the task file" in result.reason
        assert "allowed by" in tasks.task_gate(tasks.task_summary(base, cand, seed=3), threshold, True).reason


def test_summary_rejects_unpaired_arrays() -> None:
    with pytest.raises(ValueError, match="one length"):
        tasks.task_summary(np.ones(3, bool), np.ones(4, bool), seed=0)


# ---------------------------------------------------------------------------- the shipped task


def test_shipped_cloze_file_has_the_documented_shape() -> None:
    items = tasks.read_multiple_choice(CLOZE)
    assert 140 <= len(items) <= 160
    assert all(len(item.choices) == 4 for item in items)
    assert all(item.id.startswith("cloze:stdlib:") for item in items)
    # Shuffled: the right answer is not always in one place.
    positions = np.bincount([item.answer for item in items], minlength=4)
    assert positions.min() >= len(items) // 8
    for item in items:
        truth = item.choices[item.answer]
        assert 40 <= len(truth.strip()) <= 100
        # Lengths matched (cut within 15%, then trailing whitespace stripped), so summed
        # log-probs are not decided by length.
        assert all(0.6 * len(truth) <= len(choice) <= 1.15 * len(truth) for choice in item.choices)
    eval_text = {json.loads(line)["text"] for line in (REPO / "calibration_data" / "eval.jsonl").read_text().splitlines()}
    assert all(any(t.startswith(i.question + i.choices[i.answer]) for t in eval_text) for i in items[:20])


def test_shipped_cloze_file_is_recorded_in_provenance() -> None:
    import hashlib

    digest = hashlib.sha256(CLOZE.read_bytes()).hexdigest()
    assert digest in (REPO / "calibration_data" / "PROVENANCE.md").read_text()


@pytest.mark.slow
def test_reference_llama_beats_chance_on_the_cloze_task(llama_ref: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_ref, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_ref)
    items = tasks.read_multiple_choice(CLOZE)
    correct = tasks.score_multiple_choice(items, tokenizer, lambda ids: model(ids).logits, "cpu", max_len=128, batch_size=32)
    summary = tasks.task_summary(correct, correct, seed=1234)
    # Chance is 0.25 (4 choices); the whole interval must clear it.
    assert summary["accuracy_baseline"]["ci_low"] > 0.25, summary["accuracy_baseline"]
