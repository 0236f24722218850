"""Pytest fixtures that put the TensorRT-LLM TEST DOUBLE on sys.path, PYTHONPATH and PATH.

Import the fixtures into a test module: `from tests.doubles.conftest_double import trtllm_double`.
Child processes (trtllm-build, the probe, the smoke check) see the double through PYTHONPATH;
the double's `trtllm-build` script runs under this venv's python3 (its bin dir goes on PATH too).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

DOUBLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = DOUBLES_DIR.parent.parent
DOUBLE_ENV_VARS = (
    "TRTCONV_DOUBLE_TRTLLM_VERSION",
    "TRTCONV_DOUBLE_TENSORRT_VERSION",
    "TRTCONV_DOUBLE_BUILD_CRASH_AFTER_RANK",
    "TRTCONV_DOUBLE_BUILD_SKIP_RANK",
    "TRTCONV_DOUBLE_LLM_FAIL",
)


def real_tensorrt_llm_installed() -> bool:
    """True only for the real package (never the double): gates @pytest.mark.tensorrt_llm tests."""
    spec = importlib.util.find_spec("tensorrt_llm")
    return spec is not None and spec.origin is not None and DOUBLES_DIR not in Path(spec.origin).resolve().parents


requires_real_tensorrt_llm = pytest.mark.skipif(not real_tensorrt_llm_installed(), reason="needs the real tensorrt_llm (not the test double)")


def _forget_imported_doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("tensorrt_llm", "tensorrt"):
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def trtllm_double(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The double (version 1.2.0 unless TRTCONV_DOUBLE_TRTLLM_VERSION is set) for this test only."""
    if real_tensorrt_llm_installed():
        pytest.skip("the real tensorrt_llm is installed; the double would shadow it")
    for var in DOUBLE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    python_path = [str(DOUBLES_DIR), str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    path = [str(DOUBLES_DIR / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.syspath_prepend(str(DOUBLES_DIR))
    _forget_imported_doubles(monkeypatch)
    yield DOUBLES_DIR
    _forget_imported_doubles(monkeypatch)


@pytest.fixture
def no_trtllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the double nor (the test is skipped otherwise) the real tensorrt_llm is importable."""
    if real_tensorrt_llm_installed():
        pytest.skip("the real tensorrt_llm is installed here")
    for var in ("PYTHONPATH",):
        monkeypatch.delenv(var, raising=False)
