"""Layers left unquantized by quantization.exclude, as ModelOpt 0.47 exports them (issue 23, item 2).

The failed gate's advice is an exclude list such as ['*lm_head*', '*layers.0.*']. ModelOpt then
writes layer 0 in the model dtype without scales and names it in config.json's
quantization.exclude_modules ('transformer.layers.0*'). The validator and the reference executor
must read that per linear, not from the checkpoint-wide quant_algo.
"""

from __future__ import annotations

import pytest

from tests.exports import (
    _one_thread,  # noqa: F401  (shared fixture)
    align_fake_quant_with_checkpoint,
    edit_config,
    export_trtllm,
    hf_logits,
    make_model,
    quantize,
    rel_error,
    token_batches,
)
from trtconv.checkpoints.trtllm_format import validate_checkpoint
from trtconv.checkpoints.trtllm_reader import (
    load_checkpoint_model,
    weight_quantization_errors,
)
from trtconv.core.errors import CheckpointError

ADVICE = ("*lm_head*", "*layers.0.*")  # what gate/sensitivity.py suggests (exclude_pattern)

# precision, kv_fp8, tp, pp, exclude
CASES = {
    "fp8_kv": ("fp8", True, 1, 1, ADVICE),
    "int4_awq": ("int4_awq", False, 1, 1, ADVICE),
    "int8_sq_tp2_o_proj": ("int8_smoothquant", False, 2, 1, ("*lm_head*", "*layers.1.mlp*", "*o_proj*")),
    "fp8_pp2_every_o_proj": ("fp8", False, 1, 2, ("*lm_head*", "*o_proj*")),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("hf"), "llama")


@pytest.fixture(scope="module", params=list(CASES))
def excluded(request, llama, tmp_path_factory):
    precision, kv_fp8, tp, pp, exclude = CASES[request.param]
    quantized = quantize(llama, precision, kv_fp8=kv_fp8, exclude=exclude)
    ckpt = export_trtllm(quantized, tmp_path_factory.mktemp(request.param) / "ckpt", tp=tp, pp=pp)
    ids = token_batches(llama.config.vocab_size, count=1, batch=2, length=24, seed=7)[0]
    align_fake_quant_with_checkpoint(quantized, ckpt)
    return {"name": request.param, "ckpt": ckpt, "ids": ids, "twin": hf_logits(quantized, ids), "original": llama}


def test_checkpoint_with_excluded_layers_validates(excluded):
    report = validate_checkpoint(excluded["ckpt"])
    assert report.extra_tensors == {}


def test_executor_reads_excluded_layers_unquantized(excluded):
    """The executor computes what ModelOpt's fake-quant model computes, excluded layers included."""
    logits = load_checkpoint_model(excluded["ckpt"]).logits(excluded["ids"])
    tolerance = 1e-2 if "int8_sq" in excluded["name"] else 1e-5  # bf16 smoothing scales (test_reference_executor)
    assert rel_error(logits, excluded["twin"]) < tolerance


def test_excluded_layers_have_no_weight_error(excluded):
    errors = dict(weight_quantization_errors(excluded["ckpt"], excluded["original"]))
    if excluded["name"] in ("fp8_kv", "int4_awq"):
        assert all(errors[f"model.layers.0.{m}"] < 1e-2 for m in ("self_attn.q_proj", "mlp.down_proj"))  # bf16 rounding only
        assert errors["model.layers.1.self_attn.q_proj"] > 1e-2


def test_exclude_modules_still_bind(excluded, tmp_path):
    """Without exclude_modules the unquantized layers are an error again: the validator is not loosened."""
    import shutil

    if excluded["name"] != "int4_awq":
        pytest.skip("one case suffices")
    broken = tmp_path / "ckpt"
    shutil.copytree(excluded["ckpt"], broken)
    edit_config(broken, lambda c: c["quantization"].pop("exclude_modules"))
    with pytest.raises(CheckpointError, match=r"transformer\.layers\.0\.attention\.qkv\.weight has dtype BF16, expected I8"):
        validate_checkpoint(broken)


def test_one_layer_excluded_under_pipeline_parallelism_is_explained(llama, tmp_path):
    """ModelOpt writes one exclude_modules list (the last stage's, stage-local names) that TensorRT-LLM
    applies to every stage: a single excluded layer with pp 2 cannot be built, and the error says why."""
    ckpt = export_trtllm(quantize(llama, "fp8", exclude=ADVICE), tmp_path / "ckpt", pp=2)
    with pytest.raises(CheckpointError, match="mapping.pp_size 2, config.json holds one exclude_modules list"):
        validate_checkpoint(ckpt)


def test_exclude_modules_without_lm_head_is_an_error(excluded, tmp_path):
    """A non-empty exclude_modules replaces TensorRT-LLM's default list: without lm_head it would build the
    bf16 lm_head as quantized (the layer-streamed path once dropped it when the shell's one layer was excluded)."""
    import shutil

    if excluded["name"] != "fp8_kv":
        pytest.skip("one case suffices")
    broken = tmp_path / "ckpt"
    shutil.copytree(excluded["ckpt"], broken)
    edit_config(broken, lambda c: c["quantization"].update(exclude_modules=["transformer.layers.0*"]))
    with pytest.raises(CheckpointError, match="does not match 'lm_head': TensorRT-LLM would build lm_head as FP8"):
        validate_checkpoint(broken)


def test_layer_1_is_not_layer_10(tmp_path):
    """ModelOpt narrows 'transformer.layers.1*' to 'transformer.layers.1.*' when layer 10 is quantized; the
    validator matches the same way (fnmatchcase), so layer 10 is still expected quantized."""
    from safetensors import safe_open

    model = make_model(tmp_path, "llama", num_hidden_layers=11)
    ckpt = export_trtllm(quantize(model, "fp8", exclude=("*lm_head*", "*layers.1.*")), tmp_path / "ckpt")
    assert "transformer.layers.1.*" in read_config_json(ckpt)["quantization"]["exclude_modules"]
    validate_checkpoint(ckpt)
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        assert f.get_slice("transformer.layers.1.mlp.fc.weight").get_dtype() == "BF16"
        assert f.get_slice("transformer.layers.10.mlp.fc.weight").get_dtype() == "F8_E4M3"


def read_config_json(ckpt) -> dict:
    import json

    return json.loads((ckpt / "config.json").read_text())
