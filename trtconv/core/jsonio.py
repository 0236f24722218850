"""Read a JSON object from a file, or fail with one line that names the file.

trtconv reads many small JSON files it did not necessarily write (checkpoint configs, manifests,
engine stamps, a model's config.json). Each of them is useless unless it parses to a JSON object,
and a user who hands over a damaged one must learn *which* file is wrong and why, not read a
traceback. This is the one place that says so; callers pass the error class of their domain
(CheckpointError, ArtifactError, ...), so the CLI still maps it to the right exit code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtconv.core.errors import UserError

_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_json_object(
    path: str | Path,
    what: str,
    error: type[Exception] = UserError,
    *,
    missing: str | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file when it is absent, unreadable, not JSON or not an object.

    `what` says what the file is ("the TensorRT-LLM checkpoint config"). `missing`, when given, is
    the reason the file is needed, used when it does not exist (else a missing file reads as
    "cannot read"). `hint` is appended to every message (what the user can do about it).
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if missing is not None and not path.is_file():
        raise error(f"{path}: missing; {missing}{tail}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}{tail}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise error(f"{path}: not valid JSON ({exc}); it should hold {what}{tail}") from None
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), type(data).__name__)
        raise error(f"{path}: holds a JSON {kind}, expected an object ({what}){tail}")
    return data
