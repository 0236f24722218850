"""Every family of trtconv.architectures through ModelOpt's unified HF export and the gate's executor (tiny, CPU).

For each family's tiny random model (transformers' own config class, tests/factories.py) and each of
fp8, int4_awq and fp8 + FP8 KV cache: ModelOpt 0.47 calibrates it (fake quant), ``export_hf_checkpoint``
writes it, and trtconv's executor (checkpoints/hf_executor.py: the family's transformers class with the
shipped numerics swapped in) runs the files. Checked:

- unquantized, the executor is the original model (float32 rounding only): the structure is right;
- quantized, the executor's distance to the original agrees with ModelOpt's own fake-quant forward's
  (within 25 %): the runtime's fused-group rules (one activation scale per fused GEMM, FP8 weights
  requantized to the group's scale) move the logits by about as much as the quantization does, so
  the executor and fake quant differ by that much from each other, never by more;
- on Llama, Mistral and Qwen2 the executor equals the hand-written forward it replaces for this format.

Measured when written (relative logit error vs the original, executor / fake quant): qwen3 fp8 0.074 /
0.069, int4_awq 0.233 / 0.230; gemma3 fp8 0.128 / 0.116, int4_awq 0.395 / 0.413, fp8+kv 0.138 / 0.128;
gemma2 fp8 0.105 / 0.098; phi3 fp8 0.059 / 0.058, int4_awq 0.218 / 0.218.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.contract.test_hf_checkpoint_executor import export_hf
from tests.exports import _one_thread, hf_logits, make_model, quantize, rel_error, token_batches  # noqa: F401
from trtconv.checkpoints.hf_executor import ShippedLinear, load_shipped_model, shipped_weight_errors

NEW_FAMILIES = ("qwen3", "gemma3", "gemma2", "phi3")
CASES = [("fp8", False), ("int4_awq", False), ("fp8", True)]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: make_model(root, arch) for arch in (*NEW_FAMILIES, "llama", "mistral", "qwen2")}


def _ids(model) -> torch.Tensor:
    return token_batches(model.config.vocab_size, count=1, batch=2, length=24, seed=7)[0]


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_unquantized_export_runs_as_the_original(family_models, tmp_path, arch):
    model = family_models[arch]
    shipped = load_shipped_model(export_hf(quantize(model, "none"), tmp_path / "hf"))
    assert type(shipped.model).__name__ == type(model).__name__
    ids = _ids(model)
    assert rel_error(shipped.logits(ids), hf_logits(model, ids)) < 1e-5


@pytest.mark.parametrize("precision,kv", CASES, ids=["fp8", "int4_awq", "fp8_kv"])
@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_executor_agrees_with_modelopt_fake_quant(family_models, tmp_path, arch, precision, kv):
    model = family_models[arch]
    quantized = quantize(model, precision, kv_fp8=kv)
    hf_dir = export_hf(quantized, tmp_path / "hf")
    shipped = load_shipped_model(hf_dir)
    ids = _ids(model)
    original = hf_logits(model, ids)
    executor_error = rel_error(shipped.logits(ids), original)
    fake_quant_error = rel_error(hf_logits(quantized, ids), original)
    assert fake_quant_error > 0.01  # the quantization is real
    assert 0.75 < executor_error / fake_quant_error < 1.33, (executor_error, fake_quant_error)
    linears = [m for m in shipped.model.modules() if isinstance(m, ShippedLinear)]
    assert linears and all(isinstance(m, ShippedLinear) for m in _decoder_linears(shipped.model))
    errors = dict(shipped_weight_errors(shipped, model))
    assert errors and all(0 < e < 0.5 for name, e in errors.items() if "lm_head" not in name), errors


def _decoder_linears(model) -> list:
    return [m for n, m in model.named_modules() if ".layers." in n and n.rsplit(".", 1)[-1].endswith("proj")]


@pytest.mark.parametrize("arch,precision,kv", [("qwen3", "fp8", True), ("gemma3", "int4_awq", False)])
def test_weights_kept_as_stored_give_the_same_logits(family_models, tmp_path, arch, precision, kv):
    """The GPU's way (stored weights, a fused group dequantized when used) equals dense weights exactly."""
    model = family_models[arch]
    hf_dir = export_hf(quantize(model, precision, kv_fp8=kv), tmp_path / "hf")
    ids = _ids(model)
    dense = load_shipped_model(hf_dir, keep_stored=False).logits(ids)
    assert torch.equal(load_shipped_model(hf_dir, keep_stored=True).logits(ids), dense)


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_kv_cache_is_emulated_in_every_layer(family_models, tmp_path, arch, monkeypatch):
    """Every decoder layer's attention rounds K and V through FP8 with that layer's own k_scale / v_scale
    (local and global layers alike), and the scales change the logits (the hook is live)."""
    from trtconv.checkpoints import hf_executor

    model = family_models[arch]
    hf_dir = export_hf(quantize(model, "fp8", kv_fp8=True), tmp_path / "hf")
    shipped = load_shipped_model(hf_dir)
    seen = []
    real_round_trip = hf_executor.fp8_round_trip
    monkeypatch.setattr(hf_executor, "fp8_round_trip", lambda x, s: seen.append(float(s)) or real_round_trip(x, s))
    ids = _ids(model)
    scaled = shipped.logits(ids)
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        stored = [float(f.get_tensor(f"model.layers.{i}.self_attn.{p}").float()) for i in range(model.config.num_hidden_layers)
                  for p in ("k_proj.k_scale", "v_proj.v_scale")]
    assert seen == stored  # K then V, layer after layer, each with its own scale
    unit = load_shipped_model(hf_dir, kv_cache_scales="unit").logits(ids)
    assert rel_error(scaled, unit) > 1e-4


def test_soft_capped_gemma2_original_runs_its_cap(tmp_path):
    """Gemma 2's original model (calibration and the gate's baseline) runs eager attention, the only one of
    transformers' that applies attn_logit_softcapping; sdpa silently drops it (the row's attn_implementation)."""
    from transformers import AutoModelForCausalLM

    from tests.factories import make_tiny_model
    from trtconv.checkpoints.hf_model import load_hf_model

    folder = make_tiny_model(tmp_path / "g2", "gemma2", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # scores up to the cap, as trained models reach it
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    model.save_pretrained(folder)
    ids = _ids(model)
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    sdpa = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    ours = load_hf_model(folder, "float32", False)
    assert rel_error(hf_logits(sdpa, ids), hf_logits(eager, ids)) > 0.05  # the cap matters here
    assert rel_error(hf_logits(ours, ids), hf_logits(eager, ids)) < 1e-6


def test_executor_refuses_a_model_type_of_another_family(family_models, tmp_path):
    """config.json's architectures pick the class; a model_type naming another family is an error, not a silent run."""
    import json

    from trtconv.core.errors import CheckpointError

    hf_dir = export_hf(quantize(family_models["qwen3"], "none"), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"model_type 'llama' does not match architectures \['Qwen3ForCausalLM'\]"):
        load_shipped_model(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    with pytest.raises(CheckpointError, match="shape"):
        load_shipped_model(hf_dir)


@pytest.mark.parametrize("arch", ("llama", "mistral", "qwen2"))
@pytest.mark.parametrize("precision,kv", [("fp8", True), ("int4_awq", False)], ids=["fp8_kv", "int4_awq"])
def test_executor_equals_the_hand_written_forward(family_models, tmp_path, arch, precision, kv):
    from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

    model = family_models[arch]
    hf_dir = export_hf(quantize(model, precision, kv_fp8=kv), tmp_path / "hf")
    ids = _ids(model)
    assert rel_error(load_shipped_model(hf_dir).logits(ids), load_hf_checkpoint_model(hf_dir).logits(ids)) < 1e-5


def test_gemma_norm_folding_is_judged(family_models, tmp_path):
    """Gemma's norms compute x * (1 + w): a stored norm weight that is off shows in the executor's logits."""
    from tests.contract.test_hf_checkpoint_executor import rewrite_hf_tensor

    model = family_models["gemma3"]
    hf_dir = export_hf(quantize(model, "none"), tmp_path / "hf")
    ids = _ids(model)
    before = load_shipped_model(hf_dir).logits(ids)
    rewrite_hf_tensor(Path(hf_dir), "model.norm.weight", lambda w: w + 1)  # as if (1+w) were stored as w
    assert rel_error(load_shipped_model(hf_dir).logits(ids), before) > 0.05
