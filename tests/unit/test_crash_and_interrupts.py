"""The command's entry point: a crash is exit 70 with one line and a log file; an interrupt is never
lost (issue 23, items 5 and 12). Each case runs in a process of its own, as the command does; none
depends on timing (the interrupt is delivered at a named point, core.interrupts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(body: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TRTCONV_CACHE": str(tmp_path / "cache"), **env})


def _command_that(raises: str, *args: str) -> str:
    """The real entry point (main) running `trtconv calibrate`, whose work raises `raises`."""
    return f"""
        import sys
        sys.argv = ["trtconv", "calibrate", "--model", "m", "--precision", "fp8", "-o", "o", *{list(args)!r}]
        import trtconv.cli.build as build
        def work(*a, **k):
            raise {raises}
        build._run_build = work
        from trtconv.cli.app import main
        main()
    """


def test_a_crash_is_exit_70_with_one_line_and_a_log(tmp_path):
    res = _run(_command_that("ZeroDivisionError('division by zero')"), tmp_path)
    assert res.returncode == 70, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error: internal error, a bug in trtconv or a dependency: ZeroDivisionError: division by zero")
    log = Path(res.stderr.split("the traceback is in ")[1].split(" (please report")[0])
    assert log.parent == tmp_path / "cache" / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: division by zero" in text
    assert "command: trtconv calibrate" in text


def test_a_crash_under_json_is_a_json_object_too(tmp_path):
    res = _run(_command_that("KeyError('x')", "--json"), tmp_path)
    assert res.returncode == 70
    reply = json.loads(res.stdout.strip().splitlines()[-1])
    assert reply["exit_code"] == 70 and Path(reply["log"]).is_file() and "KeyError" in reply["error"]


def test_a_user_error_is_still_exit_2(tmp_path):
    res = _run(_command_that("__import__('trtconv.core.errors').core.errors.ModelError('model.path x does not exist')"),
               tmp_path)
    assert res.returncode == 2 and not (tmp_path / "cache" / "logs").exists()


def test_interrupt_outside_the_pipeline_is_130_not_abort(tmp_path):
    """Ctrl-C before the pipeline starts: typer turns it into a silent exit (click's "Aborted!" was 1); 130 with a line."""
    res = _run(_command_that("KeyboardInterrupt"), tmp_path)
    assert res.returncode == 130
    assert "error: interrupted (Ctrl-C)" in res.stderr and "Traceback" not in res.stderr


def test_an_interrupt_a_dependency_swallowed_still_ends_the_command(tmp_path):
    """The SIGINT is delivered inside `except BaseException: pass` and the command then finishes as if
    nothing happened: the recorded request still makes it exit 130."""
    body = _command_that("SystemExit(0)").replace(
        "raise SystemExit(0)",
        "from trtconv.core import interrupts; interrupts.point('starting'); print('went on')",
    )
    res = _run(body, tmp_path, TRTCONV_TEST_INTERRUPT_AT="starting", TRTCONV_TEST_INTERRUPT_SWALLOWED="1")
    assert "went on" in res.stdout
    assert res.returncode == 130 and "error: interrupted (Ctrl-C)" in res.stderr


def test_the_import_retry_path_keeps_the_interrupt(tmp_path):
    """retry_after_import_deadlock waits for the background import and tries again: an interrupt there,
    even one swallowed while waiting, stops it instead of the retry running on."""
    body = """
        import sys, threading
        from trtconv.core import imports, interrupts
        interrupts.install()
        release = threading.Event()
        imports._background = threading.Thread(target=release.wait, args=(5,))
        imports._background.start()
        class _DeadlockError(Exception):
            pass
        calls = []
        def load():
            calls.append(1)
            try:
                raise _DeadlockError("deadlock detected")
            except _DeadlockError as exc:
                raise RuntimeError("lazy import failed") from exc
        try:
            imports.retry_after_import_deadlock(load)
        except KeyboardInterrupt:
            print("interrupted after", len(calls), "call(s)")
            sys.exit(130)
        finally:
            release.set()
    """
    for swallowed in ("0", "1"):
        res = _run(body, tmp_path, TRTCONV_TEST_INTERRUPT_AT="import-retry", TRTCONV_TEST_INTERRUPT_SWALLOWED=swallowed)
        assert res.returncode == 130, res.stderr
        assert "interrupted after 1 call(s)" in res.stdout


def test_an_interrupted_exit_does_not_wait_for_threads(tmp_path):
    """fast_exit(130) leaves a thread that would never end (a real one: the ModelOpt import, a 16 GB hash)."""
    res = _run("""
        import threading
        from trtconv.cli.app import fast_exit
        threading.Thread(target=threading.Event().wait).start()   # non-daemon, never ends
        fast_exit(130)
    """, tmp_path)
    assert res.returncode == 130
