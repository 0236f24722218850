"""How a run talks to the person or CI job that started it.

On a terminal: Rich progress bars for calibration batches and evaluation. In CI logs (no TTY):
plain timestamped lines, a few per stage, nothing that redraws. ``quiet`` keeps only errors and
the final result; ``json`` leaves stdout to the machine-readable summary.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, quiet: bool = False, json_mode: bool = False, force_plain: bool | None = None):
        self.quiet = quiet
        self.json_mode = json_mode
        # Messages go to stderr when stdout carries JSON, so `--json | jq` always works.
        # Bound to the streams as they are now: ModelOpt's prints are redirected away from stdout
        # while it runs (quiet_dependency), and our own progress must not be swallowed with them.
        self.console = Console(file=sys.stderr if json_mode else sys.stdout, highlight=False)
        self.err = Console(file=sys.stderr, highlight=False)
        interactive = self.console.is_terminal if force_plain is None else not force_plain
        self.plain = not interactive
        self._t0 = time.monotonic()

    def info(self, message: str) -> None:
        if self.quiet:
            return
        if self.plain:
            self.console.print(f"[{time.monotonic() - self._t0:7.1f}s] {message}", markup=False, soft_wrap=True)
        else:
            self.console.print(message)

    def stage(self, name: str, message: str) -> None:
        self.info(f"{name}: {message}")

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"warning: {message}", markup=False, soft_wrap=True)

    def error(self, message: str) -> None:
        self.err.print(f"error: {message}", markup=False, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator:
        """Yields an `advance()` callable. Plain mode prints about 4 lines, not one per step."""
        if self.quiet:
            yield lambda n=1: None
            return
        if self.plain:
            done = [0]
            marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75, 1.0)}

            def advance(n: int = 1) -> None:
                done[0] += n
                if done[0] in marks:
                    self.info(f"{description}: {done[0]}/{total}")

            yield advance
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


@contextmanager
def quiet_dependency(collected: list[str]) -> Iterator[None]:
    """Run ModelOpt/transformers code that prints to stdout and warns freely.

    stdout must stay clean for `--json`, and CI logs readable; what they said is kept (deduplicated)
    in `collected`, which the manifest records, so nothing is hidden, only moved.
    """
    buffer = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buffer):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                message = str(w.message).strip().splitlines()
                _add(collected, f"{w.category.__name__}: {message[0] if message else ''}")
            for line in buffer.getvalue().splitlines():
                if line.strip():
                    _add(collected, line.strip())


def _add(collected: list[str], text: str, limit: int = 200) -> None:
    if text not in collected and len(collected) < limit:
        collected.append(text)


def silence_library_progress_bars() -> None:
    """transformers' per-file progress bars would flood CI logs; our own progress covers the stages."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
