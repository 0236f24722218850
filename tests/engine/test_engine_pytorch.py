"""The pytorch target: llm_api_options.yaml + the smoke check through the TensorRT-LLM TEST DOUBLE."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.doubles.conftest_double import no_trtllm, trtllm_double  # noqa: F401  (fixtures)
from trtconv.engine.rebuild import OPTIONS_FILE, STAMP_NAME, PyTorchBackendOptions, prepare_pytorch_target, rebuild_engine_for_artifact
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import EngineUnavailable

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", sm="9.0", count=2)
OPTIONS = PyTorchBackendOptions(max_batch_size=8, max_seq_len=256, cuda_graphs=[1, 4])


def test_yaml_written_and_smoke_checked(trtllm_double, tiny_llama, tmp_path):
    record = prepare_pytorch_target(tiny_llama, tmp_path / "engine", OPTIONS, tp_size=1, pp_size=1, require=True, device=H100)
    assert record.status == "built", (record.reason, record.log_tail)
    text = (tmp_path / "engine" / OPTIONS_FILE).read_text()
    assert yaml.safe_load(text) == record.options and text.index("attn_backend") < text.index("max_batch_size")  # sorted
    smoke = json.loads((tmp_path / "engine" / "smoke.json").read_text())
    assert len(smoke["token_ids"]) == 8
    assert record.files == sorted([OPTIONS_FILE, "smoke.json", STAMP_NAME])


def test_smoke_failure_leaves_nothing(trtllm_double, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_DOUBLE_LLM_FAIL", "1")
    record = prepare_pytorch_target(tiny_llama, tmp_path / "engine", OPTIONS, tp_size=1, pp_size=1, require=True, device=H100)
    assert record.status == "failed" and "simulated failure" in record.reason
    assert not (tmp_path / "engine").exists()


def test_not_installed_writes_yaml_only_or_raises_when_required(no_trtllm, tiny_llama, tmp_path):
    record = prepare_pytorch_target(tiny_llama, tmp_path / "engine", OPTIONS, tp_size=2, pp_size=1, require=False, device=H100)
    assert record.status == "not_built" and record.reason.startswith("not built: tensorrt_llm is not installed")
    assert yaml.safe_load((tmp_path / "engine" / OPTIONS_FILE).read_text())["tensor_parallel_size"] == 2
    with pytest.raises(EngineUnavailable, match="not built: tensorrt_llm is not installed"):
        prepare_pytorch_target(tiny_llama, tmp_path / "engine2", OPTIONS, tp_size=1, pp_size=1, require=True, device=H100)
    assert not (tmp_path / "engine2").exists()


def test_rebuild_pytorch_target_from_artifact(trtllm_double, tiny_llama, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_llama, out / "hf_checkpoint")
    recipe = {"export": {"tp_size": 1, "pp_size": 1}, "engine": {"target": "pytorch", "pytorch": {"max_batch_size": 4}}}
    (out / "manifest.json").write_text(json.dumps({"status": "passed", "recipe": recipe}))
    record = rebuild_engine_for_artifact(out, force=False, require=True, device=H100)
    assert record.status == "built" and record.options["max_batch_size"] == 4
