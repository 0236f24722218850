"""Text data for calibration and evaluation: read it, and freeze it into hashed JSONL packs.

``trtconv data pack SOURCE... -o PACK.jsonl`` turns local files and folders (or, when online, a
Hugging Face dataset) into one JSONL file with ``id``, ``source`` and ``text`` per line, so a
calibration or evaluation set is a single file with a sha256 that works offline everywhere.

Decisions (each one is what a user would otherwise have to guess):

- **A text file (.txt, .md, .rst, .py) is one document.** Blank lines are not boundaries: code
  and prose paragraphs would be torn apart. To set boundaries yourself, write a .jsonl.
- **Long documents are split, not truncated** (``--max-chars``): nothing is thrown away. A cut
  goes at the last blank line before the limit, else the last line end, else the last space,
  else exactly at the limit; pieces get ids ``<id>#<k>``. Pieces (and documents) shorter than
  ``--min-chars`` are dropped.
- **Binary files:** found inside a folder they are skipped with a note in the summary; named
  directly as a source they are an error (the user pointed at the wrong file). A file is binary
  when it holds a NUL byte or is not valid UTF-8.
- Leading and trailing whitespace of each document (and piece) is stripped; ``\r\n`` becomes ``\n``.
- **Dedupe** (on by default) drops a document whose text, with runs of whitespace collapsed,
  was already seen; the first one in source order stays.
- **Sampling:** ``--num-samples N`` keeps N documents chosen with ``random.Random(seed)`` and
  written in source order; without it every document is kept and the seed is unused.
- **Determinism:** folders are walked in sorted order, records are written with sorted keys
  (UTF-8, ``\\n``), so the same sources and options give the same bytes. Source names are
  written as given on the command line (plus the path inside a folder).
- **Nothing half-written:** the pack is written to a temporary sibling and renamed; an existing
  output is refused unless ``--force``.
- **Offline:** with ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set, an ``hf:`` source fails at
  once, before anything is downloaded or retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from trtconv.artifact.writer import sha256_file as file_sha256  # one hashing helper for the package
from trtconv.core.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
PACK_SUFFIXES = TEXT_SUFFIXES + (JSONL_SUFFIX,)
HUB_PREFIX = "hf:"
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_MIN_CHARS = 64
DEFAULT_MAX_CHARS = 4096
# How many documents to read from a streamed hub split per requested sample: enough to survive
# filtering and dedupe without downloading a whole corpus.
HUB_OVERSAMPLE = 4
BUILTIN_PACKS = ("calib", "eval", "reference-train", "calib-prose", "eval-prose", "calib-code", "eval-code")
# The default data when a recipe gives none: docstrings (the reference models' own domain), English
# prose (Austen, public domain) and Python code (CPython stdlib, PSF-2.0), so a real chat model is
# calibrated on text like its own and judged on each kind separately (see PROVENANCE.md).
# Calibration mixes them in equal shares; evaluation reports and gates each one.
BUILTIN_MIXES = {
    "calibration": ("calib", "calib-prose", "calib-code"),
    "evaluation": ("eval", "eval-prose", "eval-code"),
}


@dataclass(frozen=True)
class Document:
    """One text document: a stable id, where it came from, and the text itself."""

    id: str
    text: str
    source: str


@dataclass
class PackSummary:
    """What ``build_pack`` wrote, and what it left out and why."""

    path: Path
    documents: int
    chars: int
    bytes: int
    sha256: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Hashes and the committed packs


def pack_sha256(path: Path) -> str:
    """sha256 of a pack file (or of a folder's pack files, in sorted order, with their names).

    A single file hashes exactly like ``sha256sum``; a folder hashes the relative name and the
    sha256 of each supported file, so renaming or editing any of them changes the result.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise DataError(f"Cannot hash {path}: it does not exist (expected a pack file or a folder of packs).")
    digest = hashlib.sha256()
    for file in _files_in_folder(path, exclude=None):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def calibration_data_dir() -> Path:
    """The folder of committed packs: ``$TRTCONV_DATA_DIR``, else ``calibration_data/`` of the checkout,
    else the copy installed as package data (``trtconv.calibration_data``, see pyproject.toml)."""
    override = os.environ.get("TRTCONV_DATA_DIR")
    if override:
        folder = Path(override)
    else:
        folder = Path(__file__).resolve().parents[2] / "calibration_data"
        if not folder.is_dir():
            folder = _installed_data_dir() or folder
    if not folder.is_dir():
        where = f"TRTCONV_DATA_DIR={override}" if override else str(folder)
        raise DataError(
            f"The committed data packs were not found at {where}. They live in calibration_data/ of "
            "the trtconv source tree; set TRTCONV_DATA_DIR to that folder."
        )
    return folder


def _installed_data_dir() -> Path | None:
    from importlib import resources

    try:
        return Path(str(resources.files("trtconv.calibration_data")))
    except (ModuleNotFoundError, TypeError):
        return None


def builtin_pack(name: str) -> Path:
    """Path of a committed pack: 'calib*' (calibration), 'eval*' (held out), 'reference-train' (see PROVENANCE.md)."""
    if name not in BUILTIN_PACKS:
        raise DataError(f"Unknown built-in pack {name!r}; known packs: {', '.join(BUILTIN_PACKS)}.")
    path = calibration_data_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"The built-in pack {name!r} is missing: {path} does not exist.")
    return path


# --------------------------------------------------------------------------------------------
# Reading local files


def _is_binary(data: bytes) -> bool:
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if _is_binary(data):
        raise DataError(
            f"{path} is a binary file (it holds a NUL byte or is not valid UTF-8); "
            f"text sources must be UTF-8 {', '.join(PACK_SUFFIXES)} files."
        )
    # Normalise line ends so a pack does not change with the checkout's newline convention.
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _files_in_folder(folder: Path, exclude: Path | None) -> list[Path]:
    """Supported files under a folder, recursively, in sorted (deterministic) order."""
    files = [
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in PACK_SUFFIXES and not _is_hidden(path, folder)
    ]
    if exclude is not None:
        files = [path for path in files if path.resolve() != exclude]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class MissingField(DataError):
    """A JSONL line without the text field. The advice depends on the command: `data pack` has
    --field, `build` reads the recipe's calibration.data / evaluate.data (see with_advice)."""

    def __init__(self, where: str, field_name: str, fields: str, advice: str = "Choose the text field with --field."):
        self.where, self.field_name, self.fields = where, field_name, fields
        super().__init__(f"{where}: no field {field_name!r}; the fields there are: {fields}. {advice}")

    def with_advice(self, advice: str) -> MissingField:
        return MissingField(self.where, self.field_name, self.fields, advice)


def _jsonl_documents(path: Path, label: str, field_name: str, keep_ids: bool) -> Iterator[Document]:
    """Documents of a JSONL file, one per non-blank line, text from ``field_name``.

    ``keep_ids`` keeps an ``id``/``source`` the line already has (reading a pack back); packing
    names documents by file and line instead, which is unique by construction.
    """
    text = _read_text_file(path)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_json_line(path, number, line)
        value = record.get(field_name)
        if field_name not in record:
            raise MissingField(f"{path}, line {number}", field_name, ", ".join(sorted(record)) or "(none)")
        if not isinstance(value, str):
            raise DataError(
                f"{path}, line {number}: field {field_name!r} is a {type(value).__name__}, it must be a string."
            )
        doc_id = f"{label}:{number}"
        source = label
        if keep_ids:
            doc_id = str(record.get("id", doc_id))
            source = str(record.get("source", label))
        yield Document(id=doc_id, text=value, source=source)


def _parse_json_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object, found a {type(record).__name__}.")
    return record


def _file_documents(path: Path, label: str, field_name: str, keep_ids: bool) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == JSONL_SUFFIX:
        yield from _jsonl_documents(path, label, field_name, keep_ids)
    elif suffix in TEXT_SUFFIXES:
        yield Document(id=label, text=_read_text_file(path), source=label)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; allowed: {', '.join(PACK_SUFFIXES)}.")


@dataclass
class _SourceRead:
    documents: list[Document]
    notes: list[str]


def _read_local_source(source: str, field_name: str, keep_ids: bool, exclude: Path | None) -> _SourceRead:
    path = Path(source)
    if not path.exists():
        raise DataError(f"Source {source} does not exist (expected a file, a folder or hf:NAME).")
    if path.is_file():
        return _SourceRead(list(_file_documents(path, source, field_name, keep_ids)), [])
    files = _files_in_folder(path, exclude)
    if not files:
        raise DataError(f"Folder {source} holds no {', '.join(PACK_SUFFIXES)} files (searched recursively).")
    documents, notes = [], []
    for file in files:
        label = (Path(source) / file.relative_to(path)).as_posix()
        try:
            documents.extend(_file_documents(file, label, field_name, keep_ids))
        except DataError:
            if not _is_binary(file.read_bytes()):
                raise
            notes.append(f"skipped binary file {label}")
    if not documents and notes:
        raise DataError(f"Folder {source} holds only binary files ({len(notes)}); no text to read.")
    return _SourceRead(documents, notes)


def read_text_documents(path: Path | str, field_name: str = "text") -> list[Document]:
    """Documents of a .jsonl file (one per line, text in ``field_name``), a text file (one
    document), or a folder of those (recursively, sorted). Ids and sources already in a JSONL
    pack are kept. Whitespace-only documents are skipped; none at all is a ``DataError``.
    """
    read = _read_local_source(str(path), field_name, keep_ids=True, exclude=None)
    documents = [doc for doc in read.documents if doc.text.strip()]
    if not documents:
        raise DataError(f"{path} holds no text documents (every document is empty).")
    return documents


# --------------------------------------------------------------------------------------------
# Hugging Face datasets (hub when online, or a dataset saved with save_to_disk)


def _offline_variable() -> str | None:
    for name in OFFLINE_ENV_VARS:
        if os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}:
            return name
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _parse_hub_source(source: str) -> tuple[str, str | None]:
    spec = source[len(HUB_PREFIX):]
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"Source {source!r}: expected hf:NAME or hf:NAME:CONFIG.")
    return name, config or None


def _hub_rows(source: str, split: str, max_rows: int | None) -> Iterable[dict[str, Any]]:
    offline = _offline_variable()
    if offline:
        raise DataError(
            f"Source {source} needs the Hugging Face Hub, but {offline}={os.environ[offline]} is set, so it "
            "was not tried. Pack local data instead: `trtconv data pack FILES_OR_FOLDERS -o pack.jsonl` "
            "(.txt/.md/.rst/.py/.jsonl), or run this command once on a machine that is online and copy the pack."
        )
    import datasets  # heavy import: only for hub sources

    name, config = _parse_hub_source(source)
    try:
        splits = datasets.get_dataset_split_names(name, config)
    except Exception as err:  # noqa: BLE001 - any hub failure is a data problem the user must fix
        raise DataError(f"Source {source}: the dataset could not be opened ({type(err).__name__}: {err}).") from None
    _check_split(source, split, splits)
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    return stream if max_rows is None else stream.take(max_rows)


def _saved_dataset_rows(path: Path, label: str, split: str) -> Iterable[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        _check_split(label, split, list(loaded))
        return loaded[split]
    return loaded  # a single saved split: --split does not apply


def _check_split(label: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise DataError(f"Source {label}: no split {split!r}; the splits there are: {', '.join(splits)}. Use --split.")


def _dataset_documents(rows: Iterable[dict[str, Any]], label: str, column: str) -> list[Document]:
    documents = []
    for index, row in enumerate(rows):
        if column not in row:
            raise DataError(
                f"Source {label}: no column {column!r}; the columns are: {', '.join(sorted(row))}. Use --column."
            )
        value = row[column]
        if not isinstance(value, str):
            raise DataError(f"Source {label}, row {index}: column {column!r} is a {type(value).__name__}, not text.")
        documents.append(Document(id=f"{label}:{index}", text=value, source=label))
    return documents


# --------------------------------------------------------------------------------------------
# Cleaning, splitting, dedupe, sampling


def _split_long(text: str, max_chars: int) -> list[str]:
    """Pieces of at most ``max_chars``, cut at a blank line, else a line end, else a space."""
    pieces = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cut = next((pos + len(sep) for sep in ("\n\n", "\n", " ") if (pos := window.rfind(sep)) > 0), max_chars)
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return [piece.strip() for piece in pieces]


def _normalised_key(text: str) -> str:
    return hashlib.sha256(re.sub(r"\s+", " ", text).strip().encode("utf-8")).hexdigest()


@dataclass
class _Filtered:
    documents: list[Document]
    too_short: int
    split_documents: int


def _filter_and_split(documents: list[Document], min_chars: int, max_chars: int) -> _Filtered:
    kept, too_short, split_documents = [], 0, 0
    for doc in documents:
        pieces = _split_long(doc.text.strip(), max_chars)
        if len(pieces) > 1:
            split_documents += 1
        for number, piece in enumerate(pieces, start=1):
            if len(piece) < min_chars:
                too_short += 1
                continue
            piece_id = doc.id if len(pieces) == 1 else f"{doc.id}#{number}"
            kept.append(Document(id=piece_id, text=piece, source=doc.source))
    return _Filtered(kept, too_short, split_documents)


def _dedupe(documents: list[Document]) -> list[Document]:
    seen: set[str] = set()
    unique = []
    for doc in documents:
        key = _normalised_key(doc.text)
        if key not in seen:
            seen.add(key)
            unique.append(doc)
    return unique


def _sample(documents: list[Document], num_samples: int | None, seed: int) -> list[Document]:
    if num_samples is None or num_samples >= len(documents):
        return documents
    chosen = sorted(random.Random(seed).sample(range(len(documents)), num_samples))
    return [documents[index] for index in chosen]


# --------------------------------------------------------------------------------------------
# Writing


def _pack_bytes(documents: list[Document]) -> bytes:
    lines = (
        json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}, ensure_ascii=False, sort_keys=True) + "\n"
        for doc in documents
    )
    return "".join(lines).encode("utf-8")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the whole new one."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a data pack is shared data, so it gets the mode any new file would.
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _check_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise DataError(f"Output {output} is a folder; give a file path ending in .jsonl.")
    if output.exists() and not force:
        raise DataError(f"Output {output} already exists; pass --force to replace it.")
    if output.suffix.lower() != JSONL_SUFFIX:
        raise DataError(f"Output {output} must end in .jsonl (the pack is JSON Lines).")
    if not output.parent.is_dir():
        raise DataError(f"Output folder {output.parent} does not exist.")


def _check_options(min_chars: int, max_chars: int, num_samples: int | None) -> None:
    if min_chars < 0:
        raise DataError(f"--min-chars is {min_chars}; it must be 0 or more.")
    if max_chars < max(1, min_chars):
        raise DataError(f"--max-chars is {max_chars}; it must be at least 1 and at least --min-chars ({min_chars}).")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"--num-samples is {num_samples}; it must be 1 or more.")


def _read_source(source: str, field_name: str, split: str, column: str, max_rows: int | None, exclude: Path) -> _SourceRead:
    if source.startswith(HUB_PREFIX):
        return _SourceRead(_dataset_documents(_hub_rows(source, split, max_rows), source, column), [])
    if _is_saved_dataset(Path(source)):
        return _SourceRead(_dataset_documents(_saved_dataset_rows(Path(source), source, split), source, column), [])
    return _read_local_source(source, field_name, keep_ids=False, exclude=exclude)


def build_pack(
    sources: Sequence[str | Path],
    output: Path,
    *,
    field_name: str = "text",
    split: str = "train",
    column: str = "text",
    num_samples: int | None = None,
    min_chars: int = DEFAULT_MIN_CHARS,
    max_chars: int = DEFAULT_MAX_CHARS,
    dedupe: bool = True,
    seed: int = 0,
    force: bool = False,
) -> PackSummary:
    """Read every source, clean, split, dedupe and sample, then write the pack atomically.

    Sources: files and folders (.txt/.md/.rst/.py one document each, .jsonl one per line with
    text in ``field_name``), a folder written by ``datasets``' ``save_to_disk``, or ``hf:NAME[:CONFIG]``
    (online only; ``split`` and ``column`` apply to both dataset kinds).
    """
    output = Path(output)
    if not sources:
        raise DataError("No sources given; pass files, folders or hf:NAME.")
    _check_options(min_chars, max_chars, num_samples)
    _check_output(output, force)
    max_rows = None if num_samples is None else num_samples * HUB_OVERSAMPLE
    documents, notes, seen_files = [], [], set()
    for source in map(str, sources):
        if Path(source).is_file() and Path(source).resolve() in seen_files:
            notes.append(f"skipped {source}: already read")
            continue
        seen_files.add(Path(source).resolve())
        read = _read_source(source, field_name, split, column, max_rows, exclude=output.resolve())
        filtered = _filter_and_split(read.documents, min_chars, max_chars)
        if not filtered.documents:
            raise DataError(
                f"Source {source} has no text left after filtering: {len(read.documents)} document(s) read, "
                f"{filtered.too_short} piece(s) shorter than --min-chars {min_chars}."
            )
        notes.extend(read.notes)
        if filtered.too_short:
            notes.append(f"{source}: dropped {filtered.too_short} piece(s) shorter than {min_chars} chars")
        if filtered.split_documents:
            notes.append(f"{source}: split {filtered.split_documents} document(s) longer than {max_chars} chars")
        documents.extend(filtered.documents)
    if dedupe:
        unique = _dedupe(documents)
        if len(unique) < len(documents):
            notes.append(f"dropped {len(documents) - len(unique)} duplicate document(s)")
        documents = unique
    if num_samples is not None and num_samples > len(documents):
        notes.append(f"asked for {num_samples} samples, only {len(documents)} document(s) available: kept all")
    documents = _sample(documents, num_samples, seed)
    data = _pack_bytes(documents)
    write_atomically(output, data)
    return PackSummary(
        path=output,
        documents=len(documents),
        chars=sum(len(doc.text) for doc in documents),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        notes=notes,
    )
