"""The real CLI on every new family's tiny model (CPU): converts, gates and checks on the unified HF checkpoint.

Plumbing only (random tiny models; gates relaxed as in tests/e2e/test_cli_build.py). What is asserted:
`calibrate` picks the unified HF checkpoint for a family whose legacy TensorRT-LLM checkpoint trtconv
refuses, the gate judged the shipped files through the family's own transformers class, per-linear weight
errors are named, `check` re-judges the artifact, and `build` asking for the legacy checkpoint is refused
before any work, exit 2, naming the key and what is allowed.
"""

from __future__ import annotations

import json

import pytest

from tests.factories import PLUMBING_ARGS, make_tiny_model

pytestmark = pytest.mark.integration

FAST = PLUMBING_ARGS
HF_CLASS = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}


@pytest.mark.parametrize("family,precision,kv", [("qwen3", "fp8", "fp8"), ("gemma3", "int4_awq", "none"),
                                                 ("gemma2", "fp8", "none"), ("phi3", "fp8", "fp8")])
def test_new_family_converts_gates_and_checks(cli, tmp_path, family, precision, kv):
    model = make_tiny_model(tmp_path / family, family)
    out = tmp_path / "out"
    res = cli("calibrate", "--model", model, "--precision", precision, "--kv-cache", kv, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert manifest["export"]["checkpoint"] is None and manifest["export"]["hf_checkpoint"] == "hf_checkpoint"
    assert HF_CLASS[family] in manifest["evaluation"]["candidate"]
    assert manifest["evaluation"]["worst_layers"][0]["layer"].startswith("model.layers.")
    quant = json.loads((out / "hf_checkpoint" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == {"fp8": "FP8", "int4_awq": "W4A16_AWQ"}[precision]
    assert quant.get("kv_cache_quant_algo") == ("FP8" if kv == "fp8" else None)
    checked = cli("check", out)
    assert checked.exit_code == 0, checked.output


def test_legacy_checkpoint_of_a_unified_only_family_is_refused_before_work(cli, tmp_path):
    model = make_tiny_model(tmp_path / "gemma3", "gemma3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: g\nmodel: {{path: {model}}}\nquantization: {{precision: fp8}}\n")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "export.tensorrt_llm_checkpoint" in res.output and "export.hf_checkpoint: true" in res.output
    assert not (tmp_path / "out").exists()


def test_plan_reads_the_same_family_rule(cli, tmp_path):
    """`plan` refuses what `build` refuses for the family (exit 2) and plans the unified HF conversion."""
    model = make_tiny_model(tmp_path / "gemma3", "gemma3")
    legacy, unified = tmp_path / "legacy.yaml", tmp_path / "unified.yaml"
    legacy.write_text(f"name: g\nmodel: {{path: {model}}}\nquantization: {{precision: fp8}}\n")
    unified.write_text(f"name: g\nmodel: {{path: {model}}}\nquantization: {{precision: fp8}}\n"
                       "export: {tensorrt_llm_checkpoint: false, hf_checkpoint: true}\n")
    refused = cli("plan", legacy, "--gpu", "h100-80gb", "-o", tmp_path / "out")
    assert refused.exit_code == 2 and "export.tensorrt_llm_checkpoint" in refused.output, refused.output
    planned = cli("plan", unified, "--gpu", "h100-80gb", "-o", tmp_path / "out")
    assert planned.exit_code == 0, planned.output


def test_sequential_evaluation_gives_the_same_statistics(cli, tmp_path, monkeypatch):
    """One model at a time (what a GPU run of the unified checkpoint does) gives the numbers both-at-once gives."""
    from trtconv.stages import evaluate

    model = make_tiny_model(tmp_path / "qwen3", "qwen3")
    together, sequential = tmp_path / "together", tmp_path / "sequential"
    assert cli("calibrate", "--model", model, "--precision", "fp8", "--kv-cache", "fp8", "-o", together, *FAST).exit_code == 0
    monkeypatch.setattr(evaluate, "sequential_here", lambda *a: True)
    res = cli("calibrate", "--model", model, "--precision", "fp8", "--kv-cache", "fp8", "-o", sequential, *FAST)
    assert res.exit_code == 0, res.output
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (together, sequential))
    assert b["evaluation"]["path"] == "sequential" and a["evaluation"]["path"] == "in_memory"
    assert a["metrics"] == b["metrics"]
    assert a["evaluation"]["worst_layers"] == b["evaluation"]["worst_layers"]


def test_nothing_exported_is_refused(cli, tmp_path):
    model = make_tiny_model(tmp_path / "gemma3", "gemma3")
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", tmp_path / "out", "--set",
              "export.hf_checkpoint=false", *FAST)
    assert res.exit_code == 2 and "nothing would be exported" in res.output, res.output


def _cap_between(cli, recipe, tmp_path) -> str:
    """A --max-gpu-memory (GiB) halfway between streamed and in-memory evaluation's needs, from the plan itself (a
    fixed 45 MiB stopped streaming Qwen3-MoE once its experts were counted under num_local_experts)."""
    plan = json.loads(cli("plan", recipe, "-o", tmp_path / "out", "--json").stdout)
    need = {c["stage"]: c["need_bytes"] for c in plan["checks"] if c["where"] == "gpu"}
    return f"{(need['evaluate (streamed)'] + need['evaluate (in memory)']) / 2 / 2**30:.4f}"


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe", "deepseek_v3"])
def test_a_cap_streams_the_unified_only_build(cli, tmp_path, family):
    """A cap below the whole model: plan says the unified-only family streams and fits; build streams calibration,
    the unified HF export and evaluation, and ships the uncapped run's artifact (same digest) and metrics."""
    from trtconv.architectures import row_for_folder

    model = make_tiny_model(tmp_path / family, family, hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
    kv = "fp8" if row_for_folder(model).no_kv_cache_quant is None else "none"  # DeepSeek-V3: refused (latent attention)
    recipe = tmp_path / "unified.yaml"
    recipe.write_text(f"name: g\nmodel: {{path: {model}}}\nquantization: {{precision: fp8, kv_cache: {kv}}}\n"
                      "calibration: {num_samples: 4, seq_len: 64, batch_size: 4}\nevaluate: {num_samples: 8, seq_len: 64}\n"
                      "export: {tensorrt_llm_checkpoint: false, hf_checkpoint: true}\n")
    cap = _cap_between(cli, recipe, tmp_path)
    res = cli("plan", recipe, "--max-gpu-memory", cap, "-o", tmp_path / "out", "--json")
    plan = json.loads(res.stdout)
    assert res.exit_code == 0 and plan["streamed"] and plan["fits"] and not plan["refusals"], res.output
    runs = {}
    for name, extra in (("uncapped", []), ("capped", ["--max-gpu-memory", cap])):
        res = cli("calibrate", "--model", model, "--precision", "fp8", "--kv-cache", kv, "-o", tmp_path / name, "--json",
                  "-q", *extra, *FAST)
        assert res.exit_code == 0, res.output
        runs[name] = json.loads(res.stdout)
        runs[name]["manifest"] = json.loads((tmp_path / name / "manifest.json").read_text())
    capped = runs["capped"]["manifest"]
    assert capped["calibration"]["path"] == "streamed" and capped["evaluation"]["path"] == "streamed"
    assert runs["uncapped"]["manifest"]["calibration"]["path"] == "in_memory"
    assert runs["capped"]["artifact_digest"] == runs["uncapped"]["artifact_digest"]
    assert runs["capped"]["metrics"] == runs["uncapped"]["metrics"]
    assert capped["calibration"].get("experts") == runs["uncapped"]["manifest"]["calibration"].get("experts")


def test_cpu_build_ships_unquantized_weights_in_export_dtype(cli, tmp_path):
    """On a CPU the model computes in float32; the unified checkpoint still ships export.dtype (scales float32)."""
    from trtconv.checkpoints.safetensors_stream import read_header

    model = make_tiny_model(tmp_path / "phi3", "phi3")
    out = tmp_path / "out"
    assert cli("calibrate", "--model", model, "--precision", "fp8", "-o", out, *FAST).exit_code == 0
    _, header = read_header(out / "hf_checkpoint" / "model.safetensors")
    dtypes = {k.rsplit(".", 1)[-1]: v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] != "F8_E4M3"}
    assert dtypes["weight"] == "BF16" and dtypes["input_scale"] == "F32" and dtypes["weight_scale"] == "F32"
    assert json.loads((out / "hf_checkpoint" / "config.json").read_text())["dtype"] == "bfloat16"
    repairs = json.loads((out / "manifest.json").read_text())["export"]["config_repairs"]
    assert any(r["key"] == "hf_checkpoint dtype" and r["before"] == "float32" for r in repairs)
