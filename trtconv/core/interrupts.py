"""Ctrl-C is never lost: a request is recorded before it is raised, and honoured at every boundary.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be. That
may be inside a dependency that swallows it: a bare ``except:`` or ``except BaseException`` in an
import, a ``__del__`` or weakref callback (whose exceptions Python prints and drops), or C code
that clears the error of a call it made (PyDict_GetItem does). Issue 23 saw one such run: Ctrl-C
while ModelOpt was being imported on its background thread, the run went on to the end and
exited 1 with a failed artifact written.

So the handler installed here first records the request, then raises as Python's own does. Every
boundary calls ``check()``: the start and end of each stage (StageMeter), each line a stage
reports, each calibration and evaluation step, the wait for the ModelOpt import, and the commit of
the artifact. A request that some dependency swallowed is raised again there, so the run stops at
the next boundary instead of running to the end. The artifact's rename is never interrupted
half-way (``deferred``): a request that comes during it is honoured right after, and the command
still exits 130. ``cli.app.main`` maps any exit of an interrupted command to 130, including
click's own "Aborted!" (exit 1) for a Ctrl-C outside the pipeline.

Tests deliver the signal at a named point instead of after a sleep (a sleep raced the background
import on a loaded 2-core CI host): ``TRTCONV_TEST_INTERRUPT_AT=<point>`` sends SIGINT to the
process the first time ``point()`` or ``check()`` is called with that name, from whatever thread
reaches it (the ModelOpt import thread, the heartbeat thread, the main thread);
``TRTCONV_TEST_INTERRUPT_SWALLOWED=1`` makes the delivery happen inside ``except BaseException: pass``,
as a dependency that swallows it would. Both variables are for tests only.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 130
TEST_POINT_ENV = "TRTCONV_TEST_INTERRUPT_AT"
TEST_SWALLOWED_ENV = "TRTCONV_TEST_INTERRUPT_SWALLOWED"

_requested = threading.Event()
_state = {"deferring": 0, "acknowledged": False, "delivered": False}


def on_signal(signum=None, frame=None) -> None:
    """The SIGINT (and SIGTERM) handler: record the request, then raise unless a commit is under way."""
    _requested.set()
    if not _state["deferring"]:
        raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT with on_signal (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)


def requested() -> bool:
    return _requested.is_set()


def acknowledge() -> None:
    """The run is ending because of the request and says so: stop raising it again."""
    _state["acknowledged"] = True


def acknowledged() -> bool:
    return bool(_state["acknowledged"])


def check(name: str | None = None) -> None:
    """A boundary: deliver a test interrupt named `name`, then raise KeyboardInterrupt on the main thread
    if an interrupt was requested and not yet acknowledged."""
    if name is not None:
        point(name)
    if (_requested.is_set() and not _state["acknowledged"] and not _state["deferring"]
            and threading.current_thread() is threading.main_thread()):
        raise KeyboardInterrupt


def point(name: str) -> None:
    """A named place where a test may deliver SIGINT (TRTCONV_TEST_INTERRUPT_AT); nothing otherwise."""
    if os.environ.get(TEST_POINT_ENV) != name or _state["delivered"]:
        return
    _state["delivered"] = True
    if os.environ.get(TEST_SWALLOWED_ENV) == "1":
        try:
            _deliver()
        except BaseException:  # noqa: BLE001, S110 - deliberately swallowed, as a dependency might
            pass
        return
    _deliver()


def _deliver() -> None:
    # On the main thread raise_signal runs the handler before it returns (synchronous, like a
    # Ctrl-C at exactly this line); from another thread the kernel picks the thread, as for a real one.
    if threading.current_thread() is threading.main_thread():
        signal.raise_signal(signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGINT)


@contextmanager
def deferred() -> Iterator[None]:
    """Within: a request is recorded, not raised (a rename must not stop half-way); check() after it."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
