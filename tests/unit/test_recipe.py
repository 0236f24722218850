"""Recipe schema: every shipped recipe validates; every kind of mistake is named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtconv.core.errors import RecipeError
from trtconv.recipe.schema import (
    Recipe,
    apply_overrides,
    builtin_recipe_names,
    builtin_recipes_dir,
    json_schema,
    load_recipe,
)

MINIMAL = "name: t\nmodel:\n  reference: llama-ref\nquantization:\n  precision: fp8\n"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_every_shipped_recipe_validates(name):
    recipe, path = load_recipe(name)
    assert path.parent == builtin_recipes_dir()
    resolved = recipe.resolved()
    gates = resolved.evaluate.gates
    assert None not in (gates.max_kl, gates.max_ppl_increase_pct, gates.min_top1_agreement)


def test_recipes_folder_is_not_empty():
    names = builtin_recipe_names()
    assert "default" in names
    # One tested recipe per precision on the default model.
    precisions = {load_recipe(n)[0].quantization.precision for n in names}
    from trtconv.precisions import PRECISIONS

    assert precisions == set(PRECISIONS)


def test_not_yaml(tmp_path):
    p = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML"):
        load_recipe(p)


def test_not_a_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        load_recipe(p)


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    p = write(tmp_path, MINIMAL + "calibration:\n  num_sample: 5\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert "unknown key 'num_sample' in calibration" in msg
    assert "num_samples" in msg and "seq_len" in msg and str(p) in msg


def test_unknown_top_level_section(tmp_path):
    p = write(tmp_path, MINIMAL + "quantisation: {}\n")
    with pytest.raises(RecipeError, match="unknown key 'quantisation' in the top level; allowed keys: schema_version, name"):
        load_recipe(p)


def test_wrong_type(tmp_path):
    p = write(tmp_path, MINIMAL + "calibration:\n  seq_len: long\n")
    with pytest.raises(RecipeError, match=r"calibration\.seq_len: Input should be a valid integer.*'long'"):
        load_recipe(p)


def test_unknown_precision_lists_the_allowed(tmp_path):
    p = write(tmp_path, MINIMAL.replace("fp8", "fp4"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    for allowed in ("'none'", "'fp8'", "'int8_sq'", "'int4_awq'", "'w4a8_awq'"):
        assert allowed in str(exc.value)


def test_model_needs_exactly_one_source(tmp_path):
    p = write(tmp_path, "name: t\nmodel:\n  path: a\n  reference: llama-ref\nquantization:\n  precision: fp8\n")
    with pytest.raises(RecipeError, match="exactly one of model.path"):
        load_recipe(p)


def test_hub_model_needs_a_revision(tmp_path):
    p = write(tmp_path, "name: t\nmodel:\n  hub_id: org/m\nquantization:\n  precision: fp8\n")
    with pytest.raises(RecipeError, match="needs model.revision"):
        load_recipe(p)


def test_pytorch_target_needs_the_hf_checkpoint(tmp_path):
    p = write(tmp_path, MINIMAL + "engine:\n  target: pytorch\n")
    with pytest.raises(RecipeError, match="export.hf_checkpoint: true"):
        load_recipe(p)


def test_overrides_are_typed_and_checked(tmp_path):
    p = write(tmp_path, MINIMAL)
    recipe, _ = load_recipe(p, ["calibration.num_samples=256", "quantization.kv_cache=fp8", "export.hf_checkpoint=true"])
    assert recipe.calibration.num_samples == 256
    assert recipe.quantization.kv_cache == "fp8"
    assert recipe.export.hf_checkpoint is True
    with pytest.raises(RecipeError, match="unknown key 'num_sample' in calibration; allowed keys: data, num_samples"):
        load_recipe(p, ["calibration.num_sample=3"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["calibration.num_samples"])


def test_relative_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", "name: t\nmodel:\n  path: ../model\nquantization:\n  precision: fp8\ncalibration:\n  data: data.jsonl\n")
    monkeypatch.chdir("/")
    recipe, _ = load_recipe(p)
    assert recipe.model.path == str((tmp_path / "model").resolve())
    assert recipe.calibration.data == str((tmp_path / "sub" / "data.jsonl").resolve())


def test_resolved_fills_precision_defaults_but_keeps_explicit_gates(tmp_path):
    p = write(tmp_path, MINIMAL.replace("fp8", "int4_awq") + "evaluate:\n  gates:\n    max_kl: 0.5\n")
    r = load_recipe(p)[0].resolved()
    assert r.evaluate.gates.max_kl == 0.5
    assert r.evaluate.gates.min_top1_agreement == 0.9  # int4_awq's shipped default
    assert r.sha256() == Recipe.model_validate(r.model_dump()).sha256()


def test_json_schema_covers_every_section():
    schema = json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) >= {"model", "quantization", "calibration", "export", "engine", "evaluate"}
    assert schema["additionalProperties"] is False


def test_missing_recipe_names_the_shipped_ones():
    with pytest.raises(RecipeError, match="shipped: .*default"):
        load_recipe("no-such-recipe")
