"""The checkpoint contract against real ModelOpt 0.47 exports, and the validator's error messages."""

from __future__ import annotations

import pytest
import torch

from tests.exports import _one_thread  # noqa: F401  (shared fixture)
from tests.exports import (
    AWQ_TP2_SIZES,
    copy_checkpoint,
    edit_config,
    export_trtllm,
    make_model,
    quantize,
    rewrite_tensor,
)
from trtconv.core.errors import CheckpointError, UserError
from trtconv.checkpoints.trtllm_format import (
    SUPPORTED_QUANT_ALGOS,
    expected_tensors,
    validate_checkpoint,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("hf"), "llama")


@pytest.fixture(scope="module")
def llama_tp2(llama, tmp_path_factory):
    """Unquantized llama, tp 2: the base every corruption test copies."""
    return export_trtllm(quantize(llama, "none"), tmp_path_factory.mktemp("tp2") / "ckpt", tp=2)


# ------------------------------------------------------------------------------------------
# The tables match what ModelOpt really writes
# ------------------------------------------------------------------------------------------

EXPORT_CASES = {
    # name: (arch, precision, kv_fp8, tp, pp, sizes)
    "qwen2_none_tp2": ("qwen2", "none", False, 2, 1, {}),
    "llama_fp8_kv_tp2": ("llama", "fp8", True, 2, 1, {}),
    "llama_int8_sq_tp2": ("llama", "int8_smoothquant", False, 2, 1, {}),
    "llama_int4_awq_tp1": ("llama", "int4_awq", False, 1, 1, {}),
    "llama_w4a8_awq_tp2": ("llama", "w4a8_awq_beta", True, 2, 1, AWQ_TP2_SIZES),
    "llama_none_tp2_pp2": ("llama", "none", False, 2, 2, {}),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_real_exports_validate_without_extra_tensors(case, llama, tmp_path):
    arch, precision, kv_fp8, tp, pp, sizes = EXPORT_CASES[case]
    model = llama if (arch == "llama" and not sizes) else make_model(tmp_path, arch, **sizes)
    ckpt = export_trtllm(quantize(model, precision, kv_fp8=kv_fp8), tmp_path / "ckpt", tp=tp, pp=pp)
    report = validate_checkpoint(ckpt)
    assert report.extra_tensors == {}
    assert (report.tp_size, report.pp_size) == (tp, pp)
    assert report.quant_algo == {"none": None, "fp8": "FP8", "int8_smoothquant": "W8A8_SQ_PER_CHANNEL",
                                 "int4_awq": "W4A16_AWQ", "w4a8_awq_beta": "W4A8_AWQ"}[precision]
    assert report.kv_cache_quant_algo == ("FP8" if kv_fp8 else None)
    assert sorted(report.tensors_per_rank) == list(range(tp * pp))
    for rank, size in report.bytes_per_rank.items():
        file_size = (ckpt / f"rank{rank}.safetensors").stat().st_size
        assert 0.8 * file_size < size <= file_size  # the rest is the JSON header


def test_expected_tensors_sharding_rules():
    """tp 2 x pp 2 on a config with an odd vocab and GQA: sizes derived, not measured."""
    config = {
        "architecture": "Qwen2ForCausalLM", "dtype": "bfloat16", "vocab_size": 1001, "hidden_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512,
        "use_parallel_embedding": True, "embedding_sharding_dim": 0,
        "mapping": {"world_size": 4, "tp_size": 2, "pp_size": 2},
        "quantization": {"quant_algo": "W8A8_SQ_PER_CHANNEL", "kv_cache_quant_algo": "FP8"},
    }
    first_stage, last_stage = expected_tensors(config, 1), expected_tensors(config, 3)
    assert first_stage["transformer.vocab_embedding.weight"].shape == (501, 256)  # ceil(1001/2)
    assert "lm_head.weight" not in first_stage and "transformer.ln_f.weight" not in first_stage
    assert last_stage["lm_head.weight"].shape == (501, 256)
    assert "transformer.vocab_embedding.weight" not in last_stage
    # layers are numbered locally per stage: 2 per stage
    assert "transformer.layers.1.attention.qkv.weight" in last_stage
    assert "transformer.layers.2.attention.qkv.weight" not in last_stage
    head = 256 // 8
    qkv = last_stage["transformer.layers.0.attention.qkv.weight"]
    assert (qkv.dtype, qkv.shape) == ("I8", ((8 // 2 + 2 * 2 // 2) * head, 256))
    assert last_stage["transformer.layers.0.attention.qkv.bias"].shape == (qkv.shape[0],)
    assert last_stage["transformer.layers.0.attention.qkv.weights_scaling_factor"].shape == (qkv.shape[0],)
    assert last_stage["transformer.layers.0.mlp.proj.prequant_scaling_factor"].shape == (256,)
    assert last_stage["transformer.layers.0.mlp.proj.weight"].shape == (256, 256)
    assert last_stage["transformer.layers.0.attention.dense.weight"].shape == (256, 128)
    assert last_stage["transformer.layers.0.attention.kv_cache_scaling_factor"].required
    assert not last_stage["transformer.layers.0.attention.k_cache_scaling_factor"].required


# ------------------------------------------------------------------------------------------
# Validator: every problem named
# ------------------------------------------------------------------------------------------


def _error(ckpt) -> str:
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(ckpt)
    assert isinstance(info.value, UserError)
    return str(info.value)


def test_valid_checkpoint_passes(llama_tp2):
    report = validate_checkpoint(llama_tp2)
    assert report.num_tensors == 2 * (3 + 2 * 7)  # embedding, ln_f, lm_head + 7 per layer
    assert report.architecture == "LlamaForCausalLM"


def test_missing_rank_file(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    (ckpt / "rank1.safetensors").unlink()
    message = _error(ckpt)
    assert "rank1.safetensors" in message and "missing" in message


def test_extra_rank_file(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    (ckpt / "rank2.safetensors").write_bytes((ckpt / "rank1.safetensors").read_bytes())
    assert "rank2.safetensors: unexpected rank file" in _error(ckpt)


def test_truncated_safetensors(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    path = ckpt / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _error(ckpt)
    assert "rank0.safetensors" in message and "truncated or corrupt" in message


def test_wrong_shape(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    name = "transformer.layers.1.mlp.proj.weight"
    rewrite_tensor(ckpt, 1, name, lambda t: t[:, :-2])
    message = _error(ckpt)
    assert f"rank1.safetensors: tensor {name} has shape [128, 126], expected [128, 128]" in message


def test_wrong_dtype(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    name = "transformer.ln_f.weight"
    rewrite_tensor(ckpt, 0, name, lambda t: t.to(torch.float16))
    assert f"tensor {name} has dtype F16, expected BF16" in _error(ckpt)


def test_all_problems_are_listed(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    rewrite_tensor(ckpt, 0, "transformer.ln_f.weight", lambda t: t.to(torch.float16))
    (ckpt / "rank1.safetensors").unlink()
    edit_config(ckpt, lambda c: c.pop("rotary_base"))
    message = _error(ckpt)
    assert "3 problem(s)" in message
    assert "rank1.safetensors" in message and "transformer.ln_f.weight" in message and "rotary_base" in message


def test_missing_tensor(llama_tp2, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    tensors = load_file(ckpt / "rank0.safetensors")
    del tensors["transformer.layers.0.attention.qkv.weight"]
    save_file(tensors, ckpt / "rank0.safetensors")
    assert "tensor transformer.layers.0.attention.qkv.weight missing (expected BF16 [128, 128])" in _error(ckpt)


def test_extra_tensor_is_reported_not_fatal(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    rewrite_tensor(ckpt, 0, "transformer.ln_f.weight", lambda t: t)  # keep the file valid
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "rank0.safetensors")
    tensors["transformer.unexpected.weight"] = torch.zeros(3)
    save_file(tensors, ckpt / "rank0.safetensors")
    assert validate_checkpoint(ckpt).extra_tensors == {0: ["transformer.unexpected.weight"]}


def test_missing_rotary_base_is_an_error(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    edit_config(ckpt, lambda c: c.pop("rotary_base"))
    message = _error(ckpt)
    assert "rotary_base" in message and "10000" in message


def test_unknown_quant_algo(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    edit_config(ckpt, lambda c: c["quantization"].update(quant_algo="MXFP8"))
    message = _error(ckpt)
    assert "quant_algo 'MXFP8'" in message and "config.json" in message
    for allowed in SUPPORTED_QUANT_ALGOS[1:]:
        assert allowed in message


def test_unsupported_architecture(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    edit_config(ckpt, lambda c: c.update(architecture="GPTNeoXForCausalLM"))
    message = _error(ckpt)
    assert "GPTNeoXForCausalLM" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message


def test_world_size_mismatch(llama_tp2, tmp_path):
    ckpt = copy_checkpoint(llama_tp2, tmp_path / "c")
    edit_config(ckpt, lambda c: c["mapping"].update(world_size=4))
    assert "mapping.world_size is 4 but tp_size*pp_size is 2*1=2" in _error(ckpt)


def test_missing_config(tmp_path):
    assert "config.json: missing" in _error(tmp_path)
