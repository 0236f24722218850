"""Task accuracy on a local multiple-choice file: does quantization change what the model answers?

The perplexity/KL gates (trtconv/gate/stats.py) say how far the artifact's distribution moved; this
module says whether the *answers* moved, on a task the user picks, in the lm-eval-harness "acc"
style, fully offline.

File format (JSON Lines, one item per non-blank line, UTF-8)::

    {"id": "q1", "question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0}

``id`` unique non-empty string; ``question`` non-empty string; ``choices`` 2..10 distinct non-empty
strings; ``answer`` the index of the right choice. Any other key is an error (a typo such as
``"answers"`` must not be silently ignored).

Scoring rule (what a user would otherwise have to guess):

- Each choice is scored by the **sum of log-probabilities of its tokens given the question**;
  the prediction is the highest-scoring choice (ties go to the lowest index, so a model that
  cannot tell choices apart is not credited by luck of ordering any more than chance).
  Sums, not means: lm-eval's "acc", not "acc_norm"; long choices score lower, so a task file
  should keep its choices of similar length (the shipped eval-cloze.jsonl does).
- **Joining:** when the question does not end in whitespace and the choice does not start with
  whitespace, one space is put between them (lm-eval's default ``target_delimiter``); otherwise
  they are joined as they are.
- **Tokenizing:** as lm-eval's ``_encode_pair``: trailing whitespace of the question moves to the
  start of the choice (byte-level BPE merges a space into the *next* word, e.g. ``"Ġreturn"``), the
  joined text is tokenized once and the choice's tokens are those after the question's tokens, so
  the model sees the same tokens it would see in running text. Should the question's tokens not
  be a prefix of the joined text's tokens, the choice is tokenized on its own instead.
- The sequence starts with the tokenizer's BOS token (EOS where there is none: the reference
  models separate documents by EOS), as the model saw the start of a document in training.
- Longer than ``max_len`` tokens: the question is cut from the left (the most recent context
  stays); a choice that alone does not fit is an error naming the item.
- Accuracy intervals are paired percentile bootstraps over *items* (the same resampled items for
  baseline and candidate), with evaluate.py's resample count, confidence and conventions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trtconv.data.packs import _parse_json_line, _read_text_file
from trtconv.core.errors import DataError
from trtconv.gate.stats import CONFIDENCE, N_RESAMPLES, decide, paired_interval
from trtconv.artifact.manifest import GateResult
from trtconv.gate.gates import gates_from

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B,T] -> logits [B,T,V] (float)

MIN_CHOICES = 2
MAX_CHOICES = 10
FIELDS = ("id", "question", "choices", "answer")
TASK_GATE = gates_from("task")[0]  # max_task_accuracy_drop_pp (trtconv.gate.gates)
GATE_METRIC = TASK_GATE.key
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


# --------------------------------------------------------------------------------------------
# Reading a task file


def read_multiple_choice(path: str | Path) -> list[MCItem]:
    """Every item of a local JSONL task file; any bad line is a DataError naming line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Task file {path} does not exist (expected a .jsonl file of multiple-choice items).")
    items: list[MCItem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        item = _parse_item(path, number, _parse_json_line(path, number, line))
        if item.id in seen:
            raise DataError(
                f"{path}, line {number}: field 'id' is {item.id!r}, already used on line {seen[item.id]}; "
                "ids must be unique (baseline and candidate are paired by item)."
            )
        seen[item.id] = number
        items.append(item)
    if not items:
        raise DataError(f"Task file {path} holds no items; expected one JSON object per line with fields {', '.join(FIELDS)}.")
    return items


def _parse_item(path: Path, number: int, record: dict[str, Any]) -> MCItem:
    where = f"{path}, line {number}"
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; the allowed fields are: {', '.join(FIELDS)}.")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}; every item needs: {', '.join(FIELDS)}.")
    item_id = _non_empty_string(where, "id", record["id"])
    question = _non_empty_string(where, "question", record["question"])
    choices = _choices(where, record["choices"])
    return MCItem(id=item_id, question=question, choices=choices, answer=_answer(where, record["answer"], len(choices)))


def _non_empty_string(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = type(value).__name__ if not isinstance(value, str) else "an empty string"
        raise DataError(f"{where}: field {name!r} is {shown}; it must be a non-empty string.")
    return value


def _choices(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'choices' is a {type(value).__name__}; it must be a list of {MIN_CHOICES} to {MAX_CHOICES} strings.")
    if not MIN_CHOICES <= len(value) <= MAX_CHOICES:
        raise DataError(f"{where}: field 'choices' has {len(value)} entries; {MIN_CHOICES} to {MAX_CHOICES} are allowed.")
    for index, choice in enumerate(value):
        _non_empty_string(where, f"choices[{index}]", choice)
    if len(set(value)) < len(value):
        # Two identical choices get identical scores: the item could not be answered.
        raise DataError(f"{where}: field 'choices' repeats a choice; the choices must be distinct.")
    return tuple(value)


def _answer(where: str, value: Any, n_choices: int) -> int:
    # bool is an int in Python; `true` as an answer is a mistake, not index 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: field 'answer' is a {type(value).__name__}; it must be an integer index 0..{n_choices - 1}.")
    if not 0 <= value < n_choices:
        raise DataError(f"{where}: field 'answer' is {value}; with {n_choices} choices it must be 0..{n_choices - 1}.")
    return value


# --------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class _Row:
    """One (item, choice) pair as tokens: the choice's tokens are the last ``n_continuation``."""

    item: int
    choice: int
    tokens: list[int]
    n_continuation: int


def join_rule(question: str, choice: str) -> tuple[str, str]:
    """(context, continuation) texts: the space rule, then trailing whitespace moved to the choice."""
    if not question[-1:].isspace() and not choice[:1].isspace():
        choice = " " + choice
    context = question.rstrip()
    return context, question[len(context) :] + choice


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, question: str, choice: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one choice, by the rule in the module docstring."""
    context, continuation = join_rule(question, choice)
    context_ids = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids) :]
    return context_ids, _encode(tokenizer, continuation)


def _start_token(tokenizer) -> list[int]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if start is None else [int(start)]


def _rows(items: Sequence[MCItem], tokenizer, max_len: int) -> list[_Row]:
    start = _start_token(tokenizer)
    rows = []
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            context, continuation = encode_pair(tokenizer, item.question, choice)
            if not continuation or len(continuation) >= max_len:
                raise DataError(
                    f"Task item {item.id!r}, choice {c}: {len(continuation)} tokens; a choice needs 1 to "
                    f"{max_len - 1} tokens (max_len {max_len} leaves room for at least one context token)."
                )
            # Left truncation keeps the context nearest to the choice.
            tokens = (start + context + continuation)[-max_len:]
            rows.append(_Row(item=i, choice=c, tokens=tokens, n_continuation=len(continuation)))
    return rows


def _batch_loglikelihoods(batch: list[_Row], logits_fn: LogitsFn, device: str, pad_id: int) -> list[float]:
    width = max(len(row.tokens) for row in batch)
    # Right padding: a causal model's logits at real positions do not see the pad tokens after them.
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for j, row in enumerate(batch):
        ids[j, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
    logprobs = torch.log_softmax(logits_fn(ids.to(device)).float(), dim=-1).cpu()
    out = []
    for j, row in enumerate(batch):
        end = len(row.tokens)
        begin = end - row.n_continuation
        # logits at position t predict token t+1.
        target = ids[j, begin:end]
        out.append(logprobs[j, begin - 1 : end - 1].gather(-1, target[:, None]).sum().item())
    return out


def choice_loglikelihoods(
    items: Sequence[MCItem],
    tokenizer,
    logits_fn: LogitsFn,
    device: str,
    max_len: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[np.ndarray]:
    """Per item, the summed log-probability of each choice given the question (float64)."""
    rows = _rows(items, tokenizer, max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Batches of similar length waste less compute on padding; results go back by (item, choice).
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k].tokens))
    scores = [np.zeros(len(item.choices), dtype=np.float64) for item in items]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [rows[k] for k in order[start : start + batch_size]]
            for row, value in zip(batch, _batch_loglikelihoods(batch, logits_fn, device, pad_id)):
                scores[row.item][row.choice] = value
    return scores


def predictions(loglikelihoods: Sequence[np.ndarray]) -> np.ndarray:
    """Index of the highest-scoring choice per item (np.argmax: ties go to the lowest index)."""
    return np.asarray([int(np.argmax(scores)) for scores in loglikelihoods], dtype=np.int64)


def score_multiple_choice(
    items: Sequence[MCItem],
    tokenizer,
    logits_fn: LogitsFn,
    device: str,
    max_len: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Per item, whether the model's highest-likelihood choice is the right one (bool array).

    ``choice_loglikelihoods`` gives the scores behind it, for a report of which items changed.
    """
    if not items:
        raise DataError("No task items to score.")
    picked = predictions(choice_loglikelihoods(items, tokenizer, logits_fn, device, max_len, batch_size))
    return picked == np.asarray([item.answer for item in items], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Summary and gate


def _interval(samples: tuple[np.ndarray, ...], statistic: Callable[..., Any], seed: int) -> tuple[float | None, float | None]:
    interval = paired_interval(samples, statistic, seed, vectorized=True)
    return interval if interval is not None else (None, None)


def _metric(samples: tuple[np.ndarray, ...], statistic: Callable[..., Any], seed: int) -> dict:
    lo, hi = _interval(samples, statistic, seed)
    return {"value": float(statistic(*samples, axis=-1)), "ci_low": lo, "ci_high": hi}


# Statistics of (baseline, candidate) correctness arrays; `axis` lets scipy vectorize resamples.
def _acc_baseline(b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(b, axis=axis)


def _acc_candidate(b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(c, axis=axis)


def _difference_pp(b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    return (np.mean(c, axis=axis) - np.mean(b, axis=axis)) * 100.0


def _drop_pp(b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    return (np.mean(b, axis=axis) - np.mean(c, axis=axis)) * 100.0


def task_summary(correct_baseline: np.ndarray, correct_candidate: np.ndarray, seed: int) -> dict:
    """Accuracy of each model (fractions), their paired difference and drop (percentage points).

    Keys: ``accuracy_baseline``, ``accuracy_candidate`` (0..1), ``accuracy_difference_pp``
    (candidate - baseline) and ``accuracy_drop_pp`` (baseline - candidate, what the gate judges),
    each ``{"value", "ci_low", "ci_high"}`` as in evaluate.summarize; every interval resamples
    the same items for both models (same seed, same resamples).
    """
    b = np.asarray(correct_baseline, dtype=np.float64)
    c = np.asarray(correct_candidate, dtype=np.float64)
    if b.ndim != 1 or b.shape != c.shape:
        raise ValueError(f"paired correctness arrays must be 1-D and of one length; got {b.shape} and {c.shape}")
    if b.size == 0:
        raise ValueError("no task items: accuracy is undefined")
    samples = (b, c)
    out: dict[str, Any] = {"num_items": int(b.size)}
    for name, statistic in (
        ("accuracy_baseline", _acc_baseline),
        ("accuracy_candidate", _acc_candidate),
        ("accuracy_difference_pp", _difference_pp),
        ("accuracy_drop_pp", _drop_pp),
    ):
        out[name] = _metric(samples, statistic, seed)
    out["confidence_level"] = CONFIDENCE
    out["bootstrap_resamples"] = N_RESAMPLES
    return out


def task_gate(summary: dict, threshold_pp: float, allow_inconclusive: bool = False) -> GateResult:
    """``max_task_accuracy_drop_pp``: pass when the whole interval of the drop is <= threshold.

    Fails when the whole interval is above it, inconclusive otherwise (evaluate.decide's rule).
    """
    drop = summary[TASK_GATE.metric]
    verdict, reason = decide(drop, threshold_pp, TASK_GATE.comparator)
    if verdict == "inconclusive" and drop["ci_low"] is not None:
        # decide() advises more evaluation documents; here the sample is the task's items.
        reason = (
            f"the {CONFIDENCE:.0%} interval [{drop['ci_low']:.4g}, {drop['ci_high']:.4g}] of the accuracy drop (pp) "
            f"straddles {threshold_pp:g} (point estimate {drop['value']:.4g}): too few task items to decide; "
            "add items to the task file"
        )
    if verdict == "inconclusive" and allow_inconclusive:
        reason += " (allowed by evaluate.allow_inconclusive)"
    return GateResult(
        metric=GATE_METRIC,
        comparator=TASK_GATE.comparator,
        threshold=threshold_pp,
        value=drop["value"],
        ci_low=drop["ci_low"],
        ci_high=drop["ci_high"],
        verdict=verdict,
        reason=reason,
    )
