"""The real CLI on the mixture-of-experts families' tiny models (CPU): converts, gates and checks on the
unified HF checkpoint; what is not converted is refused before any work (exit 2, naming what is allowed).

Plumbing only (random tiny models; gates relaxed as in tests/contract/test_families_cli.py). Asserted:
the gate judged the shipped experts through the family's own class, the manifest's calibrate record
counts the calibration tokens each expert received, the per-expert weight errors are named, `check`
re-judges the artifact, and AWQ / the legacy TensorRT-LLM checkpoint are refused before any output.
"""

from __future__ import annotations

import json

import pytest

from tests.contract.test_families_cli import FAST
from tests.factories import make_tiny_model

pytestmark = pytest.mark.integration
HF_CLASS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# (the first layer holding experts, its expert count): DeepSeek-V3's layer 0 is dense (first_k_dense_replace).
FIRST_MOE = {"mixtral": (0, 4), "qwen3_moe": (0, 4), "deepseek_v3": (1, 8)}
# Enabled weight quantizers: q/k/v/o (DeepSeek-V3: q_a, q_b, kv_a, kv_b, o) per layer, gate_up and down per expert,
# the dense MLP's three (Qwen3-MoE's layer 1, DeepSeek-V3's layer 0) and DeepSeek-V3's shared expert's three.
WEIGHT_QUANTIZERS = {"mixtral": 2 * (4 + 2 * 4), "qwen3_moe": 4 + 2 * 4 + 4 + 3, "deepseek_v3": 5 + 3 + 2 * (5 + 3 + 2 * 8)}


def _stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


@pytest.mark.parametrize("family,kv", [("mixtral", "fp8"), ("qwen3_moe", "none"), ("deepseek_v3", "none")])
def test_moe_family_converts_gates_and_checks(cli, tmp_path, family, kv):
    model = make_tiny_model(tmp_path / family, family)
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "--precision", "fp8", "--kv-cache", kv, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert manifest["export"]["checkpoint"] is None and manifest["export"]["hf_checkpoint"] == "hf_checkpoint"
    assert HF_CLASS[family] in manifest["evaluation"]["candidate"]
    experts = manifest["calibration"]["experts"]
    assert _stage(manifest, "calibrate")["details"]["experts"] == experts
    layer, count = FIRST_MOE[family]
    tokens = experts["tokens"][f"model.layers.{layer}.mlp"]
    assert len(tokens) == count and sum(tokens) == 2 * 4 * 64  # top-2 of every calibration token
    census = _stage(manifest, "calibrate")["details"]["quantizers"]  # covers every expert
    assert census["enabled"]["weight_quantizer"] == WEIGHT_QUANTIZERS[family]
    assert not census["invalid_amax"]
    quant = json.loads((out / "hf_checkpoint" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and quant.get("kv_cache_quant_algo") == ("FP8" if kv == "fp8" else None)
    checked = cli("check", out)
    assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize("precision", ["int4_awq", "w4a8_awq"])
def test_awq_on_experts_is_refused_before_work(cli, tmp_path, precision):
    model = make_tiny_model(tmp_path / "mixtral", "mixtral")
    res = cli("calibrate", "--model", model, "--precision", precision, "-o", tmp_path / "out", *FAST)
    assert res.exit_code == 2, res.output
    assert "MixtralForCausalLM" in res.output and precision in res.output and "allowed for MixtralForCausalLM: none, fp8" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,why", [("qwen3_moe", "Qwen3-MoE"), ("deepseek_v3", "not supported by TensorRT-LLM yet")])
def test_legacy_checkpoint_of_a_moe_family_is_refused_before_work(cli, tmp_path, family, why):
    model = make_tiny_model(tmp_path / family, family)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: q\nmodel: {{path: {model}}}\nquantization: {{precision: fp8}}\n")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "export.tensorrt_llm_checkpoint" in res.output and why in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision,kv,allowed", [("fp8", "fp8", "allowed for DeepseekV3ForCausalLM: none"),
                                                  ("none", "fp8", "allowed for DeepseekV3ForCausalLM: none"),
                                                  ("int4_awq", "none", "allowed for DeepseekV3ForCausalLM: none, fp8")])
def test_deepseek_refuses_before_work(cli, tmp_path, precision, kv, allowed):
    """DeepSeek-V3: an FP8 KV cache (latent attention caches a latent, not the k/v ModelOpt's scales describe) and
    AWQ (ModelOpt leaves its fused experts uncalibrated) are refused by the row before any work, as plan refuses them."""
    model = make_tiny_model(tmp_path / "deepseek_v3", "deepseek_v3")
    res = cli("calibrate", "--model", model, "--precision", precision, "--kv-cache", kv, "-o", tmp_path / "out", *FAST)
    assert res.exit_code == 2, res.output
    assert allowed in res.output and ("latent" in res.output if kv == "fp8" else "AWQ" in res.output)
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: d\nmodel: {{path: {model}}}\nquantization: {{precision: {precision}, kv_cache: {kv}}}\n"
                      "export: {tensorrt_llm_checkpoint: false, hf_checkpoint: true}\n")
    planned = cli("plan", recipe)
    assert planned.exit_code == 2 and allowed in planned.output, planned.output


def test_expert_without_calibration_tokens_is_named(cli, tmp_path):
    """A never-routed expert is calibrated data-free (its own weights; the layer's input scale), recorded and warned about."""
    from tests.factories import make_moe_with_unrouted_expert

    model = make_moe_with_unrouted_expert(tmp_path / "mixtral")
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    assert "model.layers.0.mlp.experts.4" in res.output and "no calibration token" in res.output
    experts = json.loads((out / "manifest.json").read_text())["calibration"]["experts"]
    assert experts["without_tokens"] == ["model.layers.0.mlp.experts.4"] and experts["tokens"]["model.layers.0.mlp"][4] == 0


def test_kv_cache_only_on_a_moe_family(cli, tmp_path):
    """precision none with an FP8 KV cache: experts stay unquantized (no size claim), the cache scales are judged."""
    model = make_tiny_model(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "--precision", "none", "--kv-cache", "fp8", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "passed" and "MixtralForCausalLM" in manifest["evaluation"]["candidate"]
    quant = json.loads((out / "hf_checkpoint" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] is None and quant["kv_cache_quant_algo"] == "FP8"


def test_a_missing_expert_tensor_is_named_by_the_load_stage(tmp_path):
    """The load stage compares per-expert tensors with transformers 5's fused parameters: complete experts
    pass; one expert's tensor gone leaves that layer's experts unfolded and named, before any work."""
    from safetensors.torch import load_file, save_file

    from trtconv.core.errors import ModelError
    from trtconv.recipe.schema import ModelSection
    from trtconv.stages.load import inspect_checkpoint

    model = make_tiny_model(tmp_path / "mixtral", "mixtral")
    assert inspect_checkpoint(ModelSection(path=str(model)))[2] == "MixtralForCausalLM"
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"missing: model\.layers\.1\.mlp\.experts\.down_proj .*unexpected: .*model\.layers\.1\.block_sparse_moe\.experts\.0\.w1\.weight"):
        inspect_checkpoint(ModelSection(path=str(model)))
