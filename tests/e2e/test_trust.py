"""Issue 13, "trust what ships": no silently broken input (checkpoints, Hub, recipes, small cases).

Every test here failed on the code before the fix it covers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trtconv.core.errors import ModelError


# ---------------------------------------------------------------------------------------------
# 1. The load stage stops on missing, unexpected or mis-shaped tensors


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _inspect(model_dir: Path):
    from trtconv.recipe.schema import ModelSection
    from trtconv.stages import load

    return load.inspect_checkpoint(ModelSection(path=str(model_dir)))


def test_missing_tensors_stop_the_load_stage(tiny_llama, tmp_path):
    m = _copy_model(tiny_llama, tmp_path / "m")

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"], t["model.norm.weight"]

    _edit_tensors(m / "model.safetensors", drop)
    with pytest.raises(ModelError) as err:
        _inspect(m)
    msg = str(err.value)
    assert "2 missing" in msg
    assert "model.layers.1.mlp.up_proj.weight (expected [256, 128])" in msg
    assert "model.norm.weight (expected [128])" in msg


def test_wrong_shape_and_unexpected_tensor_are_named(tiny_llama, tmp_path):
    import torch

    m = _copy_model(tiny_llama, tmp_path / "m")

    def damage(t):
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(128, 64, dtype=torch.bfloat16)
        t["model.layers.9.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)

    _edit_tensors(m / "model.safetensors", damage)
    with pytest.raises(ModelError) as err:
        _inspect(m)
    msg = str(err.value)
    assert "model.layers.0.self_attn.o_proj.weight (expected [128, 128], found [128, 64] in model.safetensors)" in msg
    assert "unexpected: model.layers.9.extra.weight ([3] in model.safetensors)" in msg


def test_tied_embeddings_and_saved_rotary_buffers_are_accepted(tmp_path):
    import torch

    from tests.factories import make_tiny_model

    m = make_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    from safetensors import safe_open

    with safe_open(m / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    # Older checkpoints carry the (non-persistent) rotary inv_freq: transformers ignores it, so do we.
    _edit_tensors(m / "model.safetensors", lambda t: t.__setitem__("model.rotary_emb.inv_freq", torch.ones(16)))
    model_dir, _cfg, arch, weights = _inspect(m)
    assert arch == "LlamaForCausalLM" and [w.name for w in weights] == ["model.safetensors"]


def _sharded(tiny: Path, dst: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.save_pretrained(dst, max_shard_size="200KB")
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)
    assert (dst / "model.safetensors.index.json").is_file()
    return dst


def test_sharded_checkpoint_checks_every_shard(tiny_llama, tmp_path):
    m = _sharded(tiny_llama, tmp_path / "sharded")
    _model_dir, _cfg, _arch, weights = _inspect(m)
    assert len(weights) > 1
    index = json.loads((m / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    _edit_tensors(m / shard, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelError, match=r"1 missing: model\.layers\.1\.self_attn\.k_proj\.weight \(expected \[64, 128\]\)"):
        _inspect(m)


def test_index_naming_a_missing_shard_names_it(tiny_llama, tmp_path):
    m = _sharded(tiny_llama, tmp_path / "sharded")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (m / shard).unlink()
    with pytest.raises(ModelError, match=rf"names shard {shard}, not found in"):
        _inspect(m)


@pytest.mark.integration
def test_cli_refuses_a_checkpoint_missing_tensors_before_calibration(cli, tiny_llama, tmp_path):
    m = _copy_model(tiny_llama, tmp_path / "m")
    _edit_tensors(m / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    r = cli("calibrate", "--model", m, "--precision", "fp8", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "model.layers.1.mlp.up_proj.weight (expected [256, 128])" in r.output
    assert "calibrate:" not in r.output  # stopped in the load stage
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 5. Recipes: duplicate keys, booleans as integers, devices outside the allowed list


def _recipe_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_duplicate_recipe_key_is_refused_naming_key_and_both_lines(tmp_path):
    from trtconv.core.errors import RecipeError
    from trtconv.recipe.schema import load_recipe

    p = _recipe_file(tmp_path, "name: x\nmodel:\n  reference: llama-ref\nquantization:\n  precision: fp8\n"
                               "  kv_cache: none\n  precision: int4_awq\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'precision' at line 7 \(first at line 5\)"):
        load_recipe(p)


def test_duplicate_section_is_refused(tmp_path):
    from trtconv.core.errors import RecipeError
    from trtconv.recipe.schema import load_recipe

    p = _recipe_file(tmp_path, "name: x\nmodel:\n  reference: llama-ref\nquantization:\n  precision: fp8\n"
                               "model:\n  dtype: float32\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'model' at line 6 \(first at line 2\)"):
        load_recipe(p)


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    from trtconv.recipe.schema import safe_load_unique

    assert safe_load_unique("a: &x {k: 1}\nb:\n  <<: *x\n  k: 2\n") == {"a": {"k": 1}, "b": {"k": 2}}
    with pytest.raises(Exception, match="could not determine a constructor"):
        safe_load_unique("a: !!python/object/apply:os.system ['true']\n")


@pytest.mark.parametrize("override", ["export.tp_size=true", "calibration.seed=false",
                                      "evaluate.gates.max_kl=true", "engine.tensorrt.max_batch_size=true"])
def test_booleans_are_not_numbers(override):
    from trtconv.core.errors import RecipeError
    from trtconv.recipe.schema import load_recipe

    with pytest.raises(RecipeError, match=r"a boolean is not a number here; give a number \(got (True|False)\)"):
        load_recipe("default", [override])


def test_boolean_fields_still_take_booleans():
    from trtconv.recipe.schema import load_recipe

    r, _ = load_recipe("default", ["export.hf_checkpoint=true", "evaluate.allow_inconclusive=true"])
    assert r.export.hf_checkpoint is True and r.evaluate.allow_inconclusive is True


def test_cli_set_boolean_tp_size_exits_2(cli):
    r = cli("build", "default", "--set", "export.tp_size=true", "--dry-run")
    assert r.exit_code == 2
    assert "export.tp_size" in r.output and "boolean" in r.output


@pytest.mark.parametrize("command", [["build", "default", "--dry-run"], ["check", "nowhere"], ["verify", "nowhere"]])
def test_device_outside_allowed_values_is_refused(cli, command):
    r = cli(*command, "--device", "tpu")
    assert r.exit_code == 2
    assert "'tpu' is not one of 'auto', 'cpu', 'cuda'" in " ".join(r.output.replace("│", " ").split())


# ---------------------------------------------------------------------------------------------
# 2. A Hub model with the Hub unreachable: exit 2, one line, no traceback


@pytest.mark.integration
def test_unreachable_hub_is_exit_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    recipe = tmp_path / "hub.yaml"
    recipe.write_text("name: hub\nmodel:\n  hub_id: some-org/some-model\n  revision: 0123456789abcdef0123456789abcdef01234567\n"
                      "quantization:\n  precision: fp8\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    # Port 9 (discard) on the loopback: nothing listens, nothing leaves the machine.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, "-m", "trtconv", "build", str(recipe), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("error: cannot reach the Hugging Face Hub at http://127.0.0.1:9")
    assert "some-org/some-model@0123456789abcdef0123456789abcdef01234567" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert "Traceback" not in r.stderr + r.stdout


# ---------------------------------------------------------------------------------------------
# 6. Smaller cases


def test_missing_tokenizer_files_are_named(tiny_llama, tmp_path):
    from trtconv.checkpoints import hf_model as load

    m = _copy_model(tiny_llama, tmp_path / "m")
    (m / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"has no tokenizer vocabulary: none of tokenizer\.json, tokenizer\.model.*"
                                         r"\(found only tokenizer_config\.json\)"):
        load.load_tokenizer(m, trust_remote_code=False)


def test_short_calibration_sequences_warn(cli, tiny_llama, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the artifact folder would go")  # stops the run right after the warnings
    r = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "--seq-len", "1", "-o", blocker)
    assert r.exit_code == 2
    assert "warning: calibration.seq_len 1 is below 32" in r.output
    ok = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "--seq-len", "128", "-o", blocker)
    assert "warning: calibration.seq_len" not in ok.output


def test_cache_prune_refuses_negative_age(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    r = cli("cache", "prune", "--older-than", "-3", "--dry-run")
    assert r.exit_code == 2
    flat = " ".join(r.output.replace("│", " ").split())
    assert "Invalid value for '--older-than': Input should be greater than or equal to 0" in flat


def test_doctor_reports_a_cache_path_that_is_a_file(tmp_path, monkeypatch):
    from trtconv.cli.doctor import _cache_status

    cache_file = tmp_path / "cache"
    cache_file.write_text("not a folder")
    monkeypatch.setenv("TRTCONV_CACHE", str(cache_file))
    status, detail = _cache_status()
    assert status == "fail" and "is not writable" in detail and "is a file" in detail
    monkeypatch.setenv("TRTCONV_CACHE", str(cache_file / "below"))
    assert _cache_status()[0] == "fail"
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "new" / "cache"))
    assert _cache_status()[0] == "ok"


@pytest.mark.parametrize("version,expected", [
    (99, r"written by a newer trtconv \(manifest schema 99; this trtconv reads schema 1\): upgrade trtconv"),
    (0, r"schema_version 0 is not a trtconv manifest schema"),
    ("1", r"schema_version is '1'"),
    (None, r"schema_version is None"),
])
def test_manifest_of_another_schema_is_never_read_silently(cli, tmp_path, version, expected):
    from trtconv.artifact.manifest import read_manifest
    from trtconv.core.errors import ArtifactError

    art = tmp_path / "art"
    art.mkdir()
    data = {"trtconv_version": "9.0", "status": "passed", "new_field": {"x": 1}}
    if version is not None:
        data["schema_version"] = version
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=expected):
        read_manifest(art)
    r = cli("inspect", art)
    assert r.exit_code == 2 and "validation error" not in r.output


def test_data_pack_output_mode_follows_the_umask(cli, tmp_path):
    import os
    import stat

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(f"Document number {i} has some words in it, enough to be kept as a sample." for i in range(20)))
    out = tmp_path / "pack.jsonl"
    old = os.umask(0o022)
    try:
        r = cli("data", "pack", src, "-o", out, "--min-chars", "10")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_no_lock_file_is_left_beside_the_artifact(tmp_path):
    from trtconv.artifact.writer import ArtifactWriter
    from trtconv.core.errors import ArtifactError

    out = tmp_path / "OUT"
    with ArtifactWriter(out) as writer:
        (writer.tmp / "manifest.json").write_text("{}")
        assert (tmp_path / ".OUT.lock").exists()
        with pytest.raises(ArtifactError, match="another trtconv run is writing"):
            with ArtifactWriter(out, force=True):
                pass
        writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    with pytest.raises(RuntimeError):  # a failed run leaves no lock either
        with ArtifactWriter(tmp_path / "OTHER"):
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
