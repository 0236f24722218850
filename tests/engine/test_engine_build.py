"""The tensorrt target end to end through the TensorRT-LLM TEST DOUBLE, on real ModelOpt exports."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.doubles.conftest_double import no_trtllm, requires_real_tensorrt_llm, trtllm_double  # noqa: F401  (fixtures)
from trtconv.engine.rebuild import (
    NOT_INSTALLED_REASON,
    STAMP_NAME,
    EngineSection,
    TensorRTEngineOptions,
    build_tensorrt_engine,
    check_engine_compatible,
    probe_tensorrt_llm,
    rebuild_engine_for_artifact,
)
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import ArtifactError, CheckpointError, EngineUnavailable, UserError

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", sm="9.0", count=2)
SMALL = TensorRTEngineOptions(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=256)


@pytest.fixture(scope="module")
def fp8_exports(tmp_path_factory) -> dict[int, Path]:
    """A tiny Llama quantized to FP8 by ModelOpt, exported at tp=1 and tp=2 (real exporter, CPU)."""
    from tests.exports import export_trtllm, make_model, quantize

    root = tmp_path_factory.mktemp("fp8_exports")
    model = quantize(make_model(root, "llama"), "fp8")
    return {tp: export_trtllm(model, root / f"tp{tp}", tp=tp) for tp in (1, 2)}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tp1_build_through_double(trtllm_double, fp8_exports, tmp_path):
    record = build_tensorrt_engine(fp8_exports[1], tmp_path / "engine", SMALL, require=True, device=H100)
    assert record.status == "built", record.reason
    engine = tmp_path / "engine"
    config = json.loads((engine / "config.json").read_text())
    assert set(config) == {"version", "pretrained_config", "build_config"} and config["version"] == "1.2.0"
    assert config["build_config"]["plugin_config"]["use_fp8_context_fmha"] is True
    assert (engine / "rank0.engine").read_bytes().startswith(b"TRTCONV TEST DOUBLE ENGINE")
    assert record.files == sorted(["build.log", "config.json", "rank0.engine", STAMP_NAME])
    assert (record.tensorrt_llm_version, record.tensorrt_version, record.gpu_name, record.sm) == ("1.2.0", "10.13.3.9", H100.name, "9.0")
    assert record.command[0] == "trtllm-build" and record.options["max_batch_size"] == 4 and record.wall_time_s >= 0
    assert record.engine_dir == str(engine.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_tp2_build_has_one_engine_per_rank(trtllm_double, fp8_exports, tmp_path):
    record = build_tensorrt_engine(fp8_exports[2], tmp_path / "engine", SMALL, require=True, device=H100)
    assert record.status == "built", record.reason
    assert {"rank0.engine", "rank1.engine"} <= set(record.files)
    stamp = json.loads((tmp_path / "engine" / STAMP_NAME).read_text())
    assert (stamp["world_size"], stamp["sm"], stamp["tensorrt_llm"], stamp["tensorrt"]) == (2, "9.0", "1.2.0", "10.13.3.9")


def test_missing_tensor_surfaces_double_message(trtllm_double, fp8_exports, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = copy_checkpoint(fp8_exports[1], tmp_path / "ckpt")
    tensors = load_file(ckpt / "rank0.safetensors")
    del tensors["transformer.layers.1.mlp.gate.weights_scaling_factor"]
    save_file(tensors, ckpt / "rank0.safetensors")
    record = build_tensorrt_engine(ckpt, tmp_path / "engine", SMALL, require=True, device=H100)
    assert record.status == "failed"
    assert "Required but not provided tensors" in record.reason and "layers.1.mlp.gate.weights_scaling_factor" in record.reason
    assert not (tmp_path / "engine").exists()


def test_missing_rank_file_fails_with_loader_message(trtllm_double, fp8_exports, tmp_path):
    ckpt = copy_checkpoint(fp8_exports[2], tmp_path / "ckpt")
    (ckpt / "rank1.safetensors").unlink()
    record = build_tensorrt_engine(ckpt, tmp_path / "engine", SMALL, require=True, device=H100)
    assert record.status == "failed" and "rank1.safetensors" in record.reason and "FileNotFoundError" in record.reason


def test_failed_build_keeps_previous_engine(trtllm_double, fp8_exports, tmp_path, monkeypatch):
    engine = tmp_path / "engine"
    assert build_tensorrt_engine(fp8_exports[2], engine, SMALL, require=True, device=H100).status == "built"
    before = {p.name: p.read_bytes() for p in engine.iterdir()}
    monkeypatch.setenv("TRTCONV_DOUBLE_BUILD_CRASH_AFTER_RANK", "0")  # dies after writing rank0.engine
    record = build_tensorrt_engine(fp8_exports[2], engine, SMALL.model_copy(update={"max_batch_size": 8}), require=True, device=H100)
    assert record.status == "failed" and "exited 134" in record.reason and "simulated crash" in record.log_tail
    assert {p.name: p.read_bytes() for p in engine.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_incomplete_engine_output_is_rejected(trtllm_double, fp8_exports, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_DOUBLE_BUILD_SKIP_RANK", "1")
    record = build_tensorrt_engine(fp8_exports[2], tmp_path / "engine", SMALL, require=True, device=H100)
    assert record.status == "failed" and "rank1.engine is missing" in record.reason
    assert not (tmp_path / "engine").exists()


def test_not_built_without_tensorrt_llm(no_trtllm, fp8_exports, tmp_path):
    record = build_tensorrt_engine(fp8_exports[1], tmp_path / "engine", SMALL, require=False, device=H100)
    assert (record.status, record.reason) == ("not_built", NOT_INSTALLED_REASON)
    assert record.command[:3] == ["trtllm-build", "--checkpoint_dir", str(fp8_exports[1].resolve())]
    assert not (tmp_path / "engine").exists()
    with pytest.raises(EngineUnavailable, match="not built: tensorrt_llm is not installed.*trtllm-build --checkpoint_dir") as info:
        build_tensorrt_engine(fp8_exports[1], tmp_path / "engine", SMALL, require=True, device=H100)
    assert info.value.exit_code == 3


def test_not_built_without_gpu(trtllm_double, fp8_exports, tmp_path):
    cpu = DeviceInfo(kind="cpu", name="AMD EPYC")
    record = build_tensorrt_engine(fp8_exports[1], tmp_path / "engine", SMALL, require=False, device=cpu)
    assert record.status == "not_built" and "needs a CUDA GPU" in record.reason


def test_tensorrt_target_refused_on_1_3(trtllm_double, fp8_exports, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_DOUBLE_TRTLLM_VERSION", "1.3.0rc24")
    with pytest.raises(UserError, match="Use engine.target: pytorch"):
        build_tensorrt_engine(fp8_exports[1], tmp_path / "engine", SMALL, require=True, device=H100)


def test_double_rejects_unknown_flag_and_conflicting_options(trtllm_double, fp8_exports, tmp_path):
    base = ["trtllm-build", "--checkpoint_dir", str(fp8_exports[1]), "--output_dir", str(tmp_path / "e")]
    result = subprocess.run([*base, "--paged_kv_cache_typo", "enable"], capture_output=True, text=True)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
    result = subprocess.run([*base, "--opt_num_tokens", "64", "--multiple_profiles", "enable"], capture_output=True, text=True)
    assert result.returncode == 1 and "opt_num_tokens" in result.stderr
    result = subprocess.run([*base, "--auto_parallel", "2"], capture_output=True, text=True)
    assert result.returncode == 2  # removed in 1.2


# --- portability -----------------------------------------------------------------------------


def test_engine_refused_on_other_sm_or_versions(trtllm_double, fp8_exports, tmp_path):
    engine = tmp_path / "engine"
    build_tensorrt_engine(fp8_exports[1], engine, SMALL, require=True, device=H100)
    same = {"tensorrt_llm": "1.2.0", "tensorrt": "10.13.3.9"}
    check_engine_compatible(engine, H100, same)
    with pytest.raises(UserError, match=r"built on NVIDIA H100 80GB HBM3 \(SM 9.0\); this GPU 'NVIDIA A100' is SM 8.0"):
        check_engine_compatible(engine, DeviceInfo(kind="cuda", name="NVIDIA A100", sm="8.0"), same)
    with pytest.raises(UserError, match="built with TensorRT 10.13.3.9; 10.11.0.33 is installed"):
        check_engine_compatible(engine, H100, {**same, "tensorrt": "10.11.0.33"})
    with pytest.raises(UserError, match="built with TensorRT-LLM 1.2.0; it is not installed here"):
        check_engine_compatible(engine, H100, {**same, "tensorrt_llm": None})
    (engine / STAMP_NAME).unlink()
    with pytest.raises(UserError, match=f"{STAMP_NAME} is missing"):
        check_engine_compatible(engine, H100, same)


# --- trtconv engine OUT ----------------------------------------------------------------------


def make_artifact(root: Path, checkpoint: Path, *, status: str = "passed", tp: int = 1) -> Path:
    copy_checkpoint(checkpoint, root / "checkpoint")
    recipe = {"export": {"tp_size": tp, "pp_size": 1}, "engine": EngineSection(target="tensorrt", tensorrt=SMALL).model_dump(mode="json")}
    (root / "manifest.json").write_text(json.dumps({"status": status, "recipe": recipe}))
    return root


def test_rebuild_for_artifact(trtllm_double, fp8_exports, tmp_path):
    out = make_artifact(tmp_path / "out", fp8_exports[2], tp=2)
    record = rebuild_engine_for_artifact(out, force=False, require=True, device=H100)
    assert record.status == "built" and (out / "engine" / "rank1.engine").is_file()


def test_rebuild_refuses_failed_gate_without_force(trtllm_double, fp8_exports, tmp_path):
    out = make_artifact(tmp_path / "out", fp8_exports[1], status="failed")
    with pytest.raises(UserError, match="status is 'failed', not 'passed'.*--force"):
        rebuild_engine_for_artifact(out, force=False, require=True, device=H100)
    assert not (out / "engine").exists()
    assert rebuild_engine_for_artifact(out, force=True, require=True, device=H100).status == "built"


def test_rebuild_clear_errors_for_missing_manifest_and_rank(tmp_path, fp8_exports):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        rebuild_engine_for_artifact(tmp_path, force=False, require=False)
    out = make_artifact(tmp_path / "out", fp8_exports[2], tp=2)
    (out / "checkpoint" / "rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rank1.safetensors is missing: a world_size 2 checkpoint needs rank0..rank1"):
        rebuild_engine_for_artifact(out, force=False, require=False)


def test_probe_sees_double(trtllm_double):
    install = probe_tensorrt_llm()
    assert (install.importable, install.version, install.tensorrt_version) == (True, "1.2.0", "10.13.3.9")


@pytest.mark.tensorrt_llm
@requires_real_tensorrt_llm
def test_real_trtllm_build(fp8_exports, tmp_path):
    """Only where the real TensorRT-LLM (1.0-1.2) and a GPU are present."""
    record = build_tensorrt_engine(fp8_exports[1], tmp_path / "engine", SMALL, require=True)
    assert record.status == "built", record.log_tail
