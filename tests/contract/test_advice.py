"""The failed gate's advice reads the shipped checkpoint and calibrates nothing (issue 21 item 4; gate/layer_streams.py).

On tiny random models (plumbing, not accuracy): a gate made to fail runs the advice; the build's own
calibration is counted by a wrapper that calls the real ModelOpt calibration, so a second calibration
would show as a second call. Both checkpoint kinds, a cached export, and the layer-streamed original
against the resident one (same ranking, same KLs). The fully shipped stream is the gate's own
candidate on the same rows, so its KL is checked against the reference executor's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.factories import PLUMBING_ARGS

pytestmark = pytest.mark.slow

FAILING = [*PLUMBING_ARGS, "--set", "evaluate.gates.max_kl=0.0000001"]  # later --set wins: the KL gate fails
OUTPUTS = {
    "trtllm": ["--hf-checkpoint"],  # the legacy checkpoint is judged (the HF one written beside it)
    "hf": ["--hf-checkpoint", "--set", "export.tensorrt_llm_checkpoint=false"],
}


@pytest.fixture
def calibrations(monkeypatch):
    """How often calibration really ran: trtconv's calibrate.run, wrapped, still doing its work."""
    from trtconv.stages import calibrate

    calls = []
    real = calibrate.run

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "run", counted)
    return calls


def _failed_build(cli, model: Path, out: Path, outputs: str, *extra):
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", out, *FAILING, *OUTPUTS[outputs], *extra)
    assert res.exit_code == 1, res.output
    return json.loads((out / "manifest.json").read_text()), res.output


@pytest.mark.parametrize("outputs", ["trtllm", "hf"])
def test_the_advice_calibrates_nothing_and_measures_its_suggestion(cli, tiny_llama, tmp_path, calibrations, outputs):
    manifest, output = _failed_build(cli, tiny_llama, tmp_path / "out", outputs)
    advice = manifest["evaluation"]["advice"]
    assert len(calibrations) == 1  # the build's; the advice read the shipped files
    assert advice["reused"] == {"checkpoint": "checkpoint" if outputs == "trtllm" else "hf_checkpoint", "export": "built by this run"}
    assert advice["path"] == "in_memory" and len(advice["layers"]) == 2 and all(d["kl"] > 0 for d in advice["layers"])
    # The suggestion is one of the measured lists, and the one reported as measured.
    chosen = next(c for c in advice["exclude_candidates"] if c["layers"] == len(advice["suggested_exclude"]))
    assert advice["kl_with_suggested_exclude"] == chosen["kl"]
    assert advice["suggestion_passes_kl_gate"] is (chosen["estimated_gate_kl"] <= 0.0000001)
    assert ("try quantization.exclude" in output) is advice["suggestion_passes_kl_gate"]
    stage = next(s for s in manifest["stages"] if s["name"] == "sensitivity")
    assert stage["status"] == "ok" and "calibrate" not in advice["seconds"]


def test_the_advice_works_from_a_cached_export(cli, tiny_llama, tmp_path, monkeypatch, calibrations):
    monkeypatch.delenv("TRTCONV_NO_CACHE", raising=False)
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    first = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", tmp_path / "a", *PLUMBING_ARGS, *OUTPUTS["trtllm"])
    assert first.exit_code == 0 and len(calibrations) == 1, first.output
    manifest, _ = _failed_build(cli, tiny_llama, tmp_path / "b", "trtllm")
    assert len(calibrations) == 1  # nothing calibrated again: not by the build (cache), not by the advice
    assert next(s for s in manifest["stages"] if s["name"] == "calibrate")["status"] == "reused"
    advice = manifest["evaluation"]["advice"]
    assert advice["reused"]["export"] == "restored from the stage cache" and advice["layers"]


def _recipe(model: Path, tensorrt_llm: bool, precision: str = "fp8"):
    from trtconv.recipe.schema import recipe_from_dict

    return recipe_from_dict({
        "name": "advice-test", "model": {"path": str(model), "dtype": "bfloat16"},
        "quantization": {"precision": precision, "kv_cache": "fp8"},
        "export": {"tensorrt_llm_checkpoint": tensorrt_llm, "hf_checkpoint": not tensorrt_llm},
        "evaluate": {"num_samples": 8, "seq_len": 48, "gates": {"max_kl": 0.0000001}},
    }).resolved()


def _export(tmp_path: Path, model: Path, tensorrt_llm: bool, precision: str = "fp8"):
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import calibration_rows, evaluation_rows
    from trtconv.pipeline import run_calibrate_and_export

    recipe = _recipe(model, tensorrt_llm, precision)
    tok = load_tokenizer(model, False)
    calib = calibration_rows(builtin_pack("calib"), tok, 4, 64, 0)
    rows = evaluation_rows(builtin_pack("eval"), tok, 8, 48, 0)
    arch = json.loads((model / "config.json").read_text())["architectures"][0]
    exported, _, _ = run_calibrate_and_export(recipe, model, arch, tok, calib, tmp_path, "cpu", Reporter(quiet=True))
    return recipe, exported.checkpoint_dir if tensorrt_llm else exported.hf_checkpoint_dir, rows


@pytest.mark.parametrize("arch,tensorrt_llm,precision", [("llama", True, "fp8"), ("llama", False, "fp8"), ("qwen2", True, "fp8"),
                                                         ("llama", True, "int4_awq"), ("llama", False, "int4_awq"),
                                                         ("mixtral", False, "fp8"), ("qwen3_moe", False, "fp8"),
                                                         ("deepseek_v3", False, "fp8")])
def test_streamed_advice_equals_the_resident_one(tmp_path, arch, tensorrt_llm, precision, request):
    """Layer by layer (the original's layers read one at a time, a MoE layer's per-expert files folded into
    transformers' fused experts as the streamed calibration reads them) the advice measures what it measures with
    the original in memory: a MoE build streamed under a cap no longer ends in "no layer advice"."""
    from tests.factories import MOE_FAMILIES, make_tiny_model
    from trtconv.core.ui import Reporter
    from trtconv.gate import sensitivity

    model = make_tiny_model(tmp_path / "model", arch) if arch in MOE_FAMILIES else request.getfixturevalue(f"tiny_{arch}")
    recipe, checkpoint, rows = _export(tmp_path, model, tensorrt_llm, precision)
    runs = {streamed: sensitivity.run(model, checkpoint, recipe, rows, 0.02, "cpu", Reporter(quiet=True), streamed=streamed)
            for streamed in (False, True)}
    resident, streamed = runs[False], runs[True]
    assert [n for n, _ in streamed.layers] == [n for n, _ in resident.layers]
    assert [k for _, k in streamed.layers] == pytest.approx([k for _, k in resident.layers], rel=1e-5, abs=1e-9)
    assert streamed.full_kl == pytest.approx(resident.full_kl, rel=1e-5)
    assert [c["kl"] for c in streamed.candidates] == pytest.approx([c["kl"] for c in resident.candidates], rel=1e-5, abs=1e-9)
    assert streamed.exclude == resident.exclude and (streamed.path, resident.path) == ("streamed", "in_memory")
    pick = lambda r, *keys: [tuple(d[k] for k in keys) for d in r.experts]  # noqa: E731
    assert pick(streamed, "expert", "tokens") == pick(resident, "expert", "tokens")
    assert [d["kl"] for d in streamed.experts] == pytest.approx([d["kl"] for d in resident.experts], rel=1e-5, abs=1e-9)
    assert resident.candidates[-1]["layers"] == resident.num_layers and resident.candidates[-1]["kl"] == 0.0  # the original itself


@pytest.mark.parametrize("arch,tensorrt_llm", [("llama", True), ("llama", False), ("gemma2", False), ("mixtral", False)])
def test_every_layer_shipped_is_the_gates_candidate(tmp_path, arch, tensorrt_llm):
    """The fully shipped stream against the reference executor's whole-model logits on the same rows: the same
    KL (the tiny model is bf16, so the original's embedding and head are the shipped ones). Gemma 2 (eager
    attention, soft-capped logits) and Mixtral (experts swapped in one layer at a time) on the unified checkpoint."""
    from tests.factories import make_tiny_model
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.core.ui import Reporter
    from trtconv.gate import sensitivity
    from trtconv.stages.evaluate import candidate_logits

    model = make_tiny_model(tmp_path / "model", arch)
    recipe, checkpoint, rows = _export(tmp_path / "export", model, tensorrt_llm)
    result = sensitivity.run(model, checkpoint, recipe, rows, 0.02, "cpu", Reporter(quiet=True))
    picked = sensitivity._spread_rows(rows, sensitivity.SENSITIVITY_EVAL_ROWS)
    ids = torch.tensor([rows.rows[i] for i in picked])
    lengths = [rows.lengths[i] for i in picked]
    original = load_hf_model(model, "float32", False, "cpu")
    with torch.no_grad():
        base = torch.log_softmax(original(input_ids=ids, use_cache=False).logits.float(), -1)
    candidate, _ = candidate_logits(checkpoint, "cpu", vocab=original.config.vocab_size)
    assert result.full_kl > 0 and all(k > 0 for _, k in result.layers)
    assert result.full_kl == pytest.approx(sensitivity._kl_of(candidate(ids), lengths, base), rel=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_advice_names_the_experts_of_the_worst_layer(tmp_path, arch):
    """Issue 20: the sensitivity report names experts. The worst layer holding experts has each routed expert shipped
    alone (the rest original); every token of the rows is routed to top-k experts, so the counts add up."""
    from tests.factories import make_tiny_model
    from trtconv.architectures import row_for_folder
    from trtconv.core.ui import Reporter
    from trtconv.gate import sensitivity

    model = make_tiny_model(tmp_path / "model", arch)
    recipe, checkpoint, rows = _export(tmp_path / "export", model, False)
    result = sensitivity.run(model, checkpoint, recipe, rows, 0.02, "cpu", Reporter(quiet=True))
    config = json.loads((model / "config.json").read_text())
    picked = sensitivity._spread_rows(rows, sensitivity.SENSITIVITY_EVAL_ROWS)
    tokens = len(picked) * max(len(rows.rows[i]) for i in picked)
    layer = result.experts[0]["layer"]
    block = row_for_folder(model).experts.file_block
    assert {d["layer"] for d in result.experts} == {layer} and layer in [n for n, _ in result.layers]
    assert all(d["expert"].startswith(f"{layer}.{block}.experts.") for d in result.experts)
    assert sum(d["tokens"] for d in result.experts) == tokens * config["num_experts_per_tok"]
    assert all(d["kl"] >= 0 for d in result.experts) and max(d["kl"] for d in result.experts) > 0
    assert [d["kl"] for d in result.experts] == sorted((d["kl"] for d in result.experts), reverse=True)
    lines = sensitivity.advice_lines(result.record(), [], 0.01)
    assert any(line.startswith(f"most sensitive experts of {layer}") for line in lines), lines
