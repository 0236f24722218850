"""The reference executor runs real ModelOpt 0.47 exports (tiny random models, CPU).

Comparisons are relative logit errors, never top-1: random models give near-uniform logits.
"Fake-quant" is ModelOpt's in-memory model AFTER export: the exporter unifies the q/k/v and
gate/up scales of the model in place, so only the post-export model is the checkpoint's twin.
"""

from __future__ import annotations

import pytest
import torch

from tests.exports import _one_thread, input_ids, models  # noqa: F401  (shared fixtures)
from tests.exports import (
    AWQ_TP2_SIZES,
    align_fake_quant_with_checkpoint,
    copy_checkpoint,
    edit_config,
    export_trtllm,
    hf_logits,
    make_model,
    quantize,
    rel_error,
    rewrite_tensor,
    token_batches,
)
from trtconv.checkpoints.trtllm_reader import (
    DEFAULT_ROTARY_BASE,
    load_checkpoint_model,
    unpack_int4_rows,
    weight_quantization_errors,
)




# ------------------------------------------------------------------------------------------
# Unquantized: the executor must be the original model, to float tolerance
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2])
def test_unquantized_export_reproduces_transformers(models, input_ids, tmp_path, arch, tp):
    model = models[arch]
    ckpt = export_trtllm(quantize(model, "none"), tmp_path / "ckpt", tp=tp)
    executor = load_checkpoint_model(ckpt)
    err = rel_error(executor.logits(input_ids), hf_logits(model, input_ids))
    assert err < 1e-4, f"{arch} tp{tp}: rel err {err:.2e}"


def test_pipeline_parallel_export_reproduces_transformers(models, input_ids, tmp_path):
    model = models["llama"]
    ckpt = export_trtllm(quantize(model, "none"), tmp_path / "ckpt", tp=2, pp=2)
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(4)]
    err = rel_error(load_checkpoint_model(ckpt).logits(input_ids), hf_logits(model, input_ids))
    assert err < 1e-4


@pytest.fixture(scope="module")
def llama_unquantized(models, tmp_path_factory):
    return export_trtllm(quantize(models["llama"], "none"), tmp_path_factory.mktemp("none") / "ckpt", tp=1)


def test_missing_rotary_base_diverges_like_trtllm_default(models, input_ids, llama_unquantized, tmp_path):
    """A dropped rope theta must cost accuracy: the executor falls back to 10000 like TensorRT-LLM."""
    model = models["llama"]
    reference = hf_logits(model, input_ids)
    broken = copy_checkpoint(llama_unquantized, tmp_path / "no_rope")
    edit_config(broken, lambda c: (c.pop("rotary_base"), c.pop("rotary_scaling")))
    executor = load_checkpoint_model(broken)
    assert executor.rotary_base == DEFAULT_ROTARY_BASE
    good_err = rel_error(load_checkpoint_model(llama_unquantized).logits(input_ids), reference)
    broken_err = rel_error(executor.logits(input_ids), reference)
    assert good_err < 1e-4
    assert broken_err > 100 * good_err and broken_err > 1e-3, f"{broken_err:.2e} vs {good_err:.2e}"


def test_rotary_scaling_is_applied(models, input_ids, llama_unquantized, tmp_path):
    """Dropping only the llama3 scaling must also show (positions beyond the high-frequency band)."""
    reference = hf_logits(models["llama"], input_ids)
    broken = copy_checkpoint(llama_unquantized, tmp_path / "no_scaling")
    edit_config(broken, lambda c: c.pop("rotary_scaling"))
    assert rel_error(load_checkpoint_model(broken).logits(input_ids), reference) > 1e-3


def test_logits_are_deterministic(llama_unquantized, input_ids):
    executor = load_checkpoint_model(llama_unquantized)
    assert torch.equal(executor.logits(input_ids), executor.logits(input_ids))


def test_unquantized_weight_errors_are_zero(models, llama_unquantized):
    errors = weight_quantization_errors(llama_unquantized, models["llama"])
    assert len(errors) == 2 * 7
    assert errors[0][0] == "model.layers.0.self_attn.q_proj"
    assert max(e for _, e in errors) < 1e-6


# ------------------------------------------------------------------------------------------
# Quantized: executor vs ModelOpt's fake-quant model vs a deliberately broken checkpoint
# ------------------------------------------------------------------------------------------

# precision, kv_fp8, tp, model sizes, tolerance vs the aligned fake-quant twin, vs plain fake-quant
QUANT_CASES = {
    "fp8": ("fp8", False, 1, {}, 1e-5, 1e-5),
    "fp8_kv_tp2": ("fp8", True, 2, {}, 1e-5, 0.15),
    "int8_sq": ("int8_smoothquant", False, 1, {}, 1e-2, 0.05),
    "int4_awq": ("int4_awq", False, 1, {}, 1e-5, 0.02),
    "w4a8_awq_tp2": ("w4a8_awq_beta", False, 2, AWQ_TP2_SIZES, 1e-5, 0.1),
}


@pytest.fixture(scope="module", params=list(QUANT_CASES))
def quant_case(request, models, tmp_path_factory):
    precision, kv_fp8, tp, sizes, twin_tol, plain_tol = QUANT_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    original = make_model(root, "llama", **sizes) if sizes else models["llama"]
    quantized = quantize(original, precision, kv_fp8=kv_fp8)
    ckpt = export_trtllm(quantized, root / "ckpt", tp=tp)
    ids = token_batches(original.config.vocab_size, count=1, batch=2, length=24, seed=7)[0]
    plain = hf_logits(quantized, ids)  # after export (see module docstring)
    align_fake_quant_with_checkpoint(quantized, ckpt)
    twin = hf_logits(quantized, ids)
    return dict(
        name=request.param, original=original, ckpt=ckpt, ids=ids, plain=plain, twin=twin,
        reference=hf_logits(original, ids), twin_tol=twin_tol, plain_tol=plain_tol,
    )


def test_executor_matches_fake_quant(quant_case):
    logits = load_checkpoint_model(quant_case["ckpt"]).logits(quant_case["ids"])
    vs_twin = rel_error(logits, quant_case["twin"])
    vs_plain = rel_error(logits, quant_case["plain"])
    vs_original = rel_error(logits, quant_case["reference"])
    print(f"{quant_case['name']}: vs twin {vs_twin:.2e}, vs fake-quant {vs_plain:.2e}, vs original {vs_original:.2e}")
    assert vs_twin < quant_case["twin_tol"]
    assert vs_plain < quant_case["plain_tol"]
    assert vs_original > 10 * vs_twin  # the quantization itself is visible


def test_weights_kept_as_stored_give_the_same_logits(quant_case):
    """On a GPU the executor keeps weights as stored and dequantizes each when used (no float32
    copy of the model); forced here on the CPU, it must compute exactly what the dense path does."""
    dense_model = load_checkpoint_model(quant_case["ckpt"], keep_stored=False)
    stored_model = load_checkpoint_model(quant_case["ckpt"], keep_stored=True)
    assert callable(stored_model.layers[0].qkv.weight) and not callable(dense_model.layers[0].qkv.weight)
    assert torch.equal(stored_model.logits(quant_case["ids"]), dense_model.logits(quant_case["ids"]))


def test_corrupt_weight_scale_moves_logits(quant_case, tmp_path):
    """One weights_scaling_factor x4 must move the logits far more than the executor's own error."""
    broken = copy_checkpoint(quant_case["ckpt"], tmp_path / "broken")
    rewrite_tensor(broken, 0, "transformer.layers.0.mlp.proj.weights_scaling_factor", lambda t: t * 4)
    good = rel_error(load_checkpoint_model(quant_case["ckpt"]).logits(quant_case["ids"]), quant_case["twin"])
    bad = rel_error(load_checkpoint_model(broken).logits(quant_case["ids"]), quant_case["twin"])
    print(f"{quant_case['name']}: good {good:.2e}, x4 scale {bad:.2e}")
    assert bad > 0.05 and bad > 20 * max(good, 1e-4)


def test_weight_errors_name_the_corrupted_layer(quant_case, tmp_path):
    broken = copy_checkpoint(quant_case["ckpt"], tmp_path / "broken")
    rewrite_tensor(broken, 0, "transformer.layers.1.attention.dense.weights_scaling_factor", lambda t: t * 4)
    errors = dict(weight_quantization_errors(quant_case["ckpt"], quant_case["original"]))
    assert 0 < max(errors.values()) < 0.25  # int4 on random weights: ~0.1
    broken_errors = weight_quantization_errors(broken, quant_case["original"])
    worst_name, worst = max(broken_errors, key=lambda item: item[1])
    assert worst_name == "model.layers.1.self_attn.o_proj" and worst > 1.0


def test_unpack_int4_low_nibble_is_even_row():
    # rows (out) 0..3 = [-8, 7, 1, -1] packed along out: byte0 = (7<<4)|(-8&0xF), byte1 = (-1<<4)|1
    packed = torch.tensor([[0x78], [0xF1 - 256]], dtype=torch.int8)
    assert unpack_int4_rows(packed).flatten().tolist() == [-8.0, 7.0, 1.0, -1.0]


def test_bf16_compute_is_close_to_fp32(llama_unquantized, input_ids):
    fp32 = load_checkpoint_model(llama_unquantized).logits(input_ids)
    bf16 = load_checkpoint_model(llama_unquantized, compute_dtype=torch.bfloat16).logits(input_ids)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert rel_error(bf16, fp32) < 0.05


def test_awq_export_pads_vocab_and_executor_keeps_it(quant_case):
    """AWQ exports pad the vocab to a multiple of 64; the padding rows are zero logits."""
    executor = load_checkpoint_model(quant_case["ckpt"])
    logits = executor.logits(quant_case["ids"])
    real_vocab = quant_case["original"].config.vocab_size
    assert logits.shape[-1] == executor.vocab_size
    if "awq" in quant_case["name"]:
        assert executor.vocab_size % 64 == 0 and executor.vocab_size > real_vocab
        assert torch.count_nonzero(logits[..., real_vocab:]) == 0
