"""The engine stage through the real CLI, with the TensorRT-LLM TEST DOUBLE (tests/doubles/).

The double enforces the documented checkpoint and engine-folder contract; it is not TensorRT-LLM.
A fake H100 is reported to the engine module only (calibration still runs on this CPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.doubles.conftest_double import DOUBLES_DIR, no_trtllm, trtllm_double  # noqa: F401  (fixtures)
from trtconv.core.environment import DeviceInfo

pytestmark = pytest.mark.integration

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3 (pretend)", sm="9.0", count=2, memory_gib=79.6, cuda="13.0")
FAST = ["--set", "calibration.num_samples=4", "--set", "calibration.seq_len=64", "--set", "evaluate.enabled=false"]


def recipe(tmp_path: Path, model: Path, tp: int = 1, target: str = "tensorrt") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        f"name: engine-test\nmodel:\n  path: {model}\nquantization:\n  precision: fp8\n"
        f"export:\n  tp_size: {tp}\n  hf_checkpoint: {str(target == 'pytorch').lower()}\n"
        f"engine:\n  target: {target}\n  tensorrt:\n    max_batch_size: 8\n    max_input_len: 128\n    max_seq_len: 256\n"
    )
    return p


@pytest.fixture
def pretend_gpu(monkeypatch):
    import trtconv.engine.pytorch
    import trtconv.engine.tensorrt

    monkeypatch.setattr(trtconv.engine.tensorrt, "detect_device", lambda *a, **k: H100)
    monkeypatch.setattr(trtconv.engine.pytorch, "detect_device", lambda *a, **k: H100)


@pytest.mark.parametrize("tp", [1, 2])
def test_build_tensorrt_engine_through_the_double(cli, tiny_llama, tmp_path, trtllm_double, pretend_gpu, tp):
    out = tmp_path / "out"
    res = cli("build", recipe(tmp_path, tiny_llama, tp), "-o", out, "--require-engine", *FAST)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    eng = m["engine"]
    assert eng["status"] == "built" and eng["target"] == "tensorrt"
    assert eng["command"][0] == "trtllm-build" and "--gpt_attention_plugin" in eng["command"]
    assert eng["sm"] == "9.0" and eng["tensorrt_llm_version"] == "1.2.0"
    engines = sorted(p.name for p in (out / "engine").glob("rank*.engine"))
    assert engines == [f"rank{r}.engine" for r in range(tp)]
    cfg = json.loads((out / "engine" / "config.json").read_text())
    assert set(cfg) == {"version", "pretrained_config", "build_config"}
    assert cfg["pretrained_config"]["mapping"]["world_size"] == tp
    assert "engine/rank0.engine" in {f["path"] for f in m["outputs"]}
    assert cli("verify", out).exit_code == 0
    assert "bound to SM 9.0" in cli("inspect", out).stdout


def test_no_tensorrt_llm_records_the_command_and_require_engine_fails(cli, tiny_llama, tmp_path, no_trtllm):
    out = tmp_path / "out"
    res = cli("build", recipe(tmp_path, tiny_llama), "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    eng = json.loads((out / "manifest.json").read_text())["engine"]
    assert eng["status"] == "not_built" and "tensorrt_llm is not installed" in eng["reason"]
    assert eng["command"][:3] == ["trtllm-build", "--checkpoint_dir", eng["command"][2]]
    strict = tmp_path / "strict"
    res = cli("build", recipe(tmp_path, tiny_llama), "-o", strict, "--require-engine", *FAST)
    assert res.exit_code == 3 and "tensorrt_llm is not installed" in res.output
    assert not strict.exists()


def test_engine_command_builds_for_an_existing_artifact(cli, tiny_llama, tmp_path, trtllm_double, pretend_gpu, monkeypatch):
    # Job 1 (CPU runner, no TensorRT-LLM): checkpoint + gate, engine not built.
    out = tmp_path / "out"
    r = recipe(tmp_path, tiny_llama)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # hide the double's trtllm-build for the first job
    first = cli("build", r, "-o", out, *FAST)
    assert first.exit_code == 0, first.output
    assert json.loads((out / "manifest.json").read_text())["engine"]["status"] == "not_built"
    monkeypatch.undo()
    # Job 2 (GPU runner): `trtconv engine OUT` builds it and updates the manifest.
    import trtconv.engine.tensorrt

    monkeypatch.setattr(trtconv.engine.tensorrt, "detect_device", lambda *a, **k: H100)
    monkeypatch.setenv("PATH", os.pathsep.join([str(DOUBLES_DIR / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(DOUBLES_DIR), str(DOUBLES_DIR.parent.parent)]))
    res = cli("engine", out, "--require-engine")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["engine"]["status"] == "built"
    assert (out / "engine" / "rank0.engine").is_file()
    assert cli("verify", out).exit_code == 0


def test_engine_command_refuses_a_failed_artifact(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    res = cli("build", recipe(tmp_path, tiny_llama), "-o", out,
              "--set", "calibration.num_samples=4", "--set", "calibration.seq_len=64",
              "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64", "--set", "evaluate.gates.max_kl=0")
    assert res.exit_code == 1, res.output
    refused = cli("engine", out)
    assert refused.exit_code == 2 and "not 'passed'" in refused.output and "--force" in refused.output


def test_gate_judges_the_engine_where_tensorrt_llm_runs(cli, tiny_llama, tmp_path, trtllm_double, pretend_gpu, monkeypatch):
    """With context logits in the engine, the candidate is the engine through the LLM API (here: the
    double's LLM, which borrows trtconv's executor, so this checks orchestration, not TensorRT)."""
    import trtconv.engine.logits

    monkeypatch.setattr(trtconv.engine.logits, "detect_device", lambda *a, **k: H100, raising=False)
    out = tmp_path / "out"
    res = cli(
        "build", recipe(tmp_path, tiny_llama), "-o", out, "--require-engine",
        "--set", "calibration.num_samples=4", "--set", "calibration.seq_len=64",
        "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64",
        "--set", "evaluate.allow_inconclusive=true", "--set", "evaluate.gates.min_top1_agreement=0",
        "--set", "engine.tensorrt.gather_context_logits=true",
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert "engine" in m["evaluation"]["candidate"].lower() and "engine_fallback_reason" not in m["evaluation"]
    # Without context logits in the engine, the gate falls back to the checkpoint and says why.
    out2 = tmp_path / "out2"
    res = cli(
        "build", recipe(tmp_path, tiny_llama), "-o", out2, "--require-engine",
        "--set", "calibration.num_samples=4", "--set", "calibration.seq_len=64",
        "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64",
        "--set", "evaluate.allow_inconclusive=true", "--set", "evaluate.gates.min_top1_agreement=0",
    )
    assert res.exit_code == 0, res.output
    ev = json.loads((out2 / "manifest.json").read_text())["evaluation"]
    assert ev["candidate"].startswith("TensorRT-LLM checkpoint") and "gather_context_logits" in ev["engine_fallback_reason"]
