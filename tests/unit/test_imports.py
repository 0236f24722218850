"""The early ModelOpt import's safety net (trtconv.core.imports): two threads importing at once can
make Python raise `_DeadlockError` in one of them; the main thread's loads then wait and retry once."""

from __future__ import annotations

import threading

import pytest

from trtconv.core import imports


class _DeadlockError(RuntimeError):  # the name importlib._bootstrap gives it
    pass


@pytest.fixture
def background(monkeypatch):
    done = threading.Thread(target=lambda: None)
    done.start()
    monkeypatch.setattr(imports, "_background", done)


def _flaky(error: BaseException):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            raise error
        return "model"

    return fn, calls


def _wrapped_deadlock() -> RuntimeError:
    """As transformers' lazy modules report it: a RuntimeError caused by the import's _DeadlockError."""
    try:
        try:
            raise _DeadlockError("deadlock detected by _ModuleLock('transformers.trainer')")
        except _DeadlockError as inner:
            raise RuntimeError("Failed to import transformers.trainer") from inner
    except RuntimeError as outer:
        return outer


def _half_imported() -> RuntimeError:
    """As seen in a loaded CI run: transformers' lazy module failed because importlib's _find_and_load met
    'accelerate' half imported (and then removed) by the background ModelOpt import: KeyError: 'accelerate'."""
    try:
        try:
            raise KeyError("accelerate")
        except KeyError as inner:
            raise RuntimeError("Failed to import transformers.generation.utils") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("error", [_DeadlockError("deadlock detected"), _wrapped_deadlock(), _half_imported(),
                                   ImportError("cannot import name 'dispatch_model' from partially initialized module")],
                         ids=["raw", "wrapped", "half_imported", "partially_initialized"])
def test_an_import_deadlock_is_retried_once_after_the_background_import(background, error):
    fn, calls = _flaky(error)
    assert imports.retry_after_import_deadlock(fn) == "model" and len(calls) == 2


def test_other_errors_are_not_retried(background):
    fn, calls = _flaky(RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        imports.retry_after_import_deadlock(fn)
    assert len(calls) == 1


def test_without_a_background_import_nothing_is_retried(monkeypatch):
    monkeypatch.setattr(imports, "_background", None)
    fn, calls = _flaky(_DeadlockError("deadlock detected"))
    with pytest.raises(_DeadlockError):
        imports.retry_after_import_deadlock(fn)
    assert len(calls) == 1
