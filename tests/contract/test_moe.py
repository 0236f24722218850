"""Mixture-of-experts families (Mixtral, Qwen3-MoE, DeepSeek-V3) through ModelOpt's unified HF export and the gate's executor.

Tiny random models from transformers' own config classes (tests/factories.py: 4 experts, top-2; Qwen3-MoE
with norm_topk_prob off and one dense layer; DeepSeek-V3 with latent attention, 8 experts in 2 groups, a shared
expert, a dense layer 0 and a non-zero e_score_correction_bias), calibrated by ModelOpt 0.47 for real, exported by
``export_hf_checkpoint`` (one tensor set per expert), run by trtconv's executor: the family's transformers
class, its own router, and ShippedExperts computing each expert from the shipped tensors. Checked:

- unquantized (transformers' own save_pretrained, which writes the same per-expert names), the executor
  is the original model: the expert layout, the name mapping and the routing are right;
- quantized (fp8, fp8 + FP8 KV cache where the family converts it), the executor's distance to the original
  agrees with ModelOpt's own fake-quant forward's (the ratio band of tests/contract/test_families.py);
- every expert projection is a ShippedLinear named ``...experts.<e>.<gate|up|down>_proj`` and has a
  weight error against the original's fused expert slice;
- one activation scale per layer's experts (the largest), as vLLM's FP8 MoE loads them;
- DeepSeek-V3: the router's e_score_correction_bias (a buffer) is read from the files, and q_a_proj /
  kv_a_proj_with_mqa are one GEMM (vLLM's fused_qkv_a_proj: one weight scale, the larger).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.contract.test_hf_checkpoint_executor import export_hf, rewrite_hf_tensor
from tests.exports import _one_thread, copy_checkpoint, hf_logits, make_model, quantize, rel_error, token_batches  # noqa: F401
from tests.factories import MOE_FAMILIES
from trtconv.architectures import ARCHITECTURES
from trtconv.checkpoints.hf_executor import (ShippedExperts, ShippedLinear, is_fused_experts, load_shipped_model,
                                             original_weights, shipped_weight_errors)

_ROWS = {a.family: a for a in ARCHITECTURES.values()}
# The FP8 KV cache only where the family's row converts it (DeepSeek-V3's latent attention: refused, see its row).
KV_CASES = [(arch, kv) for arch in MOE_FAMILIES for kv in (False, True) if not kv or _ROWS[arch].no_kv_cache_quant is None]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    models = {arch: make_model(root, arch) for arch in MOE_FAMILIES}
    for model in models.values():
        model.config.architectures = [type(model).__name__]
    return models


def _ids(model) -> torch.Tensor:
    return token_batches(model.config.vocab_size, count=1, batch=2, length=24, seed=7)[0]


def _first_moe_layer(model) -> tuple[int, torch.nn.Module]:
    """The first decoder layer holding experts and its fused experts module (DeepSeek-V3's layer 0 is dense)."""
    return next((i, layer.mlp.experts) for i, layer in enumerate(model.model.layers)
                if is_fused_experts(getattr(layer.mlp, "experts", torch.nn.Module())))


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_unquantized_checkpoint_runs_as_the_original(moe_models, tmp_path, arch):
    model = moe_models[arch]
    model.save_pretrained(tmp_path / "hf")
    shipped = load_shipped_model(tmp_path / "hf")
    assert any(isinstance(m, ShippedExperts) for m in shipped.model.modules())
    ids = _ids(model)
    assert rel_error(shipped.logits(ids), hf_logits(model, ids)) < 1e-5


@pytest.mark.parametrize("arch,kv", KV_CASES, ids=[f"{a}-{'fp8_kv' if kv else 'fp8'}" for a, kv in KV_CASES])
def test_executor_agrees_with_modelopt_fake_quant(moe_models, tmp_path, arch, kv):
    model = moe_models[arch]
    quantized = quantize(model, "fp8", kv_fp8=kv)
    shipped = load_shipped_model(export_hf(quantized, tmp_path / "hf"))
    ids = _ids(model)
    original = hf_logits(model, ids)
    executor_error = rel_error(shipped.logits(ids), original)
    fake_quant_error = rel_error(hf_logits(quantized, ids), original)
    assert fake_quant_error > 0.01  # the quantization is real
    assert 0.75 < executor_error / fake_quant_error < 1.33, (executor_error, fake_quant_error)
    errors = dict(shipped_weight_errors(shipped, model))
    layer, fused = _first_moe_layer(model)
    for e in range(fused.num_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert 0 < errors[f"model.layers.{layer}.mlp.experts.{e}.{proj}"] < 0.1, errors


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_weight_errors_from_the_original_files_name_every_expert(moe_models, tmp_path, arch):
    """The GPU's sequential evaluation reads the original weights from the model's files, where experts keep
    the family's hub names (Mixtral: block_sparse_moe.experts.<e>.w1/w3/w2): the errors equal the ones
    against the model object, experts included."""
    model = moe_models[arch]
    model.save_pretrained(tmp_path / "original")
    shipped = load_shipped_model(export_hf(quantize(model, "fp8"), tmp_path / "hf"))
    from_model = dict(shipped_weight_errors(shipped, model))
    from_files = dict(shipped_weight_errors(shipped, original_weights(tmp_path / "original")))
    layer, fused = _first_moe_layer(model)
    assert {f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(fused.num_experts)
            for p in ("gate_proj", "up_proj", "down_proj")} <= from_model.keys()
    assert from_files.keys() == from_model.keys()
    for name, error in from_model.items():
        assert from_files[name] == pytest.approx(error, rel=1e-5), name


def test_one_activation_scale_for_all_experts(moe_models, tmp_path):
    """An expert whose stored input_scale is raised moves every expert's activation rounding (the largest wins)."""
    model = moe_models["qwen3_moe"]
    hf_dir = export_hf(quantize(model, "fp8"), tmp_path / "hf")
    ids = _ids(model)
    before = load_shipped_model(hf_dir)
    raised = copy_checkpoint(hf_dir, tmp_path / "raised")  # a copy: the first model's tensors may map the file
    rewrite_hf_tensor(raised, "model.layers.0.mlp.experts.0.gate_proj.input_scale", lambda s: s * 8)
    rewrite_hf_tensor(raised, "model.layers.0.mlp.experts.0.up_proj.input_scale", lambda s: s * 8)
    after = load_shipped_model(raised)
    x = 10 * torch.randn(5, model.config.hidden_size)  # beyond 448 x the old scale: clipped there, not under the new one
    for e in (1, 2, 3):  # experts whose own tensors are unchanged
        name = f"model.layers.0.mlp.experts.{e}.gate_proj"
        old, new = (m.model.get_submodule(name) for m in (before, after))
        assert isinstance(new, ShippedLinear) and not torch.equal(old(x), new(x))
    assert not torch.equal(after.logits(ids), before.logits(ids))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_expert_without_calibration_tokens_is_counted_and_checked(tmp_path, arch):
    """A never-routed expert: counted (0 tokens), its ModelOpt weight amax is its own max |W| (data-free), so it
    passes; with that amax gone (as if ModelOpt had left it unset) the build stops naming the expert. (DeepSeek-V3:
    the expert kept out by its router's e_score_correction_bias, in layer 1, the first with experts; its other
    layers' experts may go without tokens too.)"""
    import modelopt.torch.quantization as mtq

    from tests.exports import load_bf16_exact_model, quant_config
    from tests.factories import make_moe_with_unrouted_expert
    from trtconv.core.errors import UncalibratedExperts
    from trtconv.stages.calibrate import ExpertTokens, check_experts

    model = load_bf16_exact_model(make_moe_with_unrouted_expert(tmp_path / "m", arch))
    layer, _ = _first_moe_layer(model)
    batches = token_batches(model.config.vocab_size)
    with ExpertTokens(model) as experts, torch.no_grad():
        mtq.quantize(model, quant_config("fp8"), lambda m: [m(ids) for ids in batches])
    unrouted = f"model.layers.{layer}.mlp.experts.4"
    assert unrouted in experts.without_tokens() and (arch != "mixtral" or experts.without_tokens() == [unrouted])
    assert sum(experts.counts[f"model.layers.{layer}.mlp"].tolist()) == 2 * sum(b.numel() for b in batches)
    check_experts(model, experts)
    fused = model.model.layers[layer].mlp.experts
    assert torch.allclose(fused.gate_up_proj_weight_quantizers[4].amax.float(), fused.gate_up_proj[4].abs().max().float())
    fused.down_proj_weight_quantizers[4].reset_amax()
    with pytest.raises(UncalibratedExperts, match=unrouted.replace(".", r"\.")):
        check_experts(model, experts)


def test_experts_kept_as_stored_give_the_same_logits(moe_models, tmp_path):
    """The GPU's way (stored expert weights, each gate/up pair dequantized when used) equals dense weights exactly."""
    model = moe_models["mixtral"]
    hf_dir = export_hf(quantize(model, "fp8", kv_fp8=True), tmp_path / "hf")
    ids = _ids(model)
    dense = load_shipped_model(hf_dir, keep_stored=False).logits(ids)
    assert torch.equal(load_shipped_model(hf_dir, keep_stored=True).logits(ids), dense)


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_one_expert_shipped_alone(moe_models, tmp_path, arch):
    """The per-expert sensitivity's module (gate/layer_streams.OneExpertShipped): the original's fused experts with
    one expert computed from the shipped tensors. From an unquantized checkpoint every such mix is the original;
    from an fp8 one, exactly the routed experts change the output, and the tokens counted are the ones routed."""
    from trtconv.gate.layer_streams import OneExpertShipped

    model = moe_models[arch]
    model.save_pretrained(tmp_path / "hf")
    export_hf(quantize(model, "fp8"), tmp_path / "fp8")
    _, fused = _first_moe_layer(model)
    fused = copy.deepcopy(fused).float()  # the stored bf16 weights upcast exactly, as the executor's are
    h = torch.randn(10, model.config.hidden_size)
    k = model.config.num_experts_per_tok
    idx = torch.stack([torch.randperm(fused.num_experts)[:k] for _ in range(10)])
    w = torch.softmax(torch.randn(10, k), -1)
    with torch.no_grad():
        want = fused(h, idx, w)
        for where, same in (("hf", True), ("fp8", False)):
            shipped = next(m for m in load_shipped_model(tmp_path / where).model.modules() if isinstance(m, ShippedExperts))
            for e in range(fused.num_experts):
                mix = OneExpertShipped(fused, shipped, e)
                got = mix(h, idx, w)
                routed = int((idx == e).sum())
                assert mix.tokens == routed
                changed = rel_error(got, want) > 1e-4
                assert (not changed) if (same or routed == 0) else changed, (where, e, routed)


def test_deepseek_router_bias_comes_from_the_files(moe_models, tmp_path):
    """DeepSeek-V3's routers add e_score_correction_bias, a persistent buffer the shell builds as zeros: the executor
    reads it from the files (left at zero, the unquantized checkpoint's logits were 0.35 away from the original's)."""
    model = moe_models["deepseek_v3"]
    model.save_pretrained(tmp_path / "hf")
    shipped = load_shipped_model(tmp_path / "hf")
    layer, _ = _first_moe_layer(model)
    name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    want = model.get_buffer(name)
    assert want.abs().max() > 0 and torch.equal(shipped.model.get_buffer(name), want.float())


def test_deepseek_fused_qkv_a_proj_shares_one_weight_scale(moe_models, tmp_path):
    """vLLM runs q_a_proj and kv_a_proj_with_mqa as one GEMM (fused_qkv_a_proj) with one FP8 weight scale, the larger:
    ModelOpt writes two, so the row's fused_groups has the executor requantize both. Raising kv_a_proj_with_mqa's
    weight_scale moves q_a_proj's effective weight (whose own tensors are unchanged); o_proj stays as it was."""
    model = moe_models["deepseek_v3"]
    hf_dir = export_hf(quantize(model, "fp8"), tmp_path / "hf")
    before = load_shipped_model(hf_dir)
    raised = copy_checkpoint(hf_dir, tmp_path / "raised")
    rewrite_hf_tensor(raised, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale", lambda s: s * 8)
    after = load_shipped_model(raised)
    weight = lambda m, n: m.model.get_submodule(f"model.layers.0.self_attn.{n}").effective_weight()  # noqa: E731
    assert not torch.equal(weight(before, "q_a_proj"), weight(after, "q_a_proj"))
    assert torch.equal(weight(before, "o_proj"), weight(after, "o_proj"))
