#!/usr/bin/env python3
"""Build trtconv's committed text packs from the Python standard library (offline everywhere).

Writes three disjoint JSONL packs into ``calibration_data/`` (one object per line, fields
``id``, ``source``, ``text``; sorted keys, UTF-8, ``\\n`` line ends):

- ``reference-train.jsonl``: training text for the reference models (~1.5 MB);
- ``calib.jsonl``: the default calibration pack (400 documents);
- ``eval.jsonl``: the held-out evaluation pack (160 documents).

Documents are module and class docstrings (prose) and the source of top-level functions and
methods (code with their docstrings), which is what a code-and-docs LLM sees in practice.

**Why split by a hash of the top-level module name.** Evaluation must be held out from both
training and calibration. Documents of one module share identifiers, idioms and often
near-identical docstrings (``email.mime.text`` vs ``email.mime.image``), so splitting documents
at random would leak near-duplicates across packs and flatter every metric. Assigning a whole
top-level package (``email``, ``asyncio``, ...) to exactly one pack, by a stable hash of its name
(sha256, not Python's salted ``hash``), rules that out and keeps the assignment stable when the
stdlib gains or loses modules. Exact duplicate texts (after whitespace normalisation) are then
dropped globally, held-out packs first, so no text appears twice in any pack or across packs.

The stdlib differs between Python versions, so the committed files are the reference, not a
regeneration. ``PROVENANCE.md`` records the Python version, this script's sha256 and each file's
sha256, document count and size. Python's standard library is PSF-licensed.

Usage: ``python scripts/make_data_packs.py [--out calibration_data]``
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import platform
import re
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

# Packages that are tests, generated tables, demos or vendored data rather than library prose/code.
EXCLUDED_TOP_LEVEL = {
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings", "pydoc_data",
    "site-packages", "dist-packages", "__pycache__", "__phello__", "config-3", "venv", "tkinter",
    "distutils", "this", "antigravity",
}
MIN_CHARS = 200
MAX_CHARS = 2400
MAX_NON_ASCII_FRACTION = 0.01

# Bucket = sha256(top-level name) mod 100. Held-out and calibration buckets are smaller: they need
# far fewer documents, and every bucket still has much more material than its pack takes.
EVAL_BUCKETS = range(0, 15)
CALIB_BUCKETS = range(15, 35)

EVAL_DOCS = 160
CALIB_DOCS = 400
TRAIN_BYTES = 1_500_000


@dataclass(frozen=True)
class Doc:
    id: str
    source: str
    text: str


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def pack_of(top_level: str) -> str:
    bucket = stable_hash(top_level) % 100
    if bucket in EVAL_BUCKETS:
        return "eval"
    if bucket in CALIB_BUCKETS:
        return "calib"
    return "train"


def normalised(text: str) -> str:
    """Whitespace-insensitive form used for dedupe."""
    return re.sub(r"\s+", " ", text).strip()


def module_name(stdlib: Path, path: Path) -> str:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stdlib_modules(stdlib: Path) -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in EXCLUDED_TOP_LEVEL or rel.parts[0].startswith("config-"):
            continue
        if any(part in {"test", "tests", "__pycache__", "site-packages"} for part in rel.parts):
            continue
        modules.append((module_name(stdlib, path), path))
    return modules


def usable(text: str) -> bool:
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return False
    non_ascii = sum(1 for ch in text if ord(ch) > 127)
    return non_ascii <= MAX_NON_ASCII_FRACTION * len(text)


def function_nodes(tree: ast.Module):
    """Top-level functions and methods of top-level classes, with their qualified names."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def module_documents(stdlib: Path, name: str, path: Path) -> list[Doc]:
    source_text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source_text)
    except SyntaxError:  # a few stdlib files are templates or need a newer grammar
        return []
    rel = f"Lib/{path.relative_to(stdlib).as_posix()}"
    docs = []
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        docs.append(Doc(f"stdlib:{name}", rel, module_doc.strip() + "\n"))
    for node in tree.body:
        class_doc = ast.get_docstring(node, clean=True) if isinstance(node, ast.ClassDef) else None
        if class_doc:  # prose: method sources below do not include their class's docstring
            docs.append(Doc(f"stdlib:{name}:{node.name}", rel, class_doc.strip() + "\n"))
    lines = source_text.splitlines(keepends=True)
    for qualname, node in function_nodes(tree):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        segment = textwrap.dedent("".join(lines[first:node.end_lineno]))
        docs.append(Doc(f"stdlib:{name}:{qualname}", rel, segment.rstrip() + "\n"))
    return [doc for doc in docs if usable(doc.text)]


def unique_ids(docs: list[Doc]) -> list[Doc]:
    """Functions redefined under if/else share a qualified name: number the repeats."""
    seen: dict[str, int] = {}
    out = []
    for doc in docs:
        count = seen.get(doc.id, 0)
        seen[doc.id] = count + 1
        out.append(doc if count == 0 else Doc(f"{doc.id}#{count + 1}", doc.source, doc.text))
    return out


def sha256_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def round_robin(docs: list[Doc]) -> list[Doc]:
    """Interleave top-level packages so a big one (asyncio, email) cannot fill a pack alone.

    Inside a package, documents are ordered by a hash of their id (a fixed pseudo-random order).
    """
    groups: dict[str, list[Doc]] = {}
    for doc in docs:
        groups.setdefault(top_level_of(doc), []).append(doc)
    queues = [sorted(groups[name], key=lambda d: sha256_key(d.id)) for name in sorted(groups, key=sha256_key)]
    order = []
    for rank in range(max(map(len, queues), default=0)):
        order.extend(queue[rank] for queue in queues if rank < len(queue))
    return order


def top_level_of(doc: Doc) -> str:
    return doc.id.split(":")[1].split(".")[0]


def take_documents(docs: list[Doc], max_docs: int | None, max_bytes: int | None) -> list[Doc]:
    """A deterministic, well-mixed subset, cut at the pack's budget and sorted by id."""
    chosen, size = [], 0
    for doc in round_robin(docs):
        line_bytes = len(json_line(doc))
        if max_docs is not None and len(chosen) >= max_docs:
            break
        if max_bytes is not None and size + line_bytes > max_bytes:
            break
        chosen.append(doc)
        size += line_bytes
    return sorted(chosen, key=lambda d: d.id)


def json_line(doc: Doc) -> bytes:
    record = {"id": doc.id, "source": doc.source, "text": doc.text}
    return (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def build_packs(stdlib: Path) -> dict[str, list[Doc]]:
    per_pack: dict[str, list[Doc]] = {"eval": [], "calib": [], "train": []}
    for name, path in stdlib_modules(stdlib):
        per_pack[pack_of(name.split(".")[0])].extend(module_documents(stdlib, name, path))
    # Global exact dedupe, held-out packs first so a shared text is kept where it matters most
    # and can never sit in two packs.
    seen: set[str] = set()
    for pack in ("eval", "calib", "train"):
        kept = []
        for doc in per_pack[pack]:
            key = hashlib.sha256(normalised(doc.text).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                kept.append(doc)
        per_pack[pack] = unique_ids(kept)
    return {
        "eval": take_documents(per_pack["eval"], EVAL_DOCS, None),
        "calib": take_documents(per_pack["calib"], CALIB_DOCS, None),
        "reference-train": take_documents(per_pack["train"], None, TRAIN_BYTES),
    }


def write_pack(path: Path, docs: list[Doc]) -> bytes:
    data = b"".join(json_line(doc) for doc in docs)
    path.write_bytes(data)
    return data


def provenance(files: dict[str, tuple[bytes, list[Doc]]], script: Path) -> str:
    rows = []
    for name, (data, docs) in files.items():
        modules = sorted({top_level_of(doc) for doc in docs})
        rows.append(
            f"| `{name}` | {len(docs)} | {len(data)} | {len(modules)} | `{hashlib.sha256(data).hexdigest()}` |"
        )
    script_sha = hashlib.sha256(script.read_bytes()).hexdigest()
    return PROVENANCE_TEMPLATE.format(
        python=sys.version.split()[0],
        implementation=platform.python_implementation(),
        script_sha=script_sha,
        rows="\n".join(rows),
        min_chars=MIN_CHARS,
        max_chars=MAX_CHARS,
    )


PROVENANCE_TEMPLATE = """# Provenance of calibration_data/

Generated by `scripts/make_data_packs.py` (sha256 `{script_sha}`) from the standard library of
{implementation} {python}. The stdlib differs between Python versions, so **these committed files
are the reference**: regenerating on another Python gives different bytes (the tests and the
reference-model cache key hash the committed files, not a regeneration).

| file | documents | bytes | top-level modules | sha256 |
| --- | --- | --- | --- | --- |
{rows}

Each line is a JSON object with sorted keys `id` (`stdlib:<module>[:<function>]`), `source`
(the file under CPython's `Lib/`) and `text`, UTF-8 with `\\n` line ends.

How it was made:
- Documents are module and class docstrings (prose) and the source of top-level functions and
  methods (code with their docstrings), {min_chars}–{max_chars} characters, at most 1% non-ASCII. Tests, demos,
  IDLE, lib2to3, tkinter, encodings and pydoc_data are left out.
- Split: each top-level package goes to exactly one pack, chosen by sha256 of its name
  (eval 15%, calib 20%, train 65% of the packages). Documents of one package share identifiers
  and near-identical docstrings, so a per-document split would leak near-duplicates from the
  training/calibration text into the held-out pack.
- Dedupe: exact duplicates after whitespace normalisation are dropped across all packs, eval
  first, then calib, then train; no text appears twice.
- Selection inside a pack: packages taken round-robin (in sha256 order of their names; inside a
  package in sha256 order of the document ids) so no package dominates, cut at the pack's budget
  (eval 160 documents, calib 400 documents, train 1.5 MB), then written sorted by id.

Uses:
- `calib.jsonl`: the default calibration data (`trtconv.data.packs.builtin_pack("calib")`);
- `eval.jsonl`: the default held-out evaluation data (perplexity, KL, top-1 agreement);
- `reference-train.jsonl`: the training text (and tokenizer training text) of the reference
  models `llama-ref` and `qwen2-ref` (`trtconv/data/reference_models.py`). Their weights are not
  committed: they are trained on first use (about 90 s each on one CPU thread) into the cache,
  keyed by this file's sha256 among other things.

License: Python's standard library is distributed under the Python Software Foundation
License (PSF-2.0, https://docs.python.org/3/license.html); these files are excerpts of it.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "calibration_data")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, docs in build_packs(stdlib).items():
        data = write_pack(args.out / f"{name}.jsonl", docs)
        files[f"{name}.jsonl"] = (data, docs)
        print(f"{name}.jsonl: {len(docs)} documents, {len(data)} bytes")
    (args.out / "PROVENANCE.md").write_text(provenance(files, Path(__file__)), encoding="utf-8")


if __name__ == "__main__":
    main()
