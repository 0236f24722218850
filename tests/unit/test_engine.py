"""Engine options, plan checks and the trtllm-build argument list (no model, no subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from trtconv.engine.rebuild import (
    EngineSection,
    PyTorchBackendOptions,
    TensorRTEngineOptions,
    check_engine_plan,
    check_precision_on_device,
    llm_api_options,
    trtllm_build_command,
)
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import UserError

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", sm="9.0", count=1)
A100 = DeviceInfo(kind="cuda", name="NVIDIA A100-SXM4-80GB", sm="8.0", count=1)
B200 = DeviceInfo(kind="cuda", name="NVIDIA B200", sm="10.0", count=8)


def plan(target="tensorrt", *, quant_algo="FP8", kv=None, tp=1, pp=1, kv_heads=8, device=H100, version="1.2.0", **options):
    section = EngineSection(target=target, **({target: options} if options else {}))
    return check_engine_plan(
        section, quant_algo=quant_algo, kv_cache_quant_algo=kv, tp_size=tp, pp_size=pp, num_kv_heads=kv_heads, device=device, trtllm_version=version
    )


def test_defaults_are_trtllm_1x_defaults():
    o = TensorRTEngineOptions()
    assert (o.max_batch_size, o.max_input_len, o.max_seq_len, o.max_num_tokens, o.max_beam_width) == (2048, 1024, None, 8192, 1)
    assert (o.kv_cache_type, o.tokens_per_block, o.gpt_attention_plugin) == ("paged", 32, "auto")
    assert o.context_fmha and o.use_paged_context_fmha and o.remove_input_padding and o.use_fused_mlp
    assert (o.gemm_plugin, o.multiple_profiles, o.workers, o.log_level) == (None, False, 1, "info")
    assert EngineSection().target == "none"


def test_unknown_keys_rejected_and_schema_has_descriptions():
    with pytest.raises(ValidationError, match="paged_kv_cache"):
        EngineSection.model_validate({"target": "tensorrt", "tensorrt": {"paged_kv_cache": True}})
    schema = EngineSection.model_json_schema()
    for model in schema["$defs"].values():
        assert all("description" in prop for prop in model["properties"].values())


def test_build_command_exact_list():
    options = TensorRTEngineOptions(max_batch_size=8, max_seq_len=2048, gemm_plugin="auto", workers=2)
    assert trtllm_build_command(Path("/ck"), Path("/eng"), options, quant_algo="FP8", device=H100) == [
        "trtllm-build", "--checkpoint_dir", "/ck", "--output_dir", "/eng",
        "--max_batch_size", "8", "--max_input_len", "1024", "--max_seq_len", "2048", "--max_num_tokens", "8192",
        "--max_beam_width", "1", "--kv_cache_type", "paged", "--tokens_per_block", "32",
        "--gpt_attention_plugin", "auto", "--context_fmha", "enable", "--use_paged_context_fmha", "enable",
        "--use_fp8_context_fmha", "enable", "--remove_input_padding", "enable", "--use_fused_mlp", "enable",
        "--gemm_plugin", "auto", "--multiple_profiles", "disable", "--workers", "2", "--log_level", "info",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("quant_algo", "device", "expected"),
    [("FP8", H100, "enable"), ("W4A16_AWQ", H100, "disable"), ("FP8", A100, "disable"), ("NVFP4", B200, "disable"), ("FP8", None, "enable")],
)
def test_fp8_context_fmha_auto(quant_algo, device, expected):
    cmd = trtllm_build_command(Path("/c"), Path("/e"), TensorRTEngineOptions(), quant_algo=quant_algo, device=device)
    assert cmd[cmd.index("--use_fp8_context_fmha") + 1] == expected


def test_timing_cache_read_only_when_present(tmp_path):
    cache = tmp_path / "timing.cache"
    options = TensorRTEngineOptions(timing_cache=str(cache), opt_num_tokens=64)
    cmd = trtllm_build_command(Path("/c"), Path("/e"), options, quant_algo=None, device=H100)
    assert "--input_timing_cache" not in cmd and cmd[cmd.index("--output_timing_cache") + 1] == str(cache)
    assert cmd[cmd.index("--opt_num_tokens") + 1] == "64"
    cache.write_bytes(b"x")
    cmd = trtllm_build_command(Path("/c"), Path("/e"), options, quant_algo=None, device=H100)
    assert cmd[cmd.index("--input_timing_cache") + 1] == str(cache)


def test_valid_plan_has_no_warnings():
    assert plan() == []
    assert plan(target="none", quant_algo="NVFP4", device=A100, version="0.21.0") == []


def test_reject_fp8_context_fmha_on_non_fp8_checkpoint():
    with pytest.raises(UserError, match=r"use_fp8_context_fmha=true needs an FP8 or NVFP4 checkpoint; .*quant_algo=W4A16_AWQ"):
        plan(quant_algo="W4A16_AWQ", use_fp8_context_fmha=True)


def test_reject_fp8_context_fmha_on_blackwell():
    with pytest.raises(UserError, match=r"Ada or Hopper GPU \(SM 8.9 or 9.0\); .*SM 10.0"):
        plan(quant_algo="NVFP4", device=B200, use_fp8_context_fmha=True)


def test_reject_opt_num_tokens_with_multiple_profiles():
    with pytest.raises(UserError, match="opt_num_tokens=256 cannot be combined with engine.tensorrt.multiple_profiles=true"):
        plan(opt_num_tokens=256, multiple_profiles=True)


@pytest.mark.parametrize(
    ("options", "needed"),
    [({"kv_cache_type": "continuous"}, "kv_cache_type=paged"), ({"remove_input_padding": False}, "remove_input_padding=true"),
     ({"gpt_attention_plugin": "disable"}, "gpt_attention_plugin enabled")],
)
def test_reject_inflight_batching_without_its_requirements(options, needed):
    with pytest.raises(UserError, match=f"inflight_batching=true needs {needed}"):
        plan(**options)
    assert plan(inflight_batching=False, **options) == []


@pytest.mark.parametrize("tokens", [24, 48, 100])
def test_reject_tokens_per_block_not_power_of_two(tokens):
    with pytest.raises(UserError, match=f"tokens_per_block={tokens} must be a power of two"):
        plan(tokens_per_block=tokens)


def test_tokens_per_block_outside_xqa_range_warns():
    assert any("XQA" in w for w in plan(tokens_per_block=256))


def test_reject_fp8_below_sm89_and_nvfp4_below_sm100():
    with pytest.raises(UserError, match=r"FP8 \(Ada/Hopper or newer\) tensor cores, SM >= 8.9; .*SM 8.0"):
        plan(device=A100)
    with pytest.raises(UserError, match=r"NVFP4 \(Blackwell\) tensor cores, SM >= 10.0; .*SM 9.0"):
        plan(quant_algo="NVFP4")
    with pytest.raises(UserError, match="kv_cache_quant_algo=FP8"):
        check_precision_on_device("W4A16_AWQ", "FP8", A100)
    assert check_precision_on_device("W4A16_AWQ", None, A100) == []
    assert "not checked" in check_precision_on_device("FP8", None, DeviceInfo(kind="cpu", name="x86"))[0]


def test_reject_tp_not_dividing_kv_heads():
    with pytest.raises(UserError, match=r"tp_size=4 does not divide the model's 2 KV heads.*Allowed tp_size here: \[1, 2\]"):
        plan(tp=4, kv_heads=2)


@pytest.mark.parametrize("version", ["1.3.0rc24", "1.3.0", "2.0.0"])
def test_reject_tensorrt_target_after_1_2(version):
    with pytest.raises(UserError, match=r"needs TensorRT-LLM 1.0-1.2; .*removed.*Use engine.target: pytorch"):
        plan(version=version)
    assert plan(target="pytorch", version=version) == []


def test_reject_tensorrt_target_before_1_0():
    with pytest.raises(UserError, match="needs TensorRT-LLM 1.0-1.2; 0.21.0 is installed"):
        plan(version="0.21.0")
    with pytest.raises(UserError, match="engine.target=pytorch needs TensorRT-LLM 1.0 or later"):
        plan(target="pytorch", version="0.21.0")


def test_option_missing_from_installed_version_rejected(monkeypatch):
    from trtconv.engine import plan as engine_checks

    row = engine_checks.OptionAvailability("tensorrt", "tokens_per_block", (1, 1), None, "test row")
    monkeypatch.setattr(engine_checks, "OPTION_AVAILABILITY", (row,))
    with pytest.raises(UserError, match=r"engine.tensorrt.tokens_per_block is not available in TensorRT-LLM 1.0.0: it exists in 1.1 and later"):
        plan(version="1.0.0", tokens_per_block=64)
    assert plan(version="1.0.0") == []  # default value, not set by the recipe: nothing to reject


def test_not_installed_is_a_warning_not_an_error():
    assert "not installed" in plan(version=None)[0]


def test_reject_gemm_plugin_precision_mismatch_and_input_longer_than_seq():
    with pytest.raises(UserError, match="gemm_plugin=fp8 needs an FP8 checkpoint"):
        plan(quant_algo=None, gemm_plugin="fp8")
    with pytest.raises(UserError, match="max_input_len=4096 is larger than engine.tensorrt.max_seq_len=2048"):
        plan(max_input_len=4096, max_seq_len=2048)


def test_pytorch_fp8_kv_without_calibrated_kv_warns_and_needs_sm89():
    warnings = plan(target="pytorch", quant_algo=None, kv_cache_dtype="fp8")
    assert any("KV scales default to 1.0" in w for w in warnings)
    with pytest.raises(UserError, match="SM >= 8.9"):
        plan(target="pytorch", quant_algo=None, kv_cache_dtype="fp8", device=A100)


def test_llm_api_options_shape():
    options = PyTorchBackendOptions(max_batch_size=16, max_seq_len=4096, cuda_graphs=[8, 1, 2, 2], kv_cache_dtype="fp8")
    assert llm_api_options(options, tp_size=2, pp_size=1) == {
        "max_batch_size": 16,
        "max_num_tokens": 8192,
        "max_seq_len": 4096,
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "attn_backend": "TRTLLM",
        "kv_cache_config": {"dtype": "fp8", "free_gpu_memory_fraction": 0.9},
        "cuda_graph_config": {"batch_sizes": [1, 2, 8]},
    }
    assert llm_api_options(PyTorchBackendOptions(cuda_graphs=False), tp_size=1, pp_size=1)["cuda_graph_config"] is None
    with pytest.raises(ValidationError):
        PyTorchBackendOptions(attention_backend="FLASH")


def test_llm_api_options_pass_the_sliding_window():
    """A Mistral window reaches the runtime as KvCacheConfig.max_attention_window (one entry, repeated per layer)."""
    data = llm_api_options(PyTorchBackendOptions(), tp_size=1, pp_size=1, attention_window=4096)
    assert data["kv_cache_config"] == {"dtype": "auto", "free_gpu_memory_fraction": 0.9, "max_attention_window": [4096]}
    assert "max_attention_window" not in llm_api_options(PyTorchBackendOptions(), tp_size=1, pp_size=1)["kv_cache_config"]
