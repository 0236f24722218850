"""How a run talks to the person or CI job that started it.

On a terminal: Rich progress bars for calibration batches and evaluation. In CI logs (no TTY):
plain timestamped lines, a few per stage, nothing that redraws. ``quiet`` keeps only errors and
the final result; ``json`` leaves stdout to the machine-readable summary.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, quiet: bool = False, json_mode: bool = False, force_plain: bool | None = None):
        self.quiet = quiet
        self.json_mode = json_mode
        # Messages go to stderr when stdout carries JSON, so `--json | jq` always works.
        self.console = Console(stderr=json_mode, highlight=False)
        self.err = Console(stderr=True, highlight=False)
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


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
