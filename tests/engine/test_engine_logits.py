"""trtconv.engine.logits through the TensorRT-LLM TEST DOUBLE (tests/doubles/).

The double computes context logits with trtconv's OWN reference executor, so "engine logits ==
checkpoint executor logits" holds by construction there: these tests check orchestration (which
LLM class, which arguments, padding, vocabulary slicing, refusals), not TensorRT-LLM numerics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.doubles.conftest_double import no_trtllm, trtllm_double  # noqa: F401  (fixtures)
from trtconv.engine.rebuild import PyTorchBackendOptions, TensorRTEngineOptions, build_tensorrt_engine, prepare_pytorch_target, trtllm_build_command
from trtconv.engine.logits import engine_candidate
from trtconv.engine.record import TrtllmInstall
from trtconv.core.environment import DeviceInfo

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3 (pretend)", sm="9.0", count=1)
A100 = DeviceInfo(kind="cuda", name="NVIDIA A100-SXM4-80GB (pretend)", sm="8.0", count=1)
OPTIONS = dict(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=256)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, Path]:
    """A tiny FP8 Llama (ModelOpt, CPU): its TensorRT-LLM checkpoint and the HF folder with the tokenizer."""
    from tests.exports import export_trtllm, make_model, quantize

    root = tmp_path_factory.mktemp("engine_logits")
    model = quantize(make_model(root, "llama"), "fp8")
    return {"checkpoint": export_trtllm(model, root / "checkpoint"), "hf": root / "hf_llama"}


def tensorrt_artifact(tmp_path: Path, export: dict[str, Path], *, gather: bool) -> tuple[Path, dict]:
    """OUT/checkpoint + OUT/engine built by the double's trtllm-build, and the engine record as the manifest holds it."""
    out = tmp_path / "out"
    shutil.copytree(export["checkpoint"], out / "checkpoint")
    options = TensorRTEngineOptions(**OPTIONS, gather_context_logits=gather)
    record = build_tensorrt_engine(out / "checkpoint", out / "engine", options, require=True, device=H100)
    assert record.status == "built", record.reason
    return out, record.model_dump(mode="json")


def vocab_of(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])


def test_tensorrt_engine_logits_padding_and_vocab(trtllm_double, export, tmp_path, monkeypatch):
    from trtconv.checkpoints.trtllm_reader import load_checkpoint_model

    import trtconv.engine.logits

    monkeypatch.setattr(trtconv.engine.logits, "detect_device", lambda *a, **k: H100)
    out, record = tensorrt_artifact(tmp_path, export, gather=True)
    assert "--gather_context_logits" in record["command"]
    assert json.loads((out / "engine" / "config.json").read_text())["build_config"]["gather_context_logits"] is True
    vocab = vocab_of(out / "checkpoint") - 5  # a smaller real vocabulary: the padded ids are sliced off
    candidate = engine_candidate(out, record, vocab, tokenizer_dir=export["hf"], seq_len=16)
    assert candidate.available, candidate.reason
    assert "tensorrt_llm._tensorrt_engine.LLM" in candidate.description
    llm = candidate._llm
    assert llm.kv_cache_config.enable_block_reuse is False  # prefix reuse would truncate context logits
    sent = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda inputs, **kw: sent.append((inputs, kw)) or generate(inputs, **kw))

    ids = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    got = candidate.fn(ids, lengths=[16, 9, 1])
    assert got.shape == (3, 16, vocab) and got.dtype == torch.float32
    [(prompts, kwargs)] = sent
    assert [len(p) for p in prompts] == [16, 9, 1] and prompts[1] == ids[1, :9].tolist()  # real tokens only
    assert kwargs["sampling_params"].max_tokens == 1 and kwargs["sampling_params"].return_context_logits is True
    want = load_checkpoint_model(out / "checkpoint").logits(ids)[..., :vocab]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :9], want[1, :9], atol=1e-5, rtol=1e-5)  # causal: padding never leaks back
    torch.testing.assert_close(got[2, :1], want[2, :1], atol=1e-5, rtol=1e-5)
    assert not got[1, 9:].any() and not got[2, 1:].any()
    torch.testing.assert_close(candidate.fn(ids), want, atol=1e-5, rtol=1e-5)  # no lengths: whole rows
    with candidate:
        pass
    assert llm.shut_down and candidate._llm is None


def test_built_without_context_logits_falls_back(trtllm_double, export, tmp_path):
    out, record = tensorrt_artifact(tmp_path, export, gather=False)
    assert "--gather_context_logits" not in record["command"]
    candidate = engine_candidate(out, record, 64, tokenizer_dir=export["hf"], device=H100)
    assert not candidate.available and "built without gather_context_logits" in candidate.reason
    # The double's runtime enforces the same contract as the real one.
    from tensorrt_llm import SamplingParams
    from tensorrt_llm._tensorrt_engine import LLM

    llm = LLM(model=str(out / "engine"), tokenizer=str(export["hf"]))
    with pytest.raises(ValueError, match="gather_context_logits"):
        llm.generate([[1, 2, 3]], sampling_params=SamplingParams(max_tokens=1, return_context_logits=True))
    with pytest.raises(TypeError):
        SamplingParams(max_new_tokens=1)  # not a SamplingParams field in 1.x


@pytest.mark.parametrize(
    ("device", "version", "expected"),
    [(A100, "1.2.0", "SM 8.0"), (H100, "1.1.0", "built with TensorRT-LLM 1.2.0"), (DeviceInfo(kind="cpu", name="cpu"), "1.2.0", "no CUDA GPU")],
)
def test_host_that_cannot_run_the_engine_falls_back(trtllm_double, export, tmp_path, device, version, expected):
    out, record = tensorrt_artifact(tmp_path, export, gather=True)
    install = TrtllmInstall(True, version, "10.13.3.9")
    candidate = engine_candidate(out, record, 64, tokenizer_dir=export["hf"], device=device, install=install)
    assert not candidate.available and expected in candidate.reason


def test_rows_longer_than_the_engine_takes_fall_back(trtllm_double, export, tmp_path):
    out, record = tensorrt_artifact(tmp_path, export, gather=True)
    candidate = engine_candidate(out, record, 64, tokenizer_dir=export["hf"], seq_len=256, device=H100)
    assert not candidate.available and "max_input_len 64" in candidate.reason


def test_not_installed_and_not_built(no_trtllm, tmp_path):
    (tmp_path / "engine").mkdir()
    built = {"target": "tensorrt", "status": "built"}
    candidate = engine_candidate(tmp_path, built, 64, tokenizer_dir=tmp_path, device=H100)  # real probe, in a child process
    assert not candidate.available and candidate.reason.startswith("tensorrt_llm is not installed")
    not_built = {"target": "tensorrt", "status": "not_built", "reason": "not built: tensorrt_llm is not installed"}
    candidate = engine_candidate(tmp_path, not_built, 64, tokenizer_dir=tmp_path)
    assert "'not_built'" in candidate.reason and "tensorrt_llm is not installed" in candidate.reason
    assert "no TensorRT-LLM runtime" in engine_candidate(tmp_path, {"target": "none"}, 64, tokenizer_dir=tmp_path).reason


def test_pytorch_backend_logits(trtllm_double, tiny_llama, tmp_path):
    from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

    out = tmp_path / "out"
    shutil.copytree(tiny_llama, out / "hf_checkpoint")
    options = PyTorchBackendOptions(max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    record = prepare_pytorch_target(out / "hf_checkpoint", out / "engine", options, tp_size=1, pp_size=1, require=True, device=H100)
    assert record.status == "built", record.reason
    vocab = vocab_of(out / "hf_checkpoint")
    candidate = engine_candidate(out, record.model_dump(mode="json"), vocab, tokenizer_dir=out / "hf_checkpoint", device=H100)
    assert candidate.available, candidate.reason
    assert candidate._llm.kwargs["kv_cache_config"].enable_block_reuse is False
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with candidate:
        got = candidate.fn(ids, lengths=[12, 7])
    want = load_hf_checkpoint_model(out / "hf_checkpoint").logits(ids)[..., :vocab]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :7], want[1, :7], atol=1e-5, rtol=1e-5)
    assert not got[1, 7:].any()
    too_long = engine_candidate(out, record.model_dump(mode="json"), vocab, tokenizer_dir=out, seq_len=64, device=H100)
    assert "max_seq_len 64" in too_long.reason
    old = engine_candidate(out, record.model_dump(mode="json"), vocab, tokenizer_dir=out, device=H100, install=TrtllmInstall(True, "1.0.0", None))
    assert "from 1.1 on" in old.reason


def test_build_command_passes_gather_context_logits_only_when_asked(tmp_path):
    on = trtllm_build_command(tmp_path, tmp_path / "e", TensorRTEngineOptions(gather_context_logits=True), quant_algo=None, device=H100)
    off = trtllm_build_command(tmp_path, tmp_path / "e", TensorRTEngineOptions(), quant_algo=None, device=H100)
    assert on[-1] == "--gather_context_logits" and "--gather_context_logits" not in off


# -- sliding window: the runtime is told the window on both targets --------------------------------


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory) -> dict:
    """A tiny Mistral with sliding_window 8: its HF folder, TensorRT-LLM checkpoint (window repaired in as the export stage does)."""
    from tests.exports import export_trtllm, make_model
    from trtconv.stages.export import repair_trtllm_config

    root = tmp_path_factory.mktemp("window")
    model = make_model(root, "mistral", sliding_window=8)
    ckpt = export_trtllm(model, root / "checkpoint")
    config = json.loads((ckpt / "config.json").read_text())
    repair_trtllm_config(config, model.config, "MistralForCausalLM")
    (ckpt / "config.json").write_text(json.dumps(config))
    return {"model": model, "checkpoint": ckpt, "hf": root / "hf_mistral"}


def test_tensorrt_engine_gets_the_window(trtllm_double, windowed_mistral, tmp_path, monkeypatch):
    import trtconv.engine.logits

    monkeypatch.setattr(trtconv.engine.logits, "detect_device", lambda *a, **k: H100)
    out, record = tensorrt_artifact(tmp_path, windowed_mistral, gather=True)
    assert json.loads((out / "engine" / "config.json").read_text())["pretrained_config"]["runtime_defaults"] == {"max_attention_window": [8]}
    vocab = vocab_of(out / "checkpoint")
    candidate = engine_candidate(out, record, vocab, tokenizer_dir=windowed_mistral["hf"], seq_len=24)
    assert candidate.available, candidate.reason
    assert candidate._llm.kv_cache_config.max_attention_window == [8]
    ids = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = windowed_mistral["model"](ids).logits.float()
    torch.testing.assert_close(candidate.fn(ids), want, atol=2e-4, rtol=1e-4)


def test_pytorch_options_carry_the_window(trtllm_double, windowed_mistral, tmp_path):
    import copy

    import yaml
    from modelopt.torch.export import export_hf_checkpoint

    out = tmp_path / "out"
    export_hf_checkpoint(copy.deepcopy(windowed_mistral["model"]), dtype=torch.bfloat16, export_dir=out / "hf_checkpoint")
    for tokenizer_file in windowed_mistral["hf"].glob("tokenizer*"):
        shutil.copy(tokenizer_file, out / "hf_checkpoint")
    options = PyTorchBackendOptions(max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    record = prepare_pytorch_target(out / "hf_checkpoint", out / "engine", options, tp_size=1, pp_size=1, require=True, device=H100)
    assert record.status == "built", record.reason
    written = yaml.safe_load((out / "engine" / "llm_api_options.yaml").read_text())
    assert written["kv_cache_config"]["max_attention_window"] == [8]
    vocab = vocab_of(out / "hf_checkpoint")
    candidate = engine_candidate(out, record.model_dump(mode="json"), vocab, tokenizer_dir=out / "hf_checkpoint", device=H100)
    assert candidate.available, candidate.reason
    assert candidate._llm.kwargs["kv_cache_config"].max_attention_window == [8]
