"""Layer-streamed calibration + export gives the same checkpoint as the in-memory path (on CPU).

Real ModelOpt calibration on the project's own models (tests/factories.py tiny models, the trained
llama-ref); every rank file is compared byte for byte and config.json key for key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtconv.core.ui import Reporter
from tests.exports import calibrate_both_ways
from trtconv.recipe.schema import recipe_from_dict


def _recipe(model: Path, precision: str, kv: str = "none", tp: int = 1, **calib):
    return recipe_from_dict({
        "name": "stream-test", "model": {"path": str(model), "dtype": "bfloat16"},
        "quantization": {"precision": precision, "kv_cache": kv, "awq_group_size": 64},
        "calibration": {"num_samples": 8, "seq_len": 64, "batch_size": 4, **calib},
        "export": {"tp_size": tp},
    }).resolved()


def _both_paths(tmp_path: Path, recipe):
    return {streamed: (exported.checkpoint_dir, record) for streamed, (exported, record, _) in calibrate_both_ways(tmp_path, recipe).items()}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "config.json":
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("precision,kv", [("fp8", "fp8"), ("int8_sq", "none"), ("int4_awq", "fp8"), ("w4a8_awq", "none"),
                                          ("none", "none")])
def test_streamed_equals_in_memory_tiny_llama(tmp_path, tiny_llama, precision, kv):
    paths = _both_paths(tmp_path, _recipe(tiny_llama, precision, kv))
    _assert_same_checkpoint(paths[False][0], paths[True][0])
    assert paths[False][1]["census"] == paths[True][1]["census"]
    assert paths[True][1]["path"] == "streamed"


def test_export_repair_sorts_exclude_modules():
    """ModelOpt writes exclude_modules through a set (order follows PYTHONHASHSEED): the repair sorts it."""
    from types import SimpleNamespace

    from trtconv.stages.export import repair_trtllm_config

    cfg = {"position_embedding_type": "learned_absolute",
           "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head", "transformer.layers.1.attention.dense"]}}
    cfg["quantization"]["exclude_modules"].reverse()
    repairs = repair_trtllm_config(cfg, SimpleNamespace(attention_bias=False, mlp_bias=False), "LlamaForCausalLM")
    assert cfg["quantization"]["exclude_modules"] == ["lm_head", "transformer.layers.1.attention.dense"]
    assert any(r.key == "quantization.exclude_modules" for r in repairs)


@pytest.mark.slow
def test_streamed_equals_in_memory_qwen2_tp2(tmp_path, tiny_qwen2):
    paths = _both_paths(tmp_path, _recipe(tiny_qwen2, "int4_awq", "none", tp=2))
    _assert_same_checkpoint(paths[False][0], paths[True][0])


@pytest.mark.slow
def test_streamed_equals_in_memory_llama_ref(tmp_path, llama_ref):
    paths = _both_paths(tmp_path, _recipe(llama_ref, "fp8", "fp8"))
    _assert_same_checkpoint(paths[False][0], paths[True][0])


@pytest.mark.slow
@pytest.mark.parametrize("parked", [False, True])
def test_streamed_evaluation_equals_in_memory(tmp_path, llama_ref, monkeypatch, parked):
    """Same per-document statistics, task scores, weight errors and gate verdicts, one layer at a time
    (parked: with the vocabulary matrices parked during the layer loop, as on a GPU)."""
    import numpy as np

    from trtconv.stages import evaluate_streamed

    if parked:
        parked_cls = evaluate_streamed.park_vocab_matrices
        monkeypatch.setattr(evaluate_streamed, "park_vocab_matrices", lambda device, park=True: parked_cls(device, force=True))

    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import evaluation_rows
    from trtconv.stages.evaluate import evaluate_checkpoint

    task = tmp_path / "task.jsonl"  # the first 24 items of the shipped cloze task
    cloze = Path(__file__).resolve().parents[2] / "calibration_data" / "eval-cloze.jsonl"
    task.write_text("".join(cloze.read_text().splitlines(keepends=True)[:24]))
    recipe = _recipe(llama_ref, "int8_sq", "fp8")
    recipe = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
        "num_samples": 12, "seq_len": 96, "batch_size": 5, "multiple_choice": str(task)})}).resolved()
    ckpt = _both_paths(tmp_path, recipe)[True][0]
    tok = load_tokenizer(llama_ref, False)
    e = recipe.evaluate
    tokens = evaluation_rows(builtin_pack("eval"), tok, e.num_samples, e.seq_len, e.seed)
    runs = [evaluate_checkpoint(recipe, llama_ref, ckpt, tokens, "cpu", Reporter(quiet=True), streamed=s) for s in (False, True)]
    a, b = runs
    for field in ("n_tokens", "nll_baseline", "nll_candidate", "kl", "top1_agree", "token_kl"):
        np.testing.assert_array_equal(getattr(a.stats, field), getattr(b.stats, field), err_msg=field)
    assert [(g.metric, g.value, g.verdict) for g in a.gates] == [(g.metric, g.value, g.verdict) for g in b.gates]
    assert a.record["task_correct"] == b.record["task_correct"]
    assert a.weight_errors == b.weight_errors


@pytest.mark.slow
@pytest.mark.integration
def test_cli_cap_streams_and_keeps_the_digest(cli, tmp_path):
    """`--max-gpu-memory` below what in-memory evaluation needs: calibration.streaming auto streams
    calibration, export and evaluation; the artifact digest and the metrics equal the uncapped run's."""
    from tests.factories import make_tiny_model

    model = make_tiny_model(tmp_path / "m", "llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=8)
    common = ["--model", model, "--precision", "fp8", "--device", "cpu", "--num-samples", "8", "--seq-len", "64",
              "--json", "-q", "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64"]
    runs = {}
    for name, extra in (("uncapped", []), ("capped", ["--max-gpu-memory", "0.1"])):
        res = cli("calibrate", *common, "-o", tmp_path / name, *extra)
        assert res.exit_code in (0, 1), res.stderr  # random weights: the gate may fail; the artifact is written
        runs[name] = json.loads(res.stdout)
        runs[name]["manifest"] = json.loads((Path(runs[name]["artifact"]) / "manifest.json").read_text())
    assert runs["uncapped"]["manifest"]["calibration"]["path"] == "in_memory"
    assert runs["uncapped"]["manifest"]["evaluation"]["path"] == "in_memory"  # on CPU evaluation follows calibration
    assert runs["capped"]["manifest"]["calibration"]["path"] == "streamed"
    assert runs["capped"]["manifest"]["evaluation"]["path"] == "streamed"
    assert runs["capped"]["artifact_digest"] == runs["uncapped"]["artifact_digest"]
    assert runs["capped"]["metrics"] == runs["uncapped"]["metrics"]


@pytest.mark.slow
def test_streamed_baseline_in_bf16_equals_the_whole_model(tmp_path, tiny_llama):
    """On a GPU both evaluation paths run the original in the load dtype (baseline_dtype): layer by
    layer it gives the whole model's logits bit for bit. Checked on CPU in bfloat16, the GPU's dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.exports import export_trtllm, token_batches
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.stages.evaluate_streamed import LayerStreamedPair

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    ckpt = export_trtllm(model, tmp_path / "ckpt")
    vocab = model.config.vocab_size
    batches = token_batches(vocab, count=2, batch=2, length=24)
    pair = LayerStreamedPair(tiny_llama, ckpt, "cpu", vocab, torch.bfloat16)
    record, _ = pair.recorders()
    for ids in batches:
        record(ids)
    pair.compute()
    replay, _ = pair.replayers()
    whole = load_hf_model(tiny_llama, "bfloat16", False, "cpu")
    with torch.no_grad():
        for ids in batches:
            streamed, expected = replay(ids), whole(input_ids=ids, use_cache=False).logits
            assert streamed.dtype == expected.dtype == torch.bfloat16
            assert torch.equal(streamed, expected)
