"""`quantization.precision: auto` (trtconv/stages/search.py) on tiny models, CPU, real ModelOpt.

What is asserted: a per-unit mix (one fused GEMM, or a MoE block) assembled from the candidates' calibrated
copies is exported by ModelOpt as MIXED_PRECISION, the reference executor reads each linear in its own unit's format and
runs it as accurately as ModelOpt's fake-quant forward of the same mix; a whole auto build records its
trials and is judged by the shipped gate; when no trial passes the build exits 1 with the closest
candidate written and marked failed; an unchanged recipe reuses the search from the stage cache.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.factories import PLUMBING_ARGS, make_tiny_model, tiny_config

pytestmark = pytest.mark.integration

AUTO = ["--precision", "auto", "--candidates", "int4_awq,fp8,none", "--set", "engine.target=none",
        "--set", "quantization.search.max_trials=3"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# One mix per family kind, each format meeting each family's rules: Phi-3's fused linears in the files; Gemma 3's
# local layers (0, 1) and its global one (2), scaled embeddings; a MoE family (fp8 and 16-bit only:
# architectures.Experts.precisions) with a MoE block as one unit, on MoE layers (0, 2) and dense ones (1, 3) alike.
# Unit k of layer i takes formats[(k + i) % len(formats)]: a layer's attention and MLP differ, and so do its units
# from one layer to the next. The factory's overrides make those layers.
MIXES = {"llama": (["int4_awq", "fp8", "none", "fp8"], {"num_hidden_layers": 4}),
         "phi3": (["int4_awq", "fp8", "none", "fp8"], {"num_hidden_layers": 4}),
         "gemma3": (["int4_awq", "none", "fp8"], {}),
         "qwen3_moe": (["fp8", "fp8", "none", "none"], {"num_hidden_layers": 4, "mlp_only_layers": [1, 3]})}


@pytest.mark.parametrize("family", list(MIXES))
def test_mixed_checkpoint_is_read_layer_by_layer_and_runs_like_fake_quant(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from trtconv.architectures import ARCHITECTURES
    from trtconv.checkpoints.hf_executor import load_shipped_model
    from trtconv.checkpoints.hf_reader import HFTensors, read_linear, read_quantization
    from trtconv.core.ui import Reporter
    from trtconv.data.samples import TokenSet
    from trtconv.recipe.schema import recipe_from_dict
    from trtconv.stages import export, search

    row = next(a for a in ARCHITECTURES.values() if a.family == family)
    torch.manual_seed(0)
    mix, overrides = MIXES[family]
    cfg = tiny_config(family, **overrides)
    cfg.architectures = [row.hf_name]
    original = AutoModelForCausalLM.from_config(cfg).float().eval()
    candidates = sorted(set(mix), key=mix.index)
    kv = "none" if row.experts else "fp8"
    recipe = recipe_from_dict({"name": "t", "model": {"path": str(tmp_path)}, "quantization": {
        "precision": "auto", "kv_cache": kv, "search": {"candidates": candidates}},
        "calibration": {"batch_size": 4}, "export": {"tensorrt_llm_checkpoint": False, "hf_checkpoint": True},
        "engine": {"target": "none"}}, [], source="test").resolved()
    rows = torch.randint(0, cfg.vocab_size, (4, 32)).tolist()
    tokens = TokenSet(rows, [32] * 4, ["d"] * 4, None, "0" * 64, 0)
    reporter = Reporter(quiet=True)
    models, group = search.calibrate_candidates(original, recipe, search.candidates_of(recipe.quantization), tokens, "cpu", reporter)
    units, fixed = search.search_units(models, row, "gemm")
    sources = search.sources_of(models, units)
    chosen, k = {}, 0
    for u in units:
        k = 0 if u.layer != units[max(0, units.index(u) - 1)].layer else k + 1
        chosen[u.name] = mix[(k + u.layer) % len(mix)]
    assert {u.layer for u in units} == set(range(len(original.get_decoder().layers)))
    assert all(len({chosen[u.name] for u in units if u.layer == i}) > 1 for i in range(len(original.get_decoder().layers)))
    mixed = search.assemble(models[search.candidates_of(recipe.quantization)[0]], sources, chosen, units)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        fake = mixed(input_ids=ids, use_cache=False).logits
        reference = original(input_ids=ids, use_cache=False).logits
    quant = recipe.quantization.model_copy(update={"awq_group_size": group})
    exported = export.run(mixed, _Tok(), mixed.config, row.hf_name, recipe.export, quant, tmp_path)
    hf_dir = exported.hf_checkpoint_dir
    hf_quant = json.loads((hf_dir / "hf_quant_config.json").read_text())["quantization"]
    quantized = {f for f in mix if f != "none"}
    algo = {"int4_awq": "W4A16_AWQ", "fp8": "FP8", "none": None}
    # Two quantized formats: ModelOpt's MIXED_PRECISION; one and 16-bit: that format, the 16-bit layers excluded.
    assert hf_quant["quant_algo"] == ("MIXED_PRECISION" if len(quantized) > 1 else algo[quantized.pop()]), hf_quant
    if kv == "fp8":
        assert hf_quant["kv_cache_quant_algo"] == "FP8"
    files, quantization = HFTensors(hf_dir), read_quantization(hf_dir, json.loads((hf_dir / "config.json").read_text()))
    router = f".{row.experts.module_block}.{row.experts.router}" if row.experts else None
    linears = [n for n, m in original.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)
               and not (router and n.endswith(router))]
    for u in units:  # every linear of the unit, in the unit's format (a MoE block's router stays 16-bit)
        mine = [n for n in linears if any(n == p or n.startswith(p + ".") for p in u.modules)]
        block = any(n.startswith(u.modules[0] + ".") and n.endswith(".experts") for n, _ in original.named_modules())
        assert mine or block, u.name
        for name in mine:
            assert read_linear(files, quantization, name, False).algo == algo[chosen[u.name]], (u.name, name)
        if block:
            # and its experts, one linear per expert in the files
            expert = f"model.layers.{u.layer}.{row.experts.file_block}.experts.0.{row.experts.file_leaves[0]}"
            assert read_linear(files, quantization, expert, False).algo == algo[chosen[u.name]], (u.name, expert)
    assert sorted(n for n in linears if not any(n == p or n.startswith(p + ".") for u in units for p in u.modules)) == []
    weights = {u.name: u.weights for u in units}
    int4_share = sum(w for n, w in weights.items() if chosen[n] == "int4_awq") / (sum(weights.values()) + fixed)  # no scales counted
    assert exported.validation["hf_checkpoint_weight_bits"]["bits_per_weight"] == pytest.approx(
        search.effective_bits(chosen, weights, fixed) - 0.125 * int4_share, abs=0.01)
    ran = load_shipped_model(hf_dir).logits(ids)
    fake_err, shipped_err = _rel(fake, reference), _rel(ran, reference)
    assert fake_err > 0
    # The export rounds scales (bf16) and folds AWQ's pre_quant_scale: the files differ from the fake-quant
    # model by less than the quantization error itself, and are as accurate (tests/contract/test_hf_checkpoint_executor).
    assert _rel(ran, fake) < fake_err
    assert abs(shipped_err - fake_err) < 0.5 * fake_err


def test_candidates_that_leave_weights_alone_share_the_original(tmp_path):
    """fp8 and 16-bit copies hold the original's parameters (no second copy of the weights); int4_awq's calibration
    rescales its linears' weights, so it gets its own copy; the original is left as it was (precisions.rewrites_weights)."""
    from transformers import AutoModelForCausalLM

    from trtconv.core.ui import Reporter
    from trtconv.data.samples import TokenSet
    from trtconv.recipe.schema import recipe_from_dict
    from trtconv.stages import search

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    original = AutoModelForCausalLM.from_config(cfg).float().eval()
    before = {n: t.detach().clone() for n, t in original.named_parameters()}
    recipe = recipe_from_dict({"name": "t", "model": {"path": str(tmp_path)}, "quantization": {
        "precision": "auto", "kv_cache": "fp8", "search": {"candidates": ["int4_awq", "fp8", "none"]}},
        "export": {"tensorrt_llm_checkpoint": False, "hf_checkpoint": True}, "engine": {"target": "none"}}, [], source="test").resolved()
    tokens = TokenSet(torch.randint(0, cfg.vocab_size, (4, 32)).tolist(), [32] * 4, ["d"] * 4, None, "0" * 64, 0)
    models, _ = search.calibrate_candidates(original, recipe, ["int4_awq", "fp8", "none"], tokens, "cpu", Reporter(quiet=True))
    name = "model.layers.0.mlp.down_proj.weight"
    own = dict(original.named_parameters())
    assert dict(models["fp8"].named_parameters())[name] is own[name] and dict(models["none"].named_parameters())[name] is own[name]
    assert not torch.equal(dict(models["int4_awq"].named_parameters())[name].detach(), own[name].detach())  # AWQ rescaled its copy
    assert all(torch.equal(t.detach(), before[n]) for n, t in original.named_parameters())


def test_deepseek_without_q_lora_keeps_the_linears_reading_the_input_together():
    """DeepSeek-V3 with q_lora_rank null has no q_a_proj: q_proj and kv_a_proj_with_mqa both read the layer input and
    run apart (architectures.shared_input_groups): one unit, one format (ModelOpt's export asserts it for AWQ)."""
    from transformers import AutoModelForCausalLM

    from trtconv.architectures import ARCHITECTURES
    from trtconv.core.ui import Reporter
    from trtconv.data.samples import TokenSet
    from trtconv.recipe.schema import recipe_from_dict
    from trtconv.stages import search

    row = ARCHITECTURES["DeepseekV3ForCausalLM"]
    cfg = tiny_config("deepseek_v3", q_lora_rank=None)
    original = AutoModelForCausalLM.from_config(cfg).float().eval()
    recipe = recipe_from_dict({"name": "t", "model": {"path": "."}, "quantization": {"precision": "auto", "search": {
        "candidates": ["fp8", "none"]}}, "export": {"tensorrt_llm_checkpoint": False, "hf_checkpoint": True},
        "engine": {"target": "none"}}, [], source="test").resolved()
    tokens = TokenSet(torch.randint(0, cfg.vocab_size, (4, 16)).tolist(), [16] * 4, ["d"] * 4, None, "0" * 64, 0)
    models, _ = search.calibrate_candidates(original, recipe, ["fp8", "none"], tokens, "cpu", Reporter(quiet=True))
    units, _ = search.search_units(models, row, "gemm")
    names = [u.name for u in units if u.layer == 0]
    assert "model.layers.0.self_attn.q_proj+kv_a_proj_with_mqa" in names, names


def test_a_moe_auto_build_searches_what_its_family_converts(cli, tmp_path):
    """No candidates named: a MoE family's auto build searches fp8 and 16-bit (its row), where the default list
    (int4_awq, int8_sq, ...) was refused before any work; per GEMM (the default), a MoE block is one unit."""
    model = make_tiny_model(tmp_path / "m", "qwen3_moe")
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "-o", out, *PLUMBING_ARGS, "--precision", "auto", "--set", "engine.target=none",
              "--set", "quantization.search.max_trials=2")
    assert res.exit_code == 0, res.output
    found = json.loads((out / "manifest.json").read_text())["calibration"]["search"]
    assert found["candidates"] == ["fp8", "none"] and found["trials"][0]["units_per_format"] == {"fp8": 7}  # q/k/v, o; a MoE block or gate/up, down


class _Tok:
    def save_pretrained(self, out):
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)


def test_auto_build_records_trials_and_passes_the_shipped_gate(cli, tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "-o", out, *PLUMBING_ARGS, *AUTO)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    found = manifest["calibration"]["search"]
    assert manifest["status"] == "passed" and found["passed"]
    assert found["candidates"] == ["int4_awq", "fp8", "none"]
    first = found["trials"][0]
    assert first["verdict"] == "pass" and first["effective_bits"] == pytest.approx(4.125)  # relaxed gates: the cheapest passes
    assert set(first["mean_kl"]) == {"value", "ci_low", "ci_high"} and first["units_per_format"] == {"int4_awq": 8}  # per GEMM, the default
    assert found["granularity"] == "fused GEMM (q/k/v, o, gate/up, down) or mixture-of-experts block of a decoder layer"
    assert {s["name"] for s in manifest["stages"]} >= {"search", "export", "evaluate"}
    assert "## Precision auto" in (out / "report.md").read_text()
    assert (out / "report_search.png").is_file()


def test_nothing_passes_exits_1_with_the_closest_written_and_failed(cli, tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "-o", out, *PLUMBING_ARGS, "--precision", "auto", "--candidates", "fp8",
              "--set", "engine.target=none", "--set", "evaluate.gates.max_kl=1e-9", "--set", "quantization.search.granularity=layer")
    assert res.exit_code == 1, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "precision auto: the path's most accurate mix failed too" in manifest["status_reason"]
    found = manifest["calibration"]["search"]
    assert not found["passed"] and found["trials"][0]["verdict"] == "fail"
    assert found["granularity"] == "decoder layer" and found["trials"][0]["units_per_format"] == {"fp8": 2}
    assert (out / "hf_checkpoint" / "model.safetensors").is_file()


def test_an_unchanged_auto_recipe_reuses_the_search(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("TRTCONV_NO_CACHE", raising=False)
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model(tmp_path / "m", "llama")
    args = [*PLUMBING_ARGS, *AUTO, "--candidates", "fp8,none"]  # no AWQ: the cache is what is tested
    assert cli("calibrate", "--model", model, "-o", tmp_path / "a", *args).exit_code == 0
    res = cli("calibrate", "--model", model, "-o", tmp_path / "b", *args, "--set", "evaluate.sensitivity=false")
    assert res.exit_code == 0, res.output
    stages = {s["name"]: s["status"] for s in json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]}
    assert stages["search"] == "reused" and stages["export"] == "reused"
    # The gates the search aims at are part of its key, and so is evaluate.num_samples: its trials are measured
    # on the evaluation packs' documents after the gate's share (search.validation_for).
    for name, change in (("c", "evaluate.gates.max_kl=50"), ("d", "evaluate.num_samples=9")):
        changed = cli("calibrate", "--model", model, "-o", tmp_path / name, *args, "--set", change)
        assert changed.exit_code == 0, changed.output
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert {s["name"]: s["status"] for s in manifest["stages"]}["search"] == "ok", change
    assert manifest["calibration"]["search"]["measured_on"].startswith("48 evaluation-pack documents the gate does not use")
