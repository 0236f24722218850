#!/usr/bin/env python3
"""Build trtconv's committed text packs from the Python standard library and Jane Austen's novels.

Writes seven JSONL packs into ``calibration_data/`` (one object per line, fields
``id``, ``source``, ``text``; sorted keys, UTF-8, ``\\n`` line ends):

- ``reference-train.jsonl``: training text for the reference models (~1.5 MB);
- ``calib.jsonl``: the default calibration pack (400 documents);
- ``eval.jsonl``: the held-out evaluation pack (160 documents);
- ``calib-prose.jsonl`` / ``eval-prose.jsonl``: English prose, passages of Jane Austen's six
  novels (public domain) as shipped by Debian's ``r-cran-janeaustenr`` package (MIT); eval holds
  whole novels that calib does not (see "Prose and code packs" below);
- ``calib-code.jsonl`` / ``eval-code.jsonl``: Python source, functions and methods of the stdlib
  packages that the three packs above leave out (idlelib, tkinter, lib2to3, ...), so they share
  no package with them nor with each other.

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

**Prose and code packs.** Same record format, same 200-2400 character bound, same
whitespace-normalised dedupe (against every pack, held-out ones first). Documents are split
between calibration and evaluation by whole group, never by document: a prose group is a novel
(``PROSE_PACKS``), a code group a top-level stdlib package (``CODE_PACKS``). Inside a pack the
documents are taken round-robin over chapters (prose) or modules (code), each in an order fixed by
sha256 of ``SEED`` and the name, until the pack's byte budget, then written sorted by id. The
Austen text comes from the ``.deb`` (``apt-get download r-cran-janeaustenr``) or the installed
package, read with a small reader of R's lazy-load database below (no R needed).

Usage: ``python scripts/make_data_packs.py [--out calibration_data] [--austen r-cran-janeaustenr_1.0.0-1_all.deb]``
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import platform
import re
import struct
import sys
import sysconfig
import tarfile
import textwrap
import zlib
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
    docs.extend(function_documents(source_text, tree, name, rel))
    return [doc for doc in docs if usable(doc.text)]


def function_documents(source_text: str, tree: ast.Module, name: str, rel: str) -> list[Doc]:
    """The source of each top-level function and method, decorators included, dedented."""
    lines = source_text.splitlines(keepends=True)
    docs = []
    for qualname, node in function_nodes(tree):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        segment = textwrap.dedent("".join(lines[first:node.end_lineno]))
        docs.append(Doc(f"stdlib:{name}:{qualname}", rel, segment.rstrip() + "\n"))
    return docs


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


# --------------------------------------------------------------------------------------------
# Prose and code packs

SEED = 20261129
PACK_BYTES = {"calib": 240_000, "eval": 120_000}

# Debian 12 (bookworm) r-cran-janeaustenr 1.0.0-1: Julia Silge's janeaustenr (MIT), whose data are
# the texts of Project Gutenberg's editions of the six novels (public domain).
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_INSTALLED = Path("/usr/lib/R/site-library/janeaustenr")
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
# Held out: the two novels published together in 1817, about a fifth of the text.
PROSE_PACKS = {
    "eval": ("northangerabbey", "persuasion"),
    "calib": ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"),
}
PROSE_TARGET_CHARS = 1000  # about 250 tokens: one passage fills most of a 256-token sequence
CHAPTER_HEADING = re.compile(r"^(?:CHAPTER|Chapter)\s+(?:[0-9]+|[IVXLC]+)\.?$")
VOLUME_HEADING = re.compile(r"^VOLUME\s+[IVX]+$")
# Lines after which a novel's text is over (end marks, and the Gutenberg edition's note on the text).
END_OF_TEXT = {"THE END", "FINIS", "A NOTE ON THE TEXT"}
SENTENCE_END = re.compile(r"""(?<=[.!?])["')]?\s+(?=["'(]?[A-Z])""")

# Stdlib packages that the docstring packs exclude (EXCLUDED_TOP_LEVEL) and that are library or
# demo code; encodings (generated codec boilerplate) and tests stay out.
CODE_PACKS = {
    "eval": ("lib2to3", "turtledemo", "venv"),
    "calib": ("distutils", "idlelib", "tkinter"),
}
CODE_SKIPPED_PARTS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}


def seeded_key(text: str) -> str:
    return sha256_key(f"{SEED}:{text}")


def seeded_round_robin(docs: list[Doc], levels: tuple) -> list[Doc]:
    """Interleave groups (``levels[0]``: key function), one document of each per round; inside a
    group, subgroups by the next level the same way. Groups, and the documents at the last level,
    in seeded-hash order."""
    if not levels:
        return sorted(docs, key=lambda d: seeded_key(d.id))
    groups: dict[str, list[Doc]] = {}
    for doc in docs:
        groups.setdefault(levels[0](doc), []).append(doc)
    queues = [seeded_round_robin(groups[name], levels[1:]) for name in sorted(groups, key=seeded_key)]
    return [queue[rank] for rank in range(max(map(len, queues), default=0)) for queue in queues if rank < len(queue)]


def take_bytes(docs: list[Doc], levels: tuple, max_bytes: int) -> list[Doc]:
    chosen, size = [], 0
    for doc in seeded_round_robin(docs, levels):
        line_bytes = len(json_line(doc))
        if size + line_bytes > max_bytes:
            break
        chosen.append(doc)
        size += line_bytes
    return sorted(chosen, key=lambda d: d.id)


def dedupe(packs: dict[str, list[Doc]], seen: set[str]) -> dict[str, list[Doc]]:
    """Drop texts already in ``seen`` (whitespace-normalised), held-out packs first."""
    out = {}
    for pack in sorted(packs, key=lambda p: p != "eval"):
        kept = []
        for doc in packs[pack]:
            key = sha256_key(normalised(doc.text))
            if key not in seen:
                seen.add(key)
                kept.append(doc)
        out[pack] = unique_ids(kept)
    return out


# R's lazy-load database (data/Rdata.rdx + data/Rdata.rdb), read without R.


class RUnserializer:
    """Just enough of R's XDR serialization format (version 2 or 3) for vectors and lists."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            length = self.int()
            self.pos += length  # native encoding name
        self.value = self.item()

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (241, 242, 250, 251, 252, 253, 254):  # environments, nil, missing
            return None
        if kind == 255:  # back reference
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind in (2, 6):  # pairlist, call: [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            return [(tag, head)] + (tail if isinstance(tail, list) else [])
        if kind == 9:  # string
            length = self.int()
            if length == -1:
                return None
            text = self.data[self.pos:self.pos + length].decode("utf-8")
            self.pos += length
            return text
        length = self.int()
        if kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{length}i", self.data, self.pos))
            self.pos += 4 * length
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{length}d", self.data, self.pos))
            self.pos += 8 * length
        elif kind in (16, 19):  # character vector, list
            value = [self.item() for _ in range(length)]
        else:
            raise ValueError(f"unsupported R type {kind}")
        if has_attr:
            attributes = dict(self.item())
            if kind == 19 and "names" in attributes:
                return dict(zip(attributes["names"], value))
        return value


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    index = RUnserializer(gzip.decompress(rdx)).value
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]  # 4-byte length, then a zlib stream
        objects[name] = RUnserializer(zlib.decompress(blob[4:])).value
    return objects


def deb_data_files(deb: Path, names: list[str]) -> dict[str, bytes]:
    """Files of a .deb's data.tar.* (an ar archive: 8-byte magic, 60-byte member headers)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb} is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if member.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return {name: tar.extractfile(f"./{name}").read() for name in names}
    raise SystemExit(f"{deb} has no data.tar member")


@dataclass(frozen=True)
class AustenSource:
    label: str  # what was read, for PROVENANCE.md
    rdx: bytes
    rdb: bytes


def austen_source(path: Path | None) -> AustenSource:
    path = path or AUSTEN_INSTALLED
    if path.is_file():
        files = deb_data_files(path, [f"{AUSTEN_DATA}/Rdata.rdx", f"{AUSTEN_DATA}/Rdata.rdb"])
        rdx, rdb = files[f"{AUSTEN_DATA}/Rdata.rdx"], files[f"{AUSTEN_DATA}/Rdata.rdb"]
        label = f"`{path.name}` (sha256 `{hashlib.sha256(path.read_bytes()).hexdigest()}`)"
    elif (path / "data" / "Rdata.rdb").is_file():
        rdx, rdb = (path / "data" / "Rdata.rdx").read_bytes(), (path / "data" / "Rdata.rdb").read_bytes()
        label = f"the installed package `{path}`"
    else:
        raise SystemExit(
            f"Jane Austen's texts not found at {path}. Fetch Debian's package and pass it:\n"
            f"  apt-get download {AUSTEN_PACKAGE}   # r-cran-janeaustenr_1.0.0-1_all.deb, no install needed\n"
            f"  python scripts/make_data_packs.py --austen r-cran-janeaustenr_1.0.0-1_all.deb"
        )
    return AustenSource(f"{label}, `data/Rdata.rdb` sha256 `{hashlib.sha256(rdb).hexdigest()}`", rdx, rdb)


def chapters(lines: list[str]) -> list[list[str]]:
    """A novel's lines, chapter by chapter; front matter and anything after the end mark dropped."""
    out: list[list[str]] = []
    for line in lines:
        stripped = line.strip()
        if stripped.upper() in END_OF_TEXT:
            break
        if CHAPTER_HEADING.match(stripped):
            out.append([])
        elif out and not VOLUME_HEADING.match(stripped):
            out[-1].append(line)
    return out


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs, unwrapped; Gutenberg's _italics_ marks removed."""
    text = "\n".join(lines).replace("_", "")
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def pieces(paragraph: str) -> list[str]:
    """A paragraph, or for one over MAX_CHARS its sentences packed into pieces of at most MAX_CHARS."""
    if len(paragraph) <= MAX_CHARS:
        return [paragraph]
    out = [""]
    for sentence in SENTENCE_END.split(paragraph):
        if out[-1] and len(out[-1]) + 1 + len(sentence) > MAX_CHARS:
            out.append("")
        out[-1] = f"{out[-1]} {sentence}".strip()
    return out


def passages(chapter: list[str]) -> list[str]:
    """Consecutive paragraphs joined until PROSE_TARGET_CHARS (never past MAX_CHARS)."""
    out, current = [], []
    for piece in (p for paragraph in paragraphs(chapter) for p in pieces(paragraph)):
        if current and len("\n\n".join(current + [piece])) > MAX_CHARS:
            out.append(current)
            current = []
        current.append(piece)
        if len("\n\n".join(current)) >= PROSE_TARGET_CHARS:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return ["\n\n".join(passage) + "\n" for passage in out]


def prose_documents(source: AustenSource) -> dict[str, list[Doc]]:
    novels = read_lazyload(source.rdx, source.rdb)
    if sorted(novels) != sorted(book for books in PROSE_PACKS.values() for book in books):
        raise SystemExit(f"unexpected janeaustenr objects: {sorted(novels)}")
    per_pack: dict[str, list[Doc]] = {}
    for pack, books in PROSE_PACKS.items():
        per_pack[pack] = [
            Doc(f"austen:{book}:{number:02d}:{index:02d}", f"janeaustenr::{book}", text)
            for book in books
            for number, chapter in enumerate(chapters(novels[book]), start=1)
            for index, text in enumerate(passages(chapter), start=1)
            if usable(text)
        ]
    return per_pack


def code_documents(stdlib: Path) -> dict[str, list[Doc]]:
    per_pack: dict[str, list[Doc]] = {}
    for pack, packages in CODE_PACKS.items():
        per_pack[pack] = []
        for package in packages:
            for path in sorted((stdlib / package).rglob("*.py")):
                rel = path.relative_to(stdlib)
                if CODE_SKIPPED_PARTS & set(rel.parts):
                    continue
                source_text = path.read_text(encoding="utf-8", errors="replace")
                try:
                    tree = ast.parse(source_text)
                except SyntaxError:
                    continue
                docs = function_documents(source_text, tree, module_name(stdlib, path), f"Lib/{rel.as_posix()}")
                per_pack[pack].extend(doc for doc in docs if usable(doc.text))
    return per_pack


def module_of(doc: Doc) -> str:
    return doc.id.split(":")[1]


def chapter_of(doc: Doc) -> str:
    return ":".join(doc.id.split(":")[1:3])


def build_extra_packs(stdlib: Path, austen: AustenSource, stdlib_packs: dict[str, list[Doc]]) -> dict[str, list[Doc]]:
    """calib-/eval-prose and calib-/eval-code, deduped against every stdlib pack and each other."""
    seen = {sha256_key(normalised(doc.text)) for docs in stdlib_packs.values() for doc in docs}
    prose = dedupe(prose_documents(austen), seen)
    code = dedupe(code_documents(stdlib), seen)
    return {
        "calib-prose": take_bytes(prose["calib"], (top_level_of, chapter_of), PACK_BYTES["calib"]),
        "eval-prose": take_bytes(prose["eval"], (top_level_of, chapter_of), PACK_BYTES["eval"]),
        "calib-code": take_bytes(code["calib"], (top_level_of, module_of), PACK_BYTES["calib"]),
        "eval-code": take_bytes(code["eval"], (top_level_of, module_of), PACK_BYTES["eval"]),
    }


def write_pack(path: Path, docs: list[Doc]) -> bytes:
    data = b"".join(json_line(doc) for doc in docs)
    path.write_bytes(data)
    return data


def table_rows(files: dict[str, tuple[bytes, list[Doc]]], group_of) -> str:
    rows = []
    for name, (data, docs) in files.items():
        groups = {group_of(doc) for doc in docs}
        rows.append(f"| `{name}` | {len(docs)} | {len(data)} | {len(groups)} | `{hashlib.sha256(data).hexdigest()}` |")
    return "\n".join(rows)


def preserved_sections(old: str) -> list[str]:
    """'## ' sections of an existing PROVENANCE.md that other scripts wrote (make_cloze_task.py's)."""
    sections = re.split(r"(?m)^(?=## )", old)[1:]
    return [section.rstrip("\n") + "\n" for section in sections if not section.startswith(EXTRA_HEADING)]


def provenance(
    files: dict[str, tuple[bytes, list[Doc]]],
    extra_files: dict[str, tuple[bytes, list[Doc]]],
    austen: AustenSource,
    script: Path,
    old: str = "",
) -> str:
    script_sha = hashlib.sha256(script.read_bytes()).hexdigest()
    stdlib_part = PROVENANCE_TEMPLATE.format(
        python=sys.version.split()[0],
        implementation=platform.python_implementation(),
        script_sha=script_sha,
        rows=table_rows(files, top_level_of),
        min_chars=MIN_CHARS,
        max_chars=MAX_CHARS,
    )
    prose = {name: value for name, value in extra_files.items() if name.endswith("-prose.jsonl")}
    code = {name: value for name, value in extra_files.items() if name.endswith("-code.jsonl")}
    extra_part = EXTRA_TEMPLATE.format(
        heading=EXTRA_HEADING,
        python=sys.version.split()[0],
        seed=SEED,
        prose_rows=table_rows(prose, chapter_of),
        code_rows=table_rows(code, module_of),
        austen=austen.label,
        eval_books=", ".join(PROSE_PACKS["eval"]),
        calib_books=", ".join(PROSE_PACKS["calib"]),
        eval_packages=", ".join(CODE_PACKS["eval"]),
        calib_packages=", ".join(CODE_PACKS["calib"]),
        target=PROSE_TARGET_CHARS,
        min_chars=MIN_CHARS,
        max_chars=MAX_CHARS,
        calib_bytes=PACK_BYTES["calib"],
        eval_bytes=PACK_BYTES["eval"],
    )
    return "\n".join([stdlib_part, *preserved_sections(old), extra_part])


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
  models `llama-ref` and `qwen2-ref` (`trtconv/data/reference_models.py`). `llama-ref` ships
  trained (`trtconv/data/reference/llama-ref`, sha256 pinned, so every machine has the same bytes);
  `qwen2-ref` is trained on first use (about 90 s on one CPU thread) into the cache, keyed by this
  file's sha256 among other things.

License: Python's standard library is distributed under the Python Software Foundation
License (PSF-2.0, https://docs.python.org/3/license.html); these files are excerpts of it.
"""

EXTRA_HEADING = "## Prose and code packs"

EXTRA_TEMPLATE = """{heading} (calib-prose, eval-prose, calib-code, eval-code)

Generated by the same script and run (seed {seed}, no network once the `.deb` is here), for
calibrating and evaluating on English prose and on source code instead of docstrings. Same record
format; ids are `austen:<novel>:<chapter>:<passage>` (source `janeaustenr::<novel>`, the R object)
and `stdlib:<module>:<function>` (source: the file under CPython {python}'s `Lib/`).

| file | documents | bytes | chapters | sha256 |
| --- | --- | --- | --- | --- |
{prose_rows}

| file | documents | bytes | modules | sha256 |
| --- | --- | --- | --- | --- |
{code_rows}

How they were made:
- Prose: Jane Austen's six novels as shipped in Debian 12's `r-cran-janeaustenr` 1.0.0-1 (CRAN
  janeaustenr 1.0.0, Project Gutenberg's texts), read from {austen}
  by the script's own reader of R's lazy-load format (no R needed). Front matter, volume headings
  and everything after the end mark (and Northanger Abbey's note on the text) are dropped; each
  chapter is cut into passages of whole paragraphs (unwrapped, Gutenberg's `_italic_` marks
  removed, a paragraph over {max_chars} characters cut between sentences), joined until {target}
  characters; passages of {min_chars}-{max_chars} characters are kept.
- Code: the source of top-level functions and methods (decorators and docstrings included) of the
  stdlib packages that the packs above leave out: {eval_packages} (eval-code) and
  {calib_packages} (calib-code); their tests (`test`, `tests`, `idle_test`) left out;
  {min_chars}-{max_chars} characters, at most 1% non-ASCII.
- Split by whole group, never by document: eval-prose holds {eval_books}; calib-prose
  {calib_books}; code by top-level package as above. So no two packs share a novel or a package.
- Dedupe: exact duplicates after whitespace normalisation are dropped against every pack in this
  folder (eval first); no text appears twice.
- Selection: round-robin over novels (prose) or packages (code), inside each round-robin over
  its chapters or modules, all of these and the documents inside them ordered by sha256 of
  `"{seed}:<name or id>"`; cut at {calib_bytes} bytes (calib) and {eval_bytes} bytes (eval),
  written sorted by id.

License: the novels (1811-1818) are in the public domain. janeaustenr is MIT-licensed,
Copyright (c) 2016-2017 Julia Silge (Debian packaging (c) 2021 Andreas Tille, MIT); its notice:
"Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions: The above copyright notice and this
permission notice shall be included in all copies or substantial portions of the Software. THE
SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED." The code packs are
excerpts of Python's standard library (PSF-2.0), like the packs above.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "calibration_data")
    parser.add_argument(
        "--austen", type=Path, default=None,
        help=f"{AUSTEN_PACKAGE} .deb (apt-get download {AUSTEN_PACKAGE}) or installed folder (default {AUSTEN_INSTALLED})",
    )
    args = parser.parse_args()
    austen = austen_source(args.austen)  # before writing anything: fail whole, not half
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    args.out.mkdir(parents=True, exist_ok=True)
    stdlib_packs = build_packs(stdlib)
    extra_packs = build_extra_packs(stdlib, austen, stdlib_packs)
    written: dict[str, tuple[bytes, list[Doc]]] = {}
    for name, docs in {**stdlib_packs, **extra_packs}.items():
        data = write_pack(args.out / f"{name}.jsonl", docs)
        written[f"{name}.jsonl"] = (data, docs)
        print(f"{name}.jsonl: {len(docs)} documents, {len(data)} bytes")
    files = {f"{name}.jsonl": written[f"{name}.jsonl"] for name in stdlib_packs}
    extra_files = {f"{name}.jsonl": written[f"{name}.jsonl"] for name in extra_packs}
    provenance_path = args.out / "PROVENANCE.md"
    old = provenance_path.read_text(encoding="utf-8") if provenance_path.is_file() else ""
    provenance_path.write_text(provenance(files, extra_files, austen, Path(__file__), old), encoding="utf-8")


if __name__ == "__main__":
    main()
