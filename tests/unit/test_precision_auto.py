"""`quantization.precision: auto`: the recipe rules, the gates it defaults to, the plans it must not crash,
and the search's threshold path and bisection (trtconv/stages/search.py), without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtconv.core.errors import RecipeError
from trtconv.recipe.schema import load_recipe

HF_ONLY = "export: {tensorrt_llm_checkpoint: false, hf_checkpoint: true}\nengine: {target: none}\n"


def _load(tmp_path, quantization: str, export: str = HF_ONLY):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: t\nmodel: {{reference: llama-ref}}\nquantization: {quantization}\n{export}")
    return load_recipe(p)[0]


def test_auto_defaults_its_candidates_and_takes_the_best_candidates_gates(tmp_path):
    from trtconv.precisions import PRECISIONS

    r = _load(tmp_path, "{precision: auto}").resolved()
    assert r.quantization.search.candidates == [p.name for p in PRECISIONS.values() if not p.needs_cuda]
    assert r.evaluate.gates.max_kl == PRECISIONS["fp8"].default_gates["max_kl"]  # fp8: the highest rung below 16 bits
    four_bit = _load(tmp_path, "{precision: auto, search: {candidates: [int4_awq, none]}}").resolved()
    assert four_bit.evaluate.gates.max_kl == PRECISIONS["int4_awq"].default_gates["max_kl"]
    assert four_bit.quantization.plan_precision == "none"  # plans size the most the search may keep: 16-bit


def test_auto_with_the_legacy_checkpoint_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, "{precision: auto}", export="")
    assert "export.tensorrt_llm_checkpoint: false" in str(e.value) and "precision auto" in str(e.value)


@pytest.mark.parametrize("quantization,needle", [
    ("{precision: fp8, search: {max_trials: 2}}", "quantization.search applies to precision auto only"),
    ("{precision: auto, search: {candidates: [fp16]}}", "int4_awq"),
    ("{precision: auto, search: {max_trials: 0}}", "max_trials"),
    ("{precision: auto, search: {time_budget_s: -1}}", "time_budget_s"),
    ("{precision: auto, search: {time_budget_s: .inf}}", "time_budget_s"),  # was accepted, then crashed when resolved
    ("{precision: auto, search: {candidates: []}}", "candidates"),
])
def test_bad_search_settings_are_named(tmp_path, quantization, needle):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, quantization)
    assert needle in str(e.value)


def _folder(tmp_path, config: dict | None) -> Path:
    """A model folder holding only config.json (none when `config` is None): what resolving and planning read."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    if config is not None:
        (model / "config.json").write_text(json.dumps(config))
    return model


def _auto_recipe(tmp_path, model: Path, quantization: str = "{precision: auto}") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {{path: {model}}}\nquantization: {quantization}\n" + HF_ONLY)
    return recipe


@pytest.mark.parametrize("arch, expected", [("Qwen3MoeForCausalLM", ["fp8", "none"]), ("MixtralForCausalLM", ["fp8", "none"]),
                                            ("Qwen3ForCausalLM", None)])
def test_default_candidates_are_what_the_family_converts(tmp_path, arch, expected):
    """A MoE model with precision auto and no candidates named searches over its row's precisions instead of
    being refused for a default (int4_awq, int8_sq) it never asked for; a dense one keeps every default."""
    from trtconv.stages.search import default_candidates

    candidates = load_recipe(_auto_recipe(tmp_path, _folder(tmp_path, {"architectures": [arch]})))[0].resolved().quantization.search.candidates
    assert "int4_awq" in default_candidates()
    assert sorted(candidates) == sorted(expected or default_candidates())


@pytest.mark.parametrize("config", [None, {"architectures": ["NoSuchForCausalLM"]}, {"architectures": [["MixtralForCausalLM"]]},
                                    {"architectures": 5}])
def test_default_candidates_of_a_folder_without_a_known_family_are_the_full_list(tmp_path, config):
    """No config.json, an unknown or a malformed architectures key: resolving keeps every default and does not
    crash; the load stage (build, plan, doctor) then names what is wrong with the folder."""
    from trtconv.stages.search import default_candidates

    recipe = _auto_recipe(tmp_path, _folder(tmp_path, config))
    assert load_recipe(recipe)[0].resolved().quantization.search.candidates == default_candidates()


def test_a_named_candidate_the_moe_family_does_not_convert_is_refused(cli, tmp_path):
    model = _folder(tmp_path, {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "num_attention_heads": 32,
        "num_key_value_heads": 4, "num_hidden_layers": 48, "vocab_size": 151936, "head_dim": 128})
    res = cli("plan", _auto_recipe(tmp_path, model, "{precision: auto, search: {candidates: [int4_awq, fp8, none]}}"), "--gpu", "h200-141gb")
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "with the candidate int4_awq" in said and "allowed for Qwen3MoeForCausalLM: none, fp8" in said, res.output


@pytest.mark.parametrize("architectures", [[["MixtralForCausalLM"]], 5])
def test_a_malformed_architectures_key_is_named_not_a_traceback(cli, tmp_path, architectures):
    res = cli("plan", _auto_recipe(tmp_path, _folder(tmp_path, {"architectures": architectures, "hidden_size": 64})), "--gpu", "h200-141gb")
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in said and "the key 'architectures' is" in said, res.output


def test_a_recipe_without_auto_keeps_its_bytes(tmp_path):
    r = _load(tmp_path, "{precision: fp8}")
    assert "search" not in r.model_dump(mode="json")["quantization"]  # digests and cache keys of every other recipe unchanged


def test_plan_answers_for_auto(cli, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "max_position_embeddings": 8192, "tie_word_embeddings": False}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {{path: {model}}}\nquantization: {{precision: auto, search: {{candidates: [int4_awq, fp8, none]}}}}\n"
                      + HF_ONLY)
    res = cli("plan", recipe, "--gpu", "h100-80gb", "--json")
    assert res.exit_code == 0, res.output
    res = cli("plan", recipe, "--gpu", "a100-80gb", "--json")  # SM 8.0: fp8, a candidate, needs 8.9 to serve
    sm = next(c for c in json.loads(res.stdout)["checks"] if c["stage"] == "serve (GPU SM)")
    assert not sm["fits"] and "auto's candidate fp8" in sm["note"] and res.exit_code != 0


def _llama8b(tmp_path):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "max_position_embeddings": 8192, "tie_word_embeddings": False}))
    return model


def test_the_plan_counts_a_model_copy_per_candidate_that_rewrites_its_weights(cli, tmp_path):
    """The search holds the original plus a copy per candidate whose calibration rewrites weights (AWQ, SmoothQuant);
    fp8 and 16-bit share the original's. int4_awq, fp8, none of an 8B model: the original + 1 copy (2 x 15 GiB). The
    five defaults: + 3 (4 x 15 GiB) fit an H100's 80 GB (before sharing: 6 x 15, refused), not an L40S's 48 GB;
    plan refuses what build would, says how many fit and a list that does, and accepts that list."""
    model = _llama8b(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {{path: {model}}}\nquantization: {{precision: auto, search: {{candidates: [int4_awq, fp8, none]}}}}\n"
                      + HF_ONLY)
    res = cli("plan", recipe, "--gpu", "h100-80gb", "--json")
    row = next(c for c in json.loads(res.stdout)["checks"] if c["stage"] == "calibrate (in memory)" and c["where"] == "gpu")
    assert res.exit_code == 0 and row["fits"] and "1 candidate copies" in row["note"] and "fp8, none share" in row["note"], res.output
    assert 2 * 15e9 < row["need_bytes"] < 3 * 15e9
    recipe.write_text(f"name: t\nmodel: {{path: {model}}}\nquantization: {{precision: auto}}\n" + HF_ONLY)
    res = cli("plan", recipe, "--gpu", "h100-80gb", "--json")
    row = next(c for c in json.loads(res.stdout)["checks"] if c["stage"] == "calibrate (in memory)" and c["where"] == "gpu")
    assert res.exit_code == 0 and row["fits"] and "3 candidate copies" in row["note"] and row["need_bytes"] > 4 * 15e9, res.output
    res = cli("plan", recipe, "--gpu", "l40s-48gb")
    said = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 4 and "one model copy per candidate" in said and "search.candidates" in said, res.output
    assert "3 of the 5 candidates rewrite their weights (w4a8_awq, int4_awq, int8_sq)" in said, said
    assert "1 fit, e.g. quantization.search.candidates: [w4a8_awq, fp8, none]" in said, said  # the cheapest first
    suggested = said.split("e.g. quantization.search.candidates: [")[1].split("]")[0]
    recipe.write_text(f"name: t\nmodel: {{path: {model}}}\nquantization: {{precision: auto, search: {{candidates: [{suggested}]}}}}\n"
                      + HF_ONLY)
    assert cli("plan", recipe, "--gpu", "l40s-48gb").exit_code == 0


def test_candidates_without_auto_is_refused(cli, tmp_path):
    res = cli("calibrate", "--model", _llama8b(tmp_path), "--precision", "fp8", "--candidates", "int4_awq", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "--candidates applies to --precision auto only" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_a_result_cut_by_the_time_budget_is_never_cached():
    from trtconv.pipeline import time_bound

    assert time_bound({"search": {"stop_reason": "search.time_budget_s 3600 s spent"}})
    assert not time_bound({"search": {"stop_reason": "search.max_trials 8 tried"}})
    assert not time_bound({"search": {"stop_reason": ""}}) and not time_bound({})


def test_threshold_path_keeps_every_units_loss_under_a_falling_threshold():
    """Each step: every unit at its cheapest format whose estimate is under the threshold. The path takes no unit
    sizes: a unit's own KL decides (`a`'s int4_awq, the highest estimate, goes first), not its KL per bit."""
    from trtconv.stages.search import threshold_path

    sens = {"int4_awq": {"a": 0.010, "b": 0.004}, "fp8": {"a": 0.002, "b": 0.003}, "none": {"a": 0.0, "b": 0.0}}
    path = threshold_path(sens, ["int4_awq", "fp8", "none"], ["a", "b"])
    assert path == [{"a": "int4_awq", "b": "int4_awq"}, {"a": "fp8", "b": "int4_awq"}, {"a": "fp8", "b": "fp8"},
                    {"a": "fp8", "b": "none"}, {"a": "none", "b": "none"}]
    kl = [sum(sens[f][n] for n, f in mix.items()) for mix in path]
    assert kl == sorted(kl, reverse=True) and len(set(kl)) == len(kl)  # every step removes estimated KL


def test_threshold_path_skips_a_format_that_measured_worse_than_a_cheaper_one():
    """Noise can make fp8's estimate exceed int4_awq's: the unit then goes from int4_awq straight to 16-bit."""
    from trtconv.stages.search import threshold_path

    sens = {"int4_awq": {"a": 0.004}, "fp8": {"a": 0.005}, "none": {"a": 0.0}}
    assert threshold_path(sens, ["int4_awq", "fp8", "none"], ["a"]) == [{"a": "int4_awq"}, {"a": "none"}]


def test_search_bisects_to_the_cheapest_passing_step():
    """Before a pass: the first step under the target; after one: halfway between the last failure and the pass.
    Simulated along a path of 9 steps where steps >= 3 pass, the search ends at step 3 (SmolLM2-135M stopped at
    its first pass, 14.7 bits, before the bisection)."""
    from trtconv.stages.search import next_step

    path_kl = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert next_step(path_kl, 1.0, 1.5, 0, None) == 7  # the estimate's first step under the target
    assert next_step(path_kl, 1.0, -1.0, 0, None) == 8  # none under it: the last step
    assert next_step(path_kl, 1.0, 1.5, 2, 7) == 4
    failed, passed, step, measured = 0, None, 7, [0]
    while passed is None or passed - failed > 1:
        measured.append(step)
        if step >= 3:
            passed = step
        else:
            failed = step
        if passed is None or passed - failed > 1:
            step = next_step(path_kl, 1.0, 1.5 * 0.5 ** len(measured), failed, passed)
    assert passed == 3 and failed == 2 and len(measured) <= 5


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_layer_weights_count_fused_experts(tmp_path, arch):
    """A MoE layer's bits are its experts' too (transformers 5 fuses them into 3-D parameters, no `weight`); DeepSeek-V3's
    latent-attention projections and shared expert are plain linears, its dense layer 0 has no experts."""
    import torch

    from tests.factories import make_tiny_model
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.gate.sensitivity import layer_prefixes
    from trtconv.stages.search import layer_weights

    model = load_hf_model(make_tiny_model(tmp_path / "m", arch), "float32", False, "cpu")
    prefixes = layer_prefixes(model)
    counts = layer_weights(model, prefixes)
    for p, layer in zip(prefixes, model.get_decoder().layers):
        matrices = sum(t.numel() for t in layer.parameters() if t.dim() >= 2)
        assert counts[p] == matrices, p  # every matrix of the layer, the fused experts included
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert experts and all(isinstance(m.gate_up_proj, torch.Tensor) and m.gate_up_proj.dim() == 3 for m in experts)


def test_a_failed_auto_build_says_what_the_search_found():
    """status_reason of an auto build the gate failed: nothing passed (the stop reason), or a trial passed the search
    on its rows and the shipped files failed (a search that stopped early says so too)."""
    from trtconv.pipeline import search_note

    assert search_note({"passed": False, "stop_reason": "search.max_trials 8 tried", "chosen_trial": 3}) == \
        "; precision auto: search.max_trials 8 tried"
    rows = "48 evaluation-pack documents the gate does not use"
    note = search_note({"passed": True, "stop_reason": "", "chosen_trial": 8, "measured_on": rows})
    assert note == f"; precision auto: trial 8 passed the search's gates on {rows}, the shipped files failed the evaluation's"
    early = search_note({"passed": True, "stop_reason": "search.max_trials 8 tried", "chosen_trial": 7, "measured_on": rows})
    assert early.endswith("(the search stopped early: search.max_trials 8 tried)")


@pytest.mark.parametrize("change", ["in_place", "storage", "through_data"])
def test_a_copy_that_changes_the_shared_original_is_stopped(change):
    """fp8 and 16-bit candidate copies hold the original's parameters themselves (search.SharedWeights): a calibration
    that changed one, in place or by swapping its storage, would change what every trial is measured against."""
    import torch

    from trtconv.stages.search import SharedWeights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    shared = SharedWeights(model)
    shared.check("nothing")  # untouched: no error
    with torch.no_grad():
        if change == "in_place":
            model[1].weight.mul_(2)
        elif change == "through_data":  # ModelOpt's way (model_calib._apply_weight_pre_quant_scale): no version moves
            model[1].weight.data.mul_(2)
        else:
            model[1].weight.data = model[1].weight.data.clone()
    with pytest.raises(RuntimeError, match=r"calibrating the candidate fp8 changed the original model's 1\.weight"):
        shared.check("calibrating the candidate fp8")


def test_auto_says_when_the_original_alone_does_not_fit(cli, tmp_path):
    """No list of candidates helps when the original does not fit: plan says that instead of suggesting one."""
    model = _folder(tmp_path, {  # Llama-3-70B's shape: 131 GiB in bf16
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256})
    recipe = _auto_recipe(tmp_path, model, "{precision: auto, search: {candidates: [fp8, none]}}")
    res = cli("plan", recipe, "--gpu", "h100-80gb")
    said = " ".join(res.output.split())
    assert res.exit_code != 0 and "the original alone, 131.42 GiB, does not fit beside the batch in 79.60 GiB" in said, said
    assert "e.g. quantization.search.candidates" not in said


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "qwen3_moe"])
def test_the_trials_baseline_gives_the_originals_logits_to_the_bit(tmp_path, arch):
    """Trials after the first run only the original's tail on its kept last-layer output (search.Baseline): the
    logits are the whole forward's, to the bit (Gemma 2's final soft-capping, Gemma 3's scaled embeddings too)."""
    import torch

    from tests.factories import make_tiny_model
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.stages.search import Baseline

    model = load_hf_model(make_tiny_model(tmp_path / "m", arch), "float32", False, "cpu").eval()
    base = Baseline(model)
    for ids in (torch.randint(0, model.config.vocab_size, (2, 12)), torch.randint(0, model.config.vocab_size, (3, 7))):
        with torch.no_grad():
            whole = model(input_ids=ids, use_cache=False).logits
        first, again = base(ids), base(ids)
        assert torch.equal(first, whole) and torch.equal(again, whole)
    assert len(base.kept) == 2


def test_threshold_path_never_chooses_a_nan_estimate_and_stays_monotone():
    """A NaN estimate (a broken forward) counts as infinite: the unit leaves that format first and never returns;
    bits never go down along the path."""
    from trtconv.stages.search import format_bits, threshold_path

    nan = float("nan")
    sens = {"int4_awq": {"a": 0.01, "b": nan}, "fp8": {"a": 0.002, "b": 0.003}, "none": {"a": 0.0, "b": 0.0}}
    path = threshold_path(sens, ["int4_awq", "fp8", "none"], ["a", "b"])
    for unit in ("a", "b"):
        bits = [format_bits(mix[unit]) for mix in path]
        assert bits == sorted(bits), (unit, path)
    assert all(mix["b"] != "int4_awq" for mix in path[1:]) and path[-1] == {"a": "none", "b": "none"}


def test_threshold_path_equal_bits_and_equal_estimates():
    """Of two formats with equal weight bits only the first listed takes part (no W4A8/W4A16 mix); a unit whose
    formats all estimate 0 stays at the cheapest, with no step that adds bits for nothing."""
    from trtconv.stages.search import threshold_path

    sens = {"w4a8_awq": {"a": 0.02, "b": 0.0}, "int4_awq": {"a": 0.01, "b": 0.0}, "fp8": {"a": 0.002, "b": 0.0},
            "none": {"a": 0.0, "b": 0.0}}
    path = threshold_path(sens, ["w4a8_awq", "int4_awq", "fp8", "none"], ["a", "b"])
    assert all(mix["a"] != "int4_awq" and mix["b"] == "w4a8_awq" for mix in path)
    assert path == [{"a": "w4a8_awq", "b": "w4a8_awq"}, {"a": "fp8", "b": "w4a8_awq"}, {"a": "none", "b": "w4a8_awq"}]
