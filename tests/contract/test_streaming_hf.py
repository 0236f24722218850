"""Layer-streamed calibration + unified HF export gives the in-memory export's files (on CPU).

Real ModelOpt calibration and export on tiny models of the families that ship only the unified HF
checkpoint (tests/factories.py); every file of hf_checkpoint/ is compared byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import make_tiny_model
from trtconv.core.ui import Reporter
from tests.exports import calibrate_both_ways
from trtconv.recipe.schema import recipe_from_dict


def _recipe(model: Path, precision: str, kv: str = "none", trtllm: bool = False, samples: int = 8, exclude=None):
    return recipe_from_dict({
        "name": "stream-hf-test", "model": {"path": str(model), "dtype": "bfloat16"},
        "quantization": {"precision": precision, "kv_cache": kv, "awq_group_size": 64,
                         **({"exclude": exclude} if exclude else {})},
        "calibration": {"num_samples": samples, "seq_len": 32, "batch_size": 4},
        "export": {"hf_checkpoint": True, "tensorrt_llm_checkpoint": trtllm},
    }).resolved()


def _both_paths(tmp_path: Path, recipe):
    return calibrate_both_ways(tmp_path, recipe)


def assert_same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs: {_differing(a / name, b / name)}"


def _differing(a: Path, b: Path) -> list[str] | str:
    """The tensors (or the JSON text) that differ, for the failure message."""
    if a.suffix != ".safetensors":
        return a.read_text()[:2000] + " <> " + b.read_text()[:2000]
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return sorted(set(x) ^ set(y)) + [k for k in sorted(set(x) & set(y)) if not torch.equal(x[k].float(), y[k].float())]


@pytest.mark.parametrize("arch,precision,kv", [("qwen3", "fp8", "fp8"), ("gemma3", "fp8", "fp8"), ("llama", "fp8", "none"),
                                               ("llama", "int4_awq", "none"), ("qwen3", "none", "fp8"), ("qwen3", "none", "none")])
def test_streamed_hf_equals_in_memory(tmp_path, arch, precision, kv):
    model = make_tiny_model(tmp_path / "m", arch)
    runs = _both_paths(tmp_path, _recipe(model, precision, kv))
    (a, ra, _), (b, rb, _) = runs[False], runs[True]
    assert_same_folder(a.hf_checkpoint_dir, b.hf_checkpoint_dir)
    assert [r.__dict__ for r in a.repairs] == [r.__dict__ for r in b.repairs]
    assert a.validation == b.validation
    assert ra["census"] == rb["census"] and rb["path"] == "streamed"


@pytest.mark.parametrize("arch,kv", [("gemma2", "none"), ("phi3", "fp8")])
def test_streamed_hf_equals_in_memory_other_families(tmp_path, arch, kv):
    model = make_tiny_model(tmp_path / "m", arch)
    runs = _both_paths(tmp_path, _recipe(model, "fp8", kv))
    assert_same_folder(runs[False][0].hf_checkpoint_dir, runs[True][0].hf_checkpoint_dir)


@pytest.mark.parametrize("arch,kv", [("mixtral", "fp8"), ("qwen3_moe", "none"), ("deepseek_v3", "none")])
def test_streamed_hf_equals_in_memory_moe(tmp_path, arch, kv):
    """Experts: transformers 5's fused experts, exported per expert under the hub names; tokens per expert recorded.
    DeepSeek-V3's shell holds its dense layer 0: its MoE layers still run transformers' eager experts, which ModelOpt's
    quantizers see (with grouped_mm every expert's input scale was missing and the build stopped)."""
    model = make_tiny_model(tmp_path / "m", arch)
    runs = _both_paths(tmp_path, _recipe(model, "fp8", kv, samples=16))
    (a, ra, _), (b, rb, _) = runs[False], runs[True]
    assert_same_folder(a.hf_checkpoint_dir, b.hf_checkpoint_dir)
    assert ra["experts"] == rb["experts"]
    assert sum(sum(c) for c in rb["experts"]["tokens"].values()) > 0


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_streamed_hf_shards_like_save_pretrained(tmp_path, monkeypatch, arch):
    """Several shards and the index (its total_parameters too): the same split as save_pretrained's (a small
    max_shard_size on both paths)."""
    from modelopt.torch.export import unified_export_hf

    from trtconv.stages import streamed_hf

    fn = unified_export_hf.export_hf_checkpoint
    defaults = list(fn.__defaults__)
    defaults[defaults.index("10GB")] = "150KB"
    monkeypatch.setattr(fn, "__defaults__", tuple(defaults))
    monkeypatch.setattr(streamed_hf, "MAX_SHARD_SIZE", "150KB")
    model = make_tiny_model(tmp_path / "m", arch, num_hidden_layers=3)
    runs = _both_paths(tmp_path, _recipe(model, "fp8", "fp8", samples=16))
    a, b = runs[False][0].hf_checkpoint_dir, runs[True][0].hf_checkpoint_dir
    assert len(list(a.glob("model-*.safetensors"))) > 2 and (a / "model.safetensors.index.json").is_file()
    assert_same_folder(a, b)


def test_streamed_both_checkpoints(tmp_path, tiny_llama):
    """Both exports from one streamed run: the TensorRT-LLM checkpoint reads the layer before the HF export changes it."""
    from tests.contract.test_streaming import _assert_same_checkpoint

    runs = _both_paths(tmp_path, _recipe(tiny_llama, "fp8", "fp8", trtllm=True))
    (a, _, _), (b, _, _) = runs[False], runs[True]
    assert_same_folder(a.hf_checkpoint_dir, b.hf_checkpoint_dir)
    _assert_same_checkpoint(a.checkpoint_dir, b.checkpoint_dir)


@pytest.mark.parametrize("arch,kv,parked", [("qwen3", "fp8", False), ("gemma3", "fp8", True), ("gemma2", "none", False),
                                            ("qwen3_moe", "fp8", True), ("llama", "none", False), ("deepseek_v3", "none", False)])
def test_streamed_hf_gate_equals_in_memory(tmp_path, monkeypatch, arch, kv, parked):
    """The unified HF checkpoint judged layer by layer (the family's decoder layers, the shipped numerics, each
    layer's own mask and rope) gives the in-memory gate's statistics, weight errors and verdicts bit for bit on a
    CPU: every operation is the same on the same shapes (parked: with the vocabulary matrices parked during the
    layer loop, as on a GPU)."""
    import numpy as np

    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import evaluation_rows
    from trtconv.stages import evaluate_streamed
    from trtconv.stages.evaluate import evaluate_checkpoint

    if parked:
        parked_cls = evaluate_streamed.park_vocab_matrices
        monkeypatch.setattr(evaluate_streamed, "park_vocab_matrices", lambda device, park=True: parked_cls(device, force=True))
    model = make_tiny_model(tmp_path / "m", arch)
    recipe = _recipe(model, "fp8", kv, samples=16)
    recipe = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
        "num_samples": 6, "seq_len": 40, "batch_size": 4})}).resolved()
    ckpt = _both_paths(tmp_path, recipe)[True][0].hf_checkpoint_dir
    e = recipe.evaluate
    tokens = evaluation_rows(builtin_pack("eval"), load_tokenizer(model, False), e.num_samples, e.seq_len, e.seed)
    a, b = (evaluate_checkpoint(recipe, model, ckpt, tokens, "cpu", Reporter(quiet=True), streamed=s) for s in (False, True))
    assert b.record["path"] == "streamed" and a.record["candidate"] == b.record["candidate"]
    for name in ("n_tokens", "nll_baseline", "nll_candidate", "kl", "top1_agree", "token_kl"):
        np.testing.assert_array_equal(getattr(a.stats, name), getattr(b.stats, name), err_msg=name)  # the same operations
    assert [(g.metric, g.value, g.verdict) for g in a.gates] == [(g.metric, g.value, g.verdict) for g in b.gates]
    assert a.weight_errors == b.weight_errors and a.weight_errors


def test_streamed_experts_counted_and_uncalibrated_refused(tmp_path, monkeypatch):
    """Streamed, a never-routed expert is counted per expert as in memory (0 tokens, data-free scales, recorded);
    with its amax gone the build stops naming it (UncalibratedExperts: a UserError, exit 2)."""
    from tests.factories import make_moe_with_unrouted_expert
    from trtconv.core.errors import UncalibratedExperts, UserError
    from trtconv.stages import streamed

    model = make_moe_with_unrouted_expert(tmp_path / "m")
    runs = _both_paths(tmp_path / "ok", _recipe(model, "fp8", "none"))
    a, b = runs[False][1]["experts"], runs[True][1]["experts"]
    assert a == b and b["without_tokens"] == ["model.layers.0.mlp.experts.4"] and b["tokens"]["model.layers.0.mlp"][4] == 0
    assert_same_folder(runs[False][0].hf_checkpoint_dir, runs[True][0].hf_checkpoint_dir)

    calibrate_layer = streamed.calibrate_layer

    def losing_an_amax(layer, i, *args, **kwargs):
        out = calibrate_layer(layer, i, *args, **kwargs)
        if i == 0:
            layer.mlp.experts.down_proj_weight_quantizers[4].reset_amax()
        return out

    monkeypatch.setattr(streamed, "calibrate_layer", losing_an_amax)
    with pytest.raises(UncalibratedExperts, match=r"model\.layers\.0\.mlp\.experts\.4") as caught:
        _both_paths(tmp_path / "bad", _recipe(model, "fp8", "none"))
    assert isinstance(caught.value, UserError)


@pytest.mark.parametrize("exclude,named", [(["*layers.0.*"], "model.layers.0"), (["*layers.1.mlp*"], "model.layers.1.mlp")])
def test_streamed_hf_excluded_layers(tmp_path, exclude, named):
    """The failed gate's advice (layers kept unquantized): exclude_modules as the whole model's export writes it,
    also when the excluded layer is the one the shell exports with (layer 0)."""
    model = make_tiny_model(tmp_path / "m", "qwen3", num_hidden_layers=3)
    runs = _both_paths(tmp_path, _recipe(model, "fp8", "fp8", exclude=exclude))
    a, b = runs[False][0].hf_checkpoint_dir, runs[True][0].hf_checkpoint_dir
    assert_same_folder(a, b)
    excluded = json.loads((b / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "lm_head" in excluded and any(m.startswith(named) for m in excluded), excluded
