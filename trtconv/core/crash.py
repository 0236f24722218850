"""An unexpected error is a bug, and says so: one line, the traceback in a log file, exit 70.

Exit 1 is the README's "an accuracy gate failed" and 2 "a mistake in the input"; a traceback that
escaped used to exit 1 too, so CI could not tell a crash from a verdict (issue 23, item 5). Any
exception that is not a UserError reaching the command's entry point now prints one line naming
the error and a log file that holds the full traceback, and exits EXIT_CODE (70, EX_SOFTWARE in
sysexits.h: "an internal software error"). With --json the same line is also a JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

EXIT_CODE = 70
LOG_DIR = "logs"  # under the trtconv cache folder; the system's temporary folder if that is not writable


def _log_dirs() -> list[Path]:
    dirs = []
    try:
        from trtconv.cache.store import cache_root

        dirs.append(cache_root() / LOG_DIR)
    except Exception:  # noqa: BLE001, S110 - the crash may come from there: fall back to the temporary folder
        pass
    return dirs + [Path(tempfile.gettempdir())]


def write_log(exc: BaseException) -> Path | None:
    """The traceback, the command and the versions in a new file; None if no folder could take it."""
    text = (f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\npython: {sys.version.split()[0]}\n"
            f"trtconv: {_version()}\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    name = f"trtconv-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in _log_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _version() -> str:
    try:
        from trtconv import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "?"


def report(exc: BaseException) -> int:
    """Print the one line (and the JSON object under --json); return the exit code."""
    path = write_log(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    where = f"the traceback is in {path}" if path else "no log file could be written: " + repr(exc)
    message = (f"internal error, a bug in trtconv or a dependency: {type(exc).__name__}: {first}; {where} "
               "(please report it with that file)")
    print(f"error: {message}", file=sys.stderr)
    if "--json" in sys.argv[1:]:
        print(json.dumps({"error": message, "exit_code": EXIT_CODE, "log": str(path) if path else None}))
    return EXIT_CODE
