"""Bad input: each mistake gets a clear message naming the file/key/value, a non-zero exit, no
traceback, and nothing half-written (an earlier good artifact is never replaced by a failed run)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

SMALL = ["--num-samples", "4", "--seq-len", "64", "--set", "evaluate.enabled=false"]


def assert_user_error(res, *fragments: str, code: int = 2) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in res.output, f"{f!r} not in {res.output!r}"


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_recipe_not_yaml(cli, tmp_path):
    r = tmp_path / "bad.yaml"
    r.write_text("name: [x\n")
    assert_user_error(cli("build", r, "-o", tmp_path / "o"), "bad.yaml: not valid YAML")


def test_recipe_unknown_key_and_wrong_type(cli, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\nmodel: {reference: llama-ref}\nquantization: {precision: fp8, kv: fp8}\ncalibration: {seed: abc}\n")
    res = cli("build", r, "-o", tmp_path / "o")
    assert_user_error(res, "unknown key 'kv' in quantization; allowed keys: precision, kv_cache", "calibration.seed")


def test_unknown_precision(cli, tiny_llama, tmp_path):
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp9", "-o", tmp_path / "o")
    assert_user_error(res, "quantization.precision", "'fp8'", "'int4_awq'", "(got 'fp9')")


def test_missing_model_folder(cli, tmp_path):
    res = cli("calibrate", "--model", tmp_path / "nope", "--precision", "fp8", "-o", tmp_path / "o")
    assert_user_error(res, f"model.path {tmp_path / 'nope'} does not exist")


def test_folder_without_config(cli, tmp_path):
    (tmp_path / "m").mkdir()
    res = cli("calibrate", "--model", tmp_path / "m", "--precision", "fp8", "-o", tmp_path / "o")
    assert_user_error(res, "has no config.json")


def test_unsupported_architecture(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (m / "config.json").write_text(json.dumps(cfg))
    res = cli("calibrate", "--model", m, "--precision", "fp8", "-o", tmp_path / "o")
    assert_user_error(res, "GPT2LMHeadModel", "is not supported; supported: LlamaForCausalLM")


def test_truncated_safetensors(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    res = cli("calibrate", "--model", m, "--precision", "fp8", "-o", tmp_path / "o")
    assert_user_error(res, "model.safetensors: truncated or corrupt safetensors file")


def test_garbage_safetensors(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"\x00" * 3)
    res = cli("calibrate", "--model", m, "--precision", "fp8", "-o", tmp_path / "o")
    assert_user_error(res, "model.safetensors: corrupt safetensors file")


def test_pickle_weights_are_refused(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    res = cli("calibrate", "--model", m, "--precision", "fp8", "-o", tmp_path / "o")
    assert_user_error(res, "no *.safetensors weight files", "pytorch_model.bin", "safetensors only")


def test_empty_calibration_data(cli, tiny_llama, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "--data", data, "-o", tmp_path / "o", *SMALL)
    assert res.exit_code == 2 and "empty.jsonl" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_text(cli, tiny_llama, tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 3}) + "\n")
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "--data", data, "-o", tmp_path / "o", *SMALL)
    assert_user_error(res, "short.jsonl has", "4 x 64 = 256 tokens are needed")


def test_seq_len_above_max_position_embeddings(cli, tiny_llama, tmp_path):
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "--seq-len", "1024", "-o", tmp_path / "o")
    assert_user_error(res, "calibration.seq_len = 1024 is above the model's max_position_embeddings = 512")


def test_awq_group_size_must_divide(cli, tmp_path):
    from tests.factories import make_tiny_model

    m = make_tiny_model(tmp_path / "m", "llama", intermediate_size=192)
    res = cli("calibrate", "--model", m, "--precision", "int4_awq", "-o", tmp_path / "o", "--set",
              "quantization.awq_group_size=128", *SMALL)
    assert_user_error(res, "down_proj (input dim 192)", "not a multiple of 128", "use awq_group_size 64")


def test_tp_must_divide_kv_heads(cli, tiny_llama, tmp_path):
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "--tp-size", "3", "-o", tmp_path / "o")
    assert_user_error(res, "export.tp_size = 3 does not divide the model's 2 KV heads; allowed tp sizes: 1, 2")


def test_existing_artifact_needs_force_and_survives_a_failed_run(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", out, *SMALL).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", out, *SMALL)
    assert_user_error(res, "already holds an artifact; pass --force")
    # --force, but the new run fails its gate: the good artifact stays, the failed one goes beside it.
    res = cli(
        "calibrate", "--model", tiny_llama, "--precision", "int4_awq", "-o", out, "--force",
        "--num-samples", "4", "--seq-len", "64", "--set", "evaluate.num_samples=8",
        "--set", "evaluate.seq_len=64", "--set", "evaluate.gates.max_kl=0",
    )
    assert res.exit_code == 1, res.output
    assert (out / "manifest.json").read_bytes() == before
    failed = json.loads((tmp_path / "out.failed" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "max_kl" in failed["status_reason"]
    no_leftovers(tmp_path)


def test_output_inside_a_file_is_refused(cli, tiny_llama, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", blocker / "out", *SMALL)
    assert_user_error(res, f"cannot create the folder {blocker}")


def test_non_artifact_folder_is_never_replaced(cli, tiny_llama, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", out, "--force", *SMALL)
    assert_user_error(res, "is not empty and holds no trtconv artifact")
    assert (out / "notes.txt").read_text() == "keep me"


# Ctrl-C in every window of a run: tests/e2e/test_interrupts.py (delivered at named points, not after a sleep).


def test_hub_model_offline_fails_fast_with_advice(cli, tmp_path):
    r = tmp_path / "hub.yaml"
    r.write_text("name: hub\nmodel:\n  hub_id: example-org/not-cached\n  revision: 0123456789abcdef\nquantization:\n  precision: fp8\n")
    t0 = time.monotonic()
    res = cli("build", r, "-o", tmp_path / "o")
    assert time.monotonic() - t0 < 30
    assert_user_error(res, "example-org/not-cached@0123456789abcdef is not in the local Hugging Face cache", "model.path")


def test_nvfp4_on_cpu_is_refused_before_any_work(cli, tmp_path, monkeypatch):
    # An empty cache: had the run got as far as loading, llama-ref would start training here.
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    res = cli("build", REPO / "recipes" / "llama-ref-nvfp4.yaml", "-o", tmp_path / "o", "--device", "cpu")
    assert_user_error(res, "quantization.precision 'nvfp4' needs a CUDA GPU", "amax must be a CUDA tensor", "fp8")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()
    doctor = cli("doctor", REPO / "recipes" / "llama-ref-nvfp4.yaml")
    assert "recipe plan: quantization.precision 'nvfp4' needs a CUDA GPU" in doctor.output
