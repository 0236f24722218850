"""The house rules, checked: the package listing names the pipeline's parts, every stage has the same
small face (NAME, what its cache key covers, run), no stage imports another, and only the CLI talks
Typer. A newcomer reads one stage without opening the others; these tests keep it so."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "trtconv"
PARTS = {"cli", "recipe", "stages", "engine", "checkpoints", "gate", "data", "cache", "artifact", "core"}
STAGES = ("load", "calibrate", "export", "engine", "evaluate")
# Modules in stages/ that are one stage's other half, and the stages whose helpers they may use:
# the layer-by-layer path of the calibrate + export unit (its unified HF writer in streamed_hf), and the
# layer-by-layer evaluation.
STAGE_HALVES = {"streamed": {"calibrate", "export", "streamed_hf"}, "streamed_hf": set(), "evaluate_streamed": set(),
                # the split over several devices (--gpus), driving the two layer-streamed halves
                "devices": {"streamed", "evaluate_streamed"},
                # precision auto's path of the calibrate + export unit: every candidate calibrated, the mix exported,
                # its trials measured on evaluation-pack documents the gate does not use (load's data_packs)
                "search": {"calibrate", "export", "load"}}
ALLOWED_STAGE_IMPORTS = {"evaluate": {"evaluate_streamed"}, **STAGE_HALVES}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_listing_names_the_pipeline_parts():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == PARTS
    for part in PARTS:  # each part says what it is
        assert ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())), part


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_the_same_small_face(name):
    module = importlib.import_module(f"trtconv.stages.{name}")
    assert module.NAME == name
    assert callable(module.run)
    assert isinstance(module.CACHE_KEY_COVERS, tuple)
    assert module.__doc__ and len(module.__doc__.strip()) > 40  # a reason, not a title


def test_cached_stages_say_what_their_key_covers():
    from trtconv.stages import evaluate, export

    assert "calibration data sha256" in export.CACHE_KEY_COVERS and "versions" in export.CACHE_KEY_COVERS
    assert "export key" in evaluate.CACHE_KEY_COVERS and "engine files" in evaluate.CACHE_KEY_COVERS
    assert export.EXPORT_STAGE == export.NAME and evaluate.EVALUATE_STAGE == evaluate.NAME


@pytest.mark.parametrize("path", sorted((PACKAGE / "stages").glob("*.py")), ids=lambda p: p.stem)
def test_no_stage_imports_another(path):
    own = path.stem
    others = {m.split(".")[2] for m in _imported_modules(path) if m.startswith("trtconv.stages.") and len(m.split(".")) > 2}
    others -= {"base", own}
    assert others <= ALLOWED_STAGE_IMPORTS.get(own, set()), f"stages/{own}.py imports stages {sorted(others)}"


def test_only_the_cli_talks_typer():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.parent.name != "cli" and any(m == "typer" or m.startswith("typer.") for m in _imported_modules(p))]
    assert offenders == []
