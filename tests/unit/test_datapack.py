"""trtconv.data.packs: building packs, reading documents, every bad input, and the committed packs."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trtconv.data import packs as datapack
from trtconv.cli.data import data_app
from trtconv.data.packs import Document, build_pack, builtin_pack, file_sha256, pack_sha256, read_text_documents
from trtconv.core.errors import DataError

PROSE = "The quick brown fox jumps over the lazy dog while the compiler checks every branch. "


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder with every supported kind of file, nested, plus things that must be ignored."""
    root = tmp_path / "corpus"
    write(root / "a.txt", PROSE * 2)
    write(root / "notes" / "b.md", "# Title\n\n" + PROSE + "\n\nSecond paragraph. " + PROSE)
    write(root / "notes" / "deep" / "c.py", "def f(x):\n    '''Square x.'''\n    return x * x  # " + PROSE + "\n")
    write(root / "d.rst", "Heading\n=======\n\n" + PROSE)
    jsonl(root / "e.jsonl", [{"text": "first " + PROSE}, {"text": "second " + PROSE, "meta": 1}])
    write(root / "ignored.csv", "a,b\n1,2\n")
    write(root / ".hidden" / "x.txt", PROSE + "hidden")
    return root


def read_pack(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# Building packs


def test_folder_pack_reads_every_supported_file_recursively_in_sorted_order(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "pack.jsonl"
    summary = build_pack([corpus], out)
    records = read_pack(out)
    rel = corpus.as_posix()
    assert [r["id"] for r in records] == [
        f"{rel}/a.txt", f"{rel}/d.rst", f"{rel}/e.jsonl:1", f"{rel}/e.jsonl:2", f"{rel}/notes/b.md", f"{rel}/notes/deep/c.py",
    ]
    assert all(set(r) == {"id", "source", "text"} for r in records)
    assert records[2]["source"] == f"{rel}/e.jsonl"
    assert summary.documents == 6
    assert summary.chars == sum(len(r["text"]) for r in records)
    assert summary.sha256 == file_sha256(out) == hashlib.sha256(out.read_bytes()).hexdigest()
    assert summary.bytes == out.stat().st_size


def test_same_sources_and_options_give_the_same_bytes(corpus: Path, tmp_path: Path) -> None:
    first = build_pack([corpus], tmp_path / "one.jsonl", num_samples=3, seed=7)
    second = build_pack([corpus], tmp_path / "two.jsonl", num_samples=3, seed=7)
    assert first.sha256 == second.sha256
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()


def test_records_have_sorted_keys_utf8_and_newline_endings(tmp_path: Path) -> None:
    src = write(tmp_path / "u.txt", "Grüße — naïve café, " + PROSE + "\r\nnext line\r\n")
    out = tmp_path / "pack.jsonl"
    build_pack([src], out)
    raw = out.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    assert "Grüße".encode() in raw  # not \u-escaped
    line = raw.decode().splitlines()[0]
    assert list(json.loads(line)) == ["id", "source", "text"] and line.index('"id"') < line.index('"source"') < line.index('"text"')


def test_field_option_selects_the_jsonl_text_field(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "answer one " + PROSE}, {"question": "q", "answer": "answer two " + PROSE}])
    out = tmp_path / "pack.jsonl"
    build_pack([src], out, field_name="answer")
    assert [r["text"][:10] for r in read_pack(out)] == ["answer one", "answer two"]


def test_long_documents_are_split_at_paragraphs_not_truncated(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}. " + PROSE.strip() for i in range(10)]
    src = write(tmp_path / "long.txt", "\n\n".join(paragraphs))
    out = tmp_path / "pack.jsonl"
    summary = build_pack([src], out, max_chars=300, min_chars=10)
    records = read_pack(out)
    assert len(records) > 1
    assert all(len(r["text"]) <= 300 for r in records)
    assert [r["id"] for r in records] == [f"{src.as_posix()}#{k}" for k in range(1, len(records) + 1)]
    # Nothing lost: the pieces put back together are the original paragraphs.
    assert re.split(r"\n\n", "\n\n".join(r["text"] for r in records)) == paragraphs
    assert any("split 1 document" in note for note in summary.notes)


def test_a_document_with_no_break_is_cut_at_max_chars(tmp_path: Path) -> None:
    src = write(tmp_path / "blob.txt", "".join(chr(97 + i % 26) for i in range(250)))
    out = tmp_path / "pack.jsonl"
    build_pack([src], out, max_chars=100, min_chars=1)
    assert [len(r["text"]) for r in read_pack(out)] == [100, 100, 50]


def test_min_chars_drops_short_documents_with_a_note(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "mixed.jsonl", [{"text": "tiny"}, {"text": PROSE}])
    out = tmp_path / "pack.jsonl"
    summary = build_pack([src], out, min_chars=20)
    assert [r["text"] for r in read_pack(out)] == [PROSE.strip()]
    assert any("dropped 1 piece(s) shorter than 20" in note for note in summary.notes)


def test_dedupe_is_whitespace_insensitive_and_can_be_turned_off(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "dup.jsonl", [{"text": PROSE}, {"text": PROSE.replace(" ", "  \n ")}, {"text": "other " + PROSE}])
    deduped = build_pack([src], tmp_path / "a.jsonl")
    assert deduped.documents == 2 and any("1 duplicate" in note for note in deduped.notes)
    assert [r["id"] for r in read_pack(tmp_path / "a.jsonl")] == [f"{src.as_posix()}:1", f"{src.as_posix()}:3"]
    assert build_pack([src], tmp_path / "b.jsonl", dedupe=False).documents == 3


def test_num_samples_is_seeded_and_keeps_source_order(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "many.jsonl", [{"text": f"document {i:03d} " + PROSE} for i in range(50)])
    picks = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"s{seed}.jsonl"
        build_pack([src], out, num_samples=10, seed=seed, force=True)
        picks.setdefault(seed, []).append([r["id"] for r in read_pack(out)])
    assert picks[0][0] == picks[0][1]
    assert picks[0][0] != picks[1][0]
    assert all(len(ids) == 10 for ids in picks[0] + picks[1])
    lines = [int(i.rsplit(":", 1)[1]) for i in picks[0][0]]
    assert lines == sorted(lines)


def test_asking_for_more_samples_than_exist_keeps_all_with_a_note(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "few.jsonl", [{"text": f"doc {i} " + PROSE} for i in range(3)])
    summary = build_pack([src], tmp_path / "p.jsonl", num_samples=10)
    assert summary.documents == 3 and any("only 3" in note for note in summary.notes)


def test_force_rerun_does_not_read_its_own_output_back(corpus: Path) -> None:
    out = corpus / "pack.jsonl"
    first = build_pack([corpus], out)
    second = build_pack([corpus], out, force=True)
    assert first.sha256 == second.sha256


def test_saved_datasets_folder_is_a_source_with_split_and_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["train " + PROSE, "more " + PROSE]}),
            "validation": datasets.Dataset.from_dict({"content": ["held out " + PROSE]}),
        }
    ).save_to_disk(str(saved))
    out = tmp_path / "pack.jsonl"
    build_pack([saved], out, split="validation", column="content")
    assert [(r["id"], r["text"][:8]) for r in read_pack(out)] == [(f"{saved}:0", "held out")]


# --------------------------------------------------------------------------------------------
# Bad input: each one a DataError naming the problem, and nothing written


def assert_data_error(match: str, out: Path, sources: list, **options) -> DataError:
    """build_pack fails with a DataError matching ``match``, and writes nothing."""
    with pytest.raises(DataError, match=match) as info:
        build_pack(sources, out, **options)
    assert not out.exists() or out.read_bytes() == b"previous"
    assert no_temp_files(out.parent)
    return info.value


def test_empty_source_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_data_error(r"Folder .*empty holds no \.txt, \.md, \.rst, \.py, \.jsonl files", tmp_path / "p.jsonl", sources=[tmp_path / "empty"])


def test_folder_with_only_unsupported_files_is_empty(tmp_path: Path) -> None:
    write(tmp_path / "data" / "table.csv", "a,b\n")
    assert_data_error(r"holds no .* files", tmp_path / "p.jsonl", sources=[tmp_path / "data"])


def test_missing_source(tmp_path: Path) -> None:
    assert_data_error(r"Source .*nope does not exist", tmp_path / "p.jsonl", sources=[tmp_path / "nope"])


def test_source_with_no_text_after_filtering(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "short.jsonl", [{"text": "hi"}, {"text": "   "}])
    err = assert_data_error(r"short\.jsonl has no text left after filtering: 2 document\(s\) read", tmp_path / "p.jsonl", sources=[src])
    assert "--min-chars 64" in str(err)


def test_one_empty_source_among_good_ones_is_still_an_error(corpus: Path, tmp_path: Path) -> None:
    src = write(tmp_path / "blank.txt", "\n\n   \n")
    assert_data_error(r"blank\.txt has no text left", tmp_path / "p.jsonl", sources=[corpus, src])


def test_binary_file_named_as_a_source_is_an_error(tmp_path: Path) -> None:
    src = write(tmp_path / "weights.txt", b"\x00\x01\x02binary\xff" * 10)
    assert_data_error(r"weights\.txt is a binary file .* must be UTF-8", tmp_path / "p.jsonl", sources=[src])


def test_binary_file_in_a_folder_is_skipped_with_a_note(corpus: Path, tmp_path: Path) -> None:
    write(corpus / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00")
    summary = build_pack([corpus], tmp_path / "p.jsonl")
    assert summary.documents == 6
    assert any(note == f"skipped binary file {corpus.as_posix()}/image.txt" for note in summary.notes)


def test_folder_of_only_binary_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "bin" / "a.txt", b"\x00" * 10)
    assert_data_error(r"holds only binary files", tmp_path / "p.jsonl", sources=[tmp_path / "bin"])


def test_unsupported_file_named_as_a_source(tmp_path: Path) -> None:
    src = write(tmp_path / "table.csv", "a,b\n")
    assert_data_error(r"table\.csv: unsupported file type '\.csv'; allowed: \.txt", tmp_path / "p.jsonl", sources=[src])


def test_jsonl_without_the_text_field_names_file_line_and_fields(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "chat.jsonl", [{"text": PROSE}, {"prompt": "p", "completion": "c"}])
    err = assert_data_error(r"chat\.jsonl, line 2: no field 'text'", tmp_path / "p.jsonl", sources=[src])
    assert "the fields there are: completion, prompt" in str(err) and "--field" in str(err)


def test_jsonl_with_invalid_json_or_non_string_text(tmp_path: Path) -> None:
    bad_json = write(tmp_path / "bad.jsonl", json.dumps({"text": PROSE}) + "\n{not json\n")
    assert_data_error(r"bad\.jsonl, line 2: not valid JSON", tmp_path / "p.jsonl", sources=[bad_json])
    not_text = jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    assert_data_error(r"num\.jsonl, line 1: field 'text' is a int, it must be a string", tmp_path / "p.jsonl", sources=[not_text])
    array = write(tmp_path / "arr.jsonl", "[1, 2]\n")
    assert_data_error(r"arr\.jsonl, line 1: expected a JSON object, found a list", tmp_path / "p.jsonl", sources=[array])


def test_existing_output_is_refused_without_force_and_left_untouched(corpus: Path, tmp_path: Path) -> None:
    out = write(tmp_path / "p.jsonl", "previous")
    assert_data_error(r"p\.jsonl already exists; pass --force", out, sources=[corpus])
    assert out.read_text() == "previous"
    build_pack([corpus], out, force=True)
    assert len(read_pack(out)) == 6


def test_a_failing_source_leaves_an_existing_output_untouched_even_with_force(corpus: Path, tmp_path: Path) -> None:
    out = write(tmp_path / "p.jsonl", "previous")
    bad = jsonl(tmp_path / "bad.jsonl", [{"body": PROSE}])
    assert_data_error(r"no field 'text'", out, sources=[corpus, bad], force=True)


def test_bad_options_and_output_paths(corpus: Path, tmp_path: Path) -> None:
    assert_data_error(r"--max-chars is 10; it must be at least .* --min-chars \(64\)", tmp_path / "p.jsonl", sources=[corpus], max_chars=10)
    assert_data_error(r"--num-samples is 0", tmp_path / "p.jsonl", sources=[corpus], num_samples=0)
    assert_data_error(r"must end in \.jsonl", tmp_path / "p.json", sources=[corpus])
    with pytest.raises(DataError, match=r"Output folder .*missing does not exist"):
        build_pack([corpus], tmp_path / "missing" / "p.jsonl")
    with pytest.raises(DataError, match="No sources given"):
        build_pack([], tmp_path / "p.jsonl")


def test_saved_dataset_without_the_split_lists_the_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [PROSE]}), "test": datasets.Dataset.from_dict({"text": [PROSE]})}).save_to_disk(str(saved))
    assert_data_error(r"saved: no split 'validation'; the splits there are: train, test\. Use --split\.", tmp_path / "p.jsonl", sources=[saved], split="validation")
    assert_data_error(r"saved: no column 'content'; the columns are: text\. Use --column\.", tmp_path / "p.jsonl", sources=[saved], column="content")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_source_fails_at_once_when_offline(variable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    for name in datapack.OFFLINE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("the hub was contacted although offline")

    monkeypatch.setattr(datasets, "get_dataset_split_names", must_not_be_called)
    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    started = time.perf_counter()
    err = assert_data_error(rf"hf:wikitext:wikitext-2-raw-v1 needs the Hugging Face Hub, but {variable}=1 is set", tmp_path / "p.jsonl", sources=["hf:wikitext:wikitext-2-raw-v1"])
    assert time.perf_counter() - started < 1.0
    assert "trtconv data pack FILES_OR_FOLDERS -o pack.jsonl" in str(err)


# --------------------------------------------------------------------------------------------
# The CLI wrapper


def test_cli_pack_prints_a_summary_with_the_sha256(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    result = CliRunner().invoke(data_app, ["pack", str(corpus), "-o", str(out), "--num-samples", "4", "--seed", "3", "--min-chars", "10"])
    assert result.exit_code == 0, result.output
    assert f"4 documents" in result.output and file_sha256(out) in result.output


def test_cli_error_is_one_message_without_traceback_and_non_zero_exit(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(data_app, ["pack", str(tmp_path / "empty"), "-o", str(tmp_path / "p.jsonl")])
    assert result.exit_code == DataError.exit_code
    assert "error: Folder" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.jsonl").exists()


def test_cli_no_dedupe_and_field_options(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "d.jsonl", [{"body": PROSE}, {"body": PROSE}])
    out = tmp_path / "p.jsonl"
    result = CliRunner().invoke(data_app, ["pack", str(src), "-o", str(out), "--field", "body", "--no-dedupe"])
    assert result.exit_code == 0, result.output
    assert len(read_pack(out)) == 2


# --------------------------------------------------------------------------------------------
# Reading documents for calibration and evaluation


def test_read_text_documents_keeps_pack_ids_and_sources(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    build_pack([corpus], out)
    docs = read_text_documents(out)
    assert docs == [Document(id=r["id"], text=r["text"], source=r["source"]) for r in read_pack(out)]


def test_read_text_documents_txt_is_one_document_and_folders_recurse(corpus: Path) -> None:
    single = read_text_documents(corpus / "notes" / "b.md")
    assert len(single) == 1 and "\n\nSecond paragraph." in single[0].text
    assert len(read_text_documents(corpus)) == 6


def test_read_text_documents_errors(tmp_path: Path) -> None:
    blank = write(tmp_path / "blank.txt", "  \n")
    with pytest.raises(DataError, match=r"blank\.txt holds no text documents"):
        read_text_documents(blank)
    chat = jsonl(tmp_path / "chat.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: no field 'text'; the fields there are: messages"):
        read_text_documents(chat)
    with pytest.raises(DataError, match="does not exist"):
        read_text_documents(tmp_path / "nope.jsonl")


def test_pack_sha256_of_a_folder_changes_with_any_file(corpus: Path) -> None:
    before = pack_sha256(corpus)
    assert before == pack_sha256(corpus)
    write(corpus / "notes" / "b.md", "changed " + PROSE)
    assert pack_sha256(corpus) != before
    assert pack_sha256(corpus / "a.txt") == file_sha256(corpus / "a.txt")
    with pytest.raises(DataError, match="does not exist"):
        pack_sha256(corpus / "missing")


# --------------------------------------------------------------------------------------------
# The committed packs


def top_level(doc: Document) -> str:
    return doc.id.split(":")[1].split(".")[0]


def test_builtin_packs_are_disjoint_by_module_and_text() -> None:
    packs = {name: read_text_documents(builtin_pack(name)) for name in datapack.BUILTIN_PACKS}
    names = list(packs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not {top_level(d) for d in packs[first]} & {top_level(d) for d in packs[second]}
            assert not {d.text for d in packs[first]} & {d.text for d in packs[second]}
    for docs in packs.values():
        assert len({d.id for d in docs}) == len(docs)
        assert len({d.text for d in docs}) == len(docs)
    assert 100 <= len(packs["eval"]) <= 200
    assert 200 <= len(packs["calib"]) <= 600


def test_provenance_matches_the_committed_files() -> None:
    provenance = (datapack.calibration_data_dir() / "PROVENANCE.md").read_text(encoding="utf-8")
    for name in datapack.BUILTIN_PACKS:
        path = builtin_pack(name)
        row = f"| `{path.name}` | {len(read_text_documents(path))} | {path.stat().st_size} |"
        assert row in provenance
        assert file_sha256(path) in provenance
    assert "PSF" in provenance


def test_unknown_builtin_pack_and_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="known packs: calib, eval, reference-train"):
        builtin_pack("train")
    monkeypatch.setenv("TRTCONV_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="TRTCONV_DATA_DIR="):
        builtin_pack("calib")
