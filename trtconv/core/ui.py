"""How a run talks to the person or CI job that started it.

On a terminal: one live display per stage, a spinner with elapsed time, plus progress bars with
ETA for calibration and evaluation batches. In CI logs (no TTY): plain timestamped lines, a few per
stage, nothing that redraws, never wrapped (a digest or a command stays on one line so grep and
copy-paste work), a heartbeat line at least every 30 s while a phase is silent (ModelOpt's AWQ
search, model loading, hashing), and a closing line with each stage's time. ``quiet`` keeps only
errors and the final result; ``json`` leaves stdout to the machine-readable summary.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from trtconv.core import interrupts


# CI logs get a line at least this often during a long phase (TRTCONV_HEARTBEAT_S overrides it).
HEARTBEAT_S = 30.0
# The Reporter of the running command: stages (StageMeter) announce themselves through it.
_ACTIVE: "Reporter | None" = None


def _heartbeat_s() -> float:
    try:
        return max(0.05, float(os.environ.get("TRTCONV_HEARTBEAT_S", HEARTBEAT_S)))
    except ValueError:
        return HEARTBEAT_S


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Reporter:
    def __init__(self, quiet: bool = False, json_mode: bool = False, force_plain: bool | None = None):
        global _ACTIVE
        self.quiet = quiet
        self.json_mode = json_mode
        # Messages go to stderr when stdout carries JSON, so `--json | jq` always works.
        # Bound to the streams as they are now: ModelOpt's prints are redirected away from stdout
        # while it runs (quiet_dependency), and our own progress must not be swallowed with them.
        stream = sys.stderr if json_mode else sys.stdout
        probe = Console(file=stream)
        interactive = probe.is_terminal if force_plain is None else not force_plain
        self.plain = not interactive
        # In a log nothing is wrapped: a digest, a path or a command stays on one line (grep, copy-paste).
        self.console = Console(file=stream, highlight=False, soft_wrap=self.plain, width=None if interactive else 10_000)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True, width=None if interactive else 10_000)
        self._t0 = time.monotonic()
        self._activity = ""  # the last thing said in the current phase (heartbeat lines repeat it)
        self._live: Progress | None = None  # the terminal's one live display during a phase
        if self.plain:
            silence_progress_bars_in_logs()
        _ACTIVE = self

    def elapsed(self) -> float:
        """Seconds since this reporter (the run) started: the clock of the log's [  12.3s] stamps."""
        return time.monotonic() - self._t0

    def _stamp(self, message: str) -> str:
        return f"[{self.elapsed():7.1f}s] {message}"

    def info(self, message: str) -> None:
        self._activity = message
        if self.quiet:
            return
        if self.plain:
            self.console.print(self._stamp(message), markup=False)
        else:
            self.console.print(message, markup=False)

    def line(self, message: str) -> None:
        """A result line (even with --quiet): never wrapped, no markup, no timestamp."""
        self.console.print(message, markup=False, soft_wrap=True, crop=False)

    def stage(self, name: str, message: str) -> None:
        interrupts.check()  # each step a stage reports is a boundary (core.interrupts)
        self.info(f"{name}: {message}")

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"warning: {message}", markup=False, soft_wrap=True)

    def error(self, message: str) -> None:
        self.err.print(f"error: {message}", markup=False, soft_wrap=True)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        """A Rich table on a terminal; in a log one plain `title: col=value, ...` line per row."""
        if self.plain:
            for row in rows:
                self.line(f"{title}: " + ", ".join(f"{c}={v}" for c, v in zip(columns, row)))
            return
        from rich.table import Table

        t = Table(title=title)
        for col in columns:
            t.add_column(col)
        for row in rows:
            t.add_row(*row)
        self.console.print(t)

    # -- long phases ----------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A stage or other long phase: a spinner (terminal) or a heartbeat line every 30 s (log),
        and a closing line with its wall time."""
        t0 = time.monotonic()
        self._activity = ""
        stop = threading.Event()
        beat = live = None
        if self.quiet or self._live is not None:  # quiet, or nested in a phase that already shows life
            pass
        elif self.plain:
            beat = threading.Thread(target=self._heartbeat, args=(name, t0, stop), daemon=True)
            beat.start()
        else:
            live = self._live = self._new_progress(self.console)
            live.start()
            live.add_task(name, total=None)
        try:
            yield
        finally:
            stop.set()
            if beat is not None:
                beat.join()
            if live is not None:
                live.stop()
                self._live = None
        self.info(f"{name}: finished in {_duration(time.monotonic() - t0)}")  # not reached on an exception

    def _heartbeat(self, name: str, t0: float, stop: threading.Event) -> None:
        interval = _heartbeat_s()
        while not stop.wait(interval):
            last = f" (last: {self._activity})" if self._activity else ""
            self.console.print(self._stamp(f"{name}: still running, {_duration(time.monotonic() - t0)}{last}"), markup=False)
            interrupts.point("heartbeat")  # tests: a SIGINT from this thread (core.interrupts)

    @staticmethod
    def _new_progress(console=None) -> Progress:
        return Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    @contextmanager
    def progress(self, description: str, total: int, then: str = "") -> Iterator:
        """Yields an `advance()` callable. Plain mode prints about 4 lines (with rate and ETA), not one
        per step. `then` says what happens after the last step (what a heartbeat repeats meanwhile)."""
        if self.quiet:
            yield lambda n=1: interrupts.check()
            return
        t0 = time.monotonic()
        done = [0]
        if self.plain:
            marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75, 1.0)}

            def advance(n: int = 1) -> None:
                interrupts.check()  # each step is a boundary
                done[0] += n
                if done[0] in marks:
                    elapsed = time.monotonic() - t0
                    rate = done[0] / elapsed if elapsed > 0 else 0.0
                    eta = f", ETA {_duration((total - done[0]) / rate)}" if rate and done[0] < total else ""
                    self.info(f"{description}: {done[0]}/{total} ({rate:.2f}/s{eta})")
                if done[0] == total and then:
                    self.info(f"{description}: done; {then}")

            yield advance
            return
        own = self._live is None
        bar = self._live or self._new_progress(self.console)
        if own:
            bar.start()
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            interrupts.check()
            done[0] += n
            bar.advance(task, n)
            if done[0] == total and then:
                bar.update(task, description=f"{description} done; {then}")

        try:
            yield advance
        finally:
            if own:
                bar.stop()
            else:
                bar.remove_task(task)


@contextmanager
def stage_phase(name: str) -> Iterator[None]:
    """What StageMeter wraps each stage in: the active Reporter's phase, or nothing."""
    reporter = _ACTIVE
    if reporter is None:
        yield
        return
    with reporter.phase(name):
        yield


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


# In a log, transformers' tqdm bars ("Loading weights", "Writing model shards") are noise: set
# before transformers is imported (its progress switch is read then), and switched off if it already was.
_PLAIN_LOG_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def silence_progress_bars_in_logs() -> None:
    """For a plain log (no TTY): no library progress bars, whichever command runs (build, check, verify --deep)."""
    for name, value in _PLAIN_LOG_ENV.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        silence_library_progress_bars()


def silence_library_progress_bars() -> None:
    """transformers' per-file progress bars would flood CI logs; our own progress covers the stages."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
