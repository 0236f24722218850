"""read_json_object: every way a JSON file can be wrong gives one line naming the file, in the caller's error class."""

from __future__ import annotations

import pytest

from trtconv.core.errors import CheckpointError, UserError
from trtconv.core.jsonio import read_json_object


def test_reads_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1}', encoding="utf-8")
    assert read_json_object(path, "a config") == {"a": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("{not json", r"config\.json: not valid JSON .*it should hold a config"), ("[1, 2]", r"config\.json: holds a JSON array, expected an object")],
)
def test_bad_content_names_the_file(tmp_path, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match=expected):
        read_json_object(path, "a config", CheckpointError)


def test_missing_file_with_and_without_a_reason(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(UserError, match=r"absent\.json: missing; needed here; run X"):
        read_json_object(path, "a config", missing="needed here", hint="run X")
    with pytest.raises(UserError, match=r"absent\.json: cannot read a config"):
        read_json_object(path, "a config")
