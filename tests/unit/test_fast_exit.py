"""The `trtconv` command leaves through fast_exit (no interpreter teardown): nothing that the teardown
would have finished may be lost. Each case runs in a process of its own, as the command does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import atexit, sys, tempfile, threading, time
        from pathlib import Path
        from trtconv.cli.app import fast_exit
        out = Path({str(tmp_path)!r})
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_threads_atexit_handlers_and_buffered_output_all_finish(tmp_path):
    res = _run(
        """
        def late():
            time.sleep(0.5)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()                  # non-daemon: joined, as at a normal exit
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        kept = tempfile.TemporaryDirectory(dir=out)             # its finalizer runs at exit
        (out / "tmpdir").write_text(kept.name)
        sys.stdout.write("no newline, still buffered")           # flushed before leaving
        fast_exit(3)
        """,
        tmp_path,
    )
    assert res.returncode == 3, res.stderr
    assert res.stdout == "no newline, still buffered"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not Path((tmp_path / "tmpdir").read_text()).exists()


def test_exit_codes_follow_system_exit(tmp_path):
    """None is 0; a string is printed to stderr and gives 1, as the interpreter does."""
    assert _run("fast_exit(None)", tmp_path).returncode == 0
    res = _run("fast_exit('something went wrong')", tmp_path)
    assert res.returncode == 1 and "something went wrong" in res.stderr


def test_the_command_exits_with_its_code(tmp_path):
    """The real entry point: a user mistake still exits 2 with its message, through fast_exit."""
    res = subprocess.run([sys.executable, "-m", "trtconv", "build", str(tmp_path / "missing.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    assert "missing.yaml" in res.stdout + res.stderr and "Traceback" not in res.stderr
