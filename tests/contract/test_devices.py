"""`--gpus N` (trtconv.stages.devices): the split conversion writes the bytes of the one-device run.

Simulated devices on the CPU (threads standing in for GPUs): the layer pipeline, the hand-off of
activations batch by batch, AWQ's one-at-a-time calibration, the parallel rank merge and the
evaluation's split of the batches all run as on N GPUs, with real ModelOpt calibration on a real
(tiny, random) Llama of 5 layers. Nothing here is a GPU measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.contract.test_streaming import _assert_same_checkpoint, _recipe
from trtconv.core.ui import Reporter
from trtconv.stages.devices import Devices


@pytest.fixture(scope="module")
def llama5(tmp_path_factory) -> Path:
    from tests.factories import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama5"), "llama", num_hidden_layers=5)


def _simulated(n: int) -> Devices:
    return Devices(("cpu",) * n, simulated=True)


def _streamed(tmp_path: Path, recipe, devices: Devices | None, name: str):
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import calibration_rows
    from trtconv.pipeline import run_calibrate_and_export

    model_dir = Path(recipe.model.path)
    tok = load_tokenizer(model_dir, False)
    c = recipe.calibration
    rows = calibration_rows(builtin_pack("calib"), tok, c.num_samples, c.seq_len, c.seed)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    exported, record, stages = run_calibrate_and_export(recipe, model_dir, arch, tok, rows, tmp_path / name, "cpu",
                                                        Reporter(quiet=True), streamed=True, devices=devices)
    return exported.checkpoint_dir, record, stages[0]


@pytest.mark.slow
@pytest.mark.parametrize("precision,kv,tp,n", [("fp8", "fp8", 2, 2), ("fp8", "none", 1, 3), ("int4_awq", "fp8", 1, 2),
                                               ("int4_awq", "none", 2, 3), ("int8_sq", "none", 1, 2)])
def test_split_calibration_writes_the_one_device_bytes(tmp_path, llama5, precision, kv, tp, n):
    recipe = _recipe(llama5, precision, kv, tp=tp)
    one, one_record, _ = _streamed(tmp_path, recipe, None, "one")
    split, split_record, stage = _streamed(tmp_path, recipe, _simulated(n), "split")
    _assert_same_checkpoint(one, split)
    assert one_record["census"] == split_record["census"]
    assert stage.details["devices"] == {"count": n, "names": ["cpu"] * n, "simulated": True}
    assert len(stage.details["seconds"]["layers"]) == 5
    _assert_attention_restored()


def _assert_attention_restored() -> None:
    """ModelOpt's KV-cache attention swaps transformers' module-level attention function during each
    forward; layers calibrating at once used to leave its function installed for good."""
    import functools

    from transformers.models.llama import modeling_llama

    assert not isinstance(modeling_llama.eager_attention_forward, functools.partial)
    assert not any(isinstance(f, functools.partial) for f in modeling_llama.ALL_ATTENTION_FUNCTIONS.values())


def test_which_configs_calibrate_concurrently():
    from trtconv.recipe.schema import recipe_from_dict
    from trtconv.stages import calibrate
    from trtconv.stages.devices import calibrates_concurrently

    def cfg(precision: str, kv: str):
        q = recipe_from_dict({"name": "x", "model": {"path": "/tmp"},
                              "quantization": {"precision": precision, "kv_cache": kv, "awq_group_size": 64}}).resolved().quantization
        return calibrate.recipe_quant_config(q, [])

    assert calibrates_concurrently(cfg("fp8", "none")) and calibrates_concurrently(cfg("int8_sq", "none"))
    assert calibrates_concurrently(None) and calibrates_concurrently(cfg("fp8", "fp8"))  # attention: one_swap_at_a_time
    assert not calibrates_concurrently(cfg("int4_awq", "none")) and not calibrates_concurrently(cfg("w4a8_awq", "none"))


@pytest.mark.slow
def test_split_evaluation_gives_the_same_statistics(tmp_path, llama5):
    """Layers split over 3 simulated devices (a pipeline over the batches): every per-document statistic, token KL, weight error and
    gate verdict equals the one-device streamed evaluation's."""
    import numpy as np

    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import evaluation_rows
    from trtconv.stages.evaluate import evaluate_checkpoint

    recipe = _recipe(llama5, "fp8", "fp8")
    recipe = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
        "num_samples": 10, "seq_len": 64, "batch_size": 3})}).resolved()
    ckpt = _streamed(tmp_path, recipe, None, "ckpt")[0]
    e = recipe.evaluate
    tokens = evaluation_rows(builtin_pack("eval"), load_tokenizer(llama5, False), e.num_samples, e.seq_len, e.seed)
    runs = [evaluate_checkpoint(recipe, llama5, ckpt, tokens, "cpu", Reporter(quiet=True), streamed=True, devices=d)
            for d in (None, _simulated(3))]
    a, b = runs
    for field in ("n_tokens", "nll_baseline", "nll_candidate", "kl", "top1_agree", "token_kl"):
        np.testing.assert_array_equal(getattr(a.stats, field), getattr(b.stats, field), err_msg=field)
    assert [(g.metric, g.value, g.verdict) for g in a.gates] == [(g.metric, g.value, g.verdict) for g in b.gates]
    assert a.weight_errors == b.weight_errors and a.weight_errors


@pytest.mark.slow
@pytest.mark.integration
def test_cli_gpus_keeps_the_digest(cli, tmp_path, llama5, monkeypatch):
    """`calibrate --gpus 2` (2 simulated devices) against `--gpus 1`, both layer-streamed: the same
    artifact digest and metrics; the manifest says the split was simulated. Without the test variable
    the CPU refuses --gpus 2 with exit 2 and one line naming what is allowed."""
    common = ["--model", llama5, "--precision", "fp8", "--device", "cpu", "--num-samples", "8", "--seq-len", "64", "--json",
              "-q", "--set", "calibration.streaming=always", "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64",
              "--set", "evaluate.batch_size=2"]
    refused = cli("calibrate", *common, "-o", tmp_path / "refused", "--gpus", "2")
    assert refused.exit_code == 2
    assert "--gpus 2" in refused.stderr and "allowed: 1 to 1" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "refused").exists()
    monkeypatch.setenv("TRTCONV_SIMULATED_DEVICES", "2")
    runs = {}
    for gpus in ("1", "2"):
        res = cli("calibrate", *common, "-o", tmp_path / gpus, "--gpus", gpus)
        assert res.exit_code in (0, 1), res.stderr  # random weights: the gate may fail; the artifact is written
        runs[gpus] = json.loads(res.stdout)
        runs[gpus]["manifest"] = json.loads((Path(runs[gpus]["artifact"]) / "manifest.json").read_text())
    assert runs["2"]["artifact_digest"] == runs["1"]["artifact_digest"]
    assert runs["2"]["metrics"] == runs["1"]["metrics"]
    stages = {s["name"]: s for s in runs["2"]["manifest"]["stages"]}
    assert stages["calibrate"]["details"]["devices"]["simulated"] is True
    assert stages["evaluate"]["details"]["devices"]["count"] == 2
    assert "devices" not in {s["name"]: s for s in runs["1"]["manifest"]["stages"]}["calibrate"]["details"]
