"""Write calibration_data/eval-cloze.jsonl: a 4-way continuation task from the held-out eval pack.

For each document of calibration_data/eval.jsonl (in file order):

- question = the text up to the word boundary (a space after a non-space) nearest 60% of its
  length, searched in 45%..75%: a mid-line cut, so the first words of the answer depend on the
  question (measured: a cut at a line end left llama-ref at chance, 28%);
- the true continuation = the next 48..100 characters, cut at the last line end in that window
  (else the last space), trailing whitespace stripped. Shorter than the 100..200 first planned:
  summed log-probabilities of 100..200 unrelated characters differ by tens of nats on their own,
  swamping the few nats the question adds (measured: 28% at 100..200, 33% at 48..100);
- 3 distractors = pieces of *other* eval documents, each starting after a space, cut at the
  boundary nearest the true continuation's length (within 15%: summed log-probabilities favour
  short choices); of 24 candidates the 3 whose character-trigram log-likelihood (trigrams of
  reference-train.jsonl) is closest to the truth's are kept, so the choices are about as
  predictable on their own and the question decides;
- the 4 choices shuffled with the seed; answer = the true one's index.

Deterministic: one ``random.Random(seed)`` drives every choice; records are written with sorted
keys (UTF-8, ``\\n``). The eval pack is the reference models' held-out text, so the task is too.

    .venv/bin/python scripts/make_cloze_task.py [--seed 20261127] [-o calibration_data/eval-cloze.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

from trtconv.data.packs import builtin_pack, read_text_documents, write_atomically

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "calibration_data" / "eval-cloze.jsonl"
DEFAULT_SEED = 20261127
QUESTION_FRACTION = 0.6
QUESTION_WINDOW = (0.45, 0.75)
CONTINUATION_CHARS = (48, 100)
MIN_CONTINUATION = 40
N_DISTRACTORS = 3
N_CANDIDATES = 24  # other documents a piece is drawn from; the 3 closest in trigram likelihood are kept
LENGTH_SLACK = 0.15  # how far (fraction of the true length) a distractor's cut may move to reach a boundary


def question_cut(text: str) -> int | None:
    """Index just after the line end (else space) nearest 60% of the text, inside the window."""
    target = int(len(text) * QUESTION_FRACTION)
    low, high = (int(len(text) * f) for f in QUESTION_WINDOW)
    for sep in (" ",):
        ends = [i + 1 for i, ch in enumerate(text) if ch == sep and i > 0 and not text[i - 1].isspace() and low <= i + 1 <= high]
        if ends:
            return min(ends, key=lambda i: (abs(i - target), i))
    return None


def continuation_end(text: str, start: int) -> int:
    """End of the true continuation: last line end (else space) in the 100..200 char window."""
    low, high = start + CONTINUATION_CHARS[0], start + CONTINUATION_CHARS[1]
    if len(text) <= high:
        return len(text)
    window = text[low:high]
    for sep in ("\n", " "):
        pos = window.rfind(sep)
        if pos >= 0:
            return low + pos
    return high


def distractor(text: str, length: int, at_line_start: bool, rng: random.Random) -> str | None:
    """A piece of ``text`` of about ``length`` chars, starting where the true continuation did."""
    sep = "\n" if at_line_start else " "
    starts = [0] if at_line_start else []
    starts += [i + 1 for i, ch in enumerate(text) if ch == sep and (at_line_start or (i > 0 and not text[i - 1].isspace()))]
    starts = [s for s in starts if len(text) - s >= length and text[s:].strip()]
    if not starts:
        return None
    start = rng.choice(starts)
    slack = int(length * LENGTH_SLACK)
    ends = [start + length] if start + length == len(text) else []
    ends += [i for i in range(start + length - slack, min(len(text), start + length + slack + 1)) if text[i] in " \n"]
    if not ends:
        return None
    end = min(ends, key=lambda i: (abs(i - start - length), i))
    piece = text[start:end].rstrip()
    return piece if len(piece.strip()) >= MIN_CONTINUATION // 2 else None


class CharTrigrams:
    """Character trigram model (add-one smoothing) of the reference models' training text.

    Used only to pick distractors: a choice's summed log-probability is dominated by how
    predictable its text is on its own (tens of nats between two random pieces of code), which
    would swamp the few nats the question contributes. Distractors as predictable as the truth
    under a model that ignores the question leave the question to decide.
    """

    def __init__(self, texts: list[str]) -> None:
        self.tri: Counter[str] = Counter()
        self.bi: Counter[str] = Counter()
        for text in texts:
            self.tri.update(text[i : i + 3] for i in range(len(text) - 2))
            self.bi.update(text[i : i + 2] for i in range(len(text) - 1))
        self.vocab = len({ch for text in texts for ch in text}) + 1

    def loglik(self, text: str) -> float:
        return sum(
            math.log((self.tri[text[i : i + 3]] + 1) / (self.bi[text[i : i + 2]] + self.vocab)) for i in range(len(text) - 2)
        )


def make_item(doc, others: list, rng: random.Random, trigrams: CharTrigrams) -> dict | None:
    cut = question_cut(doc.text)
    if cut is None:
        return None
    question = doc.text[:cut]
    truth = doc.text[cut : continuation_end(doc.text, cut)].rstrip()
    if len(truth.strip()) < MIN_CONTINUATION:
        return None
    at_line_start = question.endswith("\n")
    pool: list[str] = []
    for other in rng.sample(others, N_CANDIDATES):
        piece = distractor(other.text, len(truth), at_line_start, rng)
        if piece is not None and piece != truth and piece not in pool:
            pool.append(piece)
    if len(pool) < N_DISTRACTORS:
        return None
    target = trigrams.loglik(truth)
    choices = [truth] + sorted(pool, key=lambda piece: (abs(trigrams.loglik(piece) - target), piece))[:N_DISTRACTORS]
    rng.shuffle(choices)
    return {"id": f"cloze:{doc.id}", "question": question, "choices": choices, "answer": choices.index(truth)}


def build(seed: int) -> tuple[bytes, int, int]:
    docs = read_text_documents(builtin_pack("eval"))
    trigrams = CharTrigrams([doc.text for doc in read_text_documents(builtin_pack("reference-train"))])
    rng = random.Random(seed)
    lines, skipped = [], 0
    for doc in docs:
        item = make_item(doc, [d for d in docs if d.id != doc.id], rng, trigrams)
        if item is None:
            skipped += 1
            continue
        lines.append(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
    return "".join(lines).encode("utf-8"), len(lines), skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    data, n_items, skipped = build(args.seed)
    write_atomically(args.output, data)
    print(
        f"wrote {args.output}: {n_items} items ({skipped} documents skipped), {len(data)} bytes, "
        f"sha256 {hashlib.sha256(data).hexdigest()}"
    )


if __name__ == "__main__":
    main()
