"""Shared fixtures: offline environment, a repo-local cache, tiny models and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never reach a model hub: fail fast instead of retrying for 20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Reference models are trained once per cache; a repo-local cache keeps CI runs and local runs
# separate from a user's own ~/.cache/trtconv.
os.environ.setdefault("TRTCONV_CACHE", str(REPO / ".cache" / "test-trtconv"))
# Builds in tests run cold (so determinism tests compare two real runs); the stage-cache tests
# (test_stage_cache.py) switch it back on with a cache folder of their own.
os.environ.setdefault("TRTCONV_NO_CACHE", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tests.factories import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from tests.factories import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_ref() -> Path:
    """The trained reference Llama (shipped with trtconv, pinned: trtconv/data/reference/llama-ref)."""
    from trtconv.data.reference_models import ensure_reference_model

    return ensure_reference_model("llama-ref")


@pytest.fixture(scope="session")
def qwen2_ref() -> Path:
    from trtconv.data.reference_models import ensure_reference_model

    return ensure_reference_model("qwen2-ref")


class CLI:
    """Runs the real Typer app in-process; returns (exit code, stdout, stderr)."""

    def __call__(self, *args: str):
        from typer.testing import CliRunner

        from trtconv.cli.app import app

        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result


@pytest.fixture
def cli() -> CLI:
    return CLI()
