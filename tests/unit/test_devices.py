"""`--gpus N`: the device check build, plan and doctor share, the hand-off between layers, the plan's split rows."""

from __future__ import annotations

import json
import threading

import pytest

from tests.unit.test_memory_plan import LLAMA3_70B, _plan, _recipe
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import UserError
from trtconv.stages.devices import Handoff, check_gpus, check_split

CPU = DeviceInfo(kind="cpu", name="cpu", count=2)
TWO_H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", sm="9.0", count=2, memory_gib=79.6)


def test_cpu_refuses_several_devices_unless_simulated(monkeypatch):
    monkeypatch.delenv("TRTCONV_SIMULATED_DEVICES", raising=False)
    assert check_gpus(1, CPU).names == ("cpu",)
    with pytest.raises(UserError, match=r"--gpus 2: this host has no CUDA GPU: the CPU is one device; allowed: 1 to 1"):
        check_gpus(2, CPU)
    from trtconv.cli.doctor import _gpus_check

    assert _gpus_check(CPU, UserError)["detail"].startswith("build --gpus 1 to 1: no CUDA GPU")
    monkeypatch.setenv("TRTCONV_SIMULATED_DEVICES", "3")
    assert "simulated devices on the CPU" in _gpus_check(CPU, UserError)["detail"]
    d = check_gpus(3, CPU)
    assert d.simulated and d.count == 3 and "not a GPU run" in d.describe()
    with pytest.raises(UserError, match="allowed: 1 to 3"):
        check_gpus(4, CPU)
    monkeypatch.setenv("TRTCONV_SIMULATED_DEVICES", "two")
    with pytest.raises(UserError, match="TRTCONV_SIMULATED_DEVICES='two': allowed: a positive integer"):
        check_gpus(2, CPU)
    assert _gpus_check(CPU, UserError)["status"] == "fail"


def test_cuda_allows_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("TRTCONV_SIMULATED_DEVICES", "8")  # never counts on a GPU host
    assert check_gpus(2, TWO_H100).names == ("cuda:0", "cuda:1") and not check_gpus(2, TWO_H100).simulated
    assert check_gpus(1, TWO_H100).names == ("cuda",)
    with pytest.raises(UserError, match=r"--gpus 4: this host has 2 visible GPU\(s\); allowed: 1 to 2$"):
        check_gpus(4, TWO_H100)


def test_split_needs_the_streamed_path():
    check_split(1, False)
    check_split(2, True)
    with pytest.raises(UserError, match="calibration.streaming: never; allowed"):
        check_split(2, False)


def test_handoff_waits_for_each_batch_and_falls_back_to_the_last_pass():
    h = Handoff(2)
    got = []
    reader = threading.Thread(target=lambda: got.extend([h.get(0, 1), h.get(1, 0)]))
    reader.start()
    h.put(0, 1, "p0b1")
    h.put(0, 0, "p0b0")
    h.close()  # one pass only: the consumer's pass 1 reads pass 0 (as streamed.calibrate_layer does)
    reader.join(5)
    assert got == ["p0b1", "p0b0"]
    failed = Handoff(1)
    failed.close(ValueError("layer 3"))
    with pytest.raises(RuntimeError, match="an earlier layer failed"):
        failed.get(0, 0)


def test_plan_predicts_the_split(cli, tmp_path):
    """70B fp8 on 4 H200s: streamed, the per-GPU rows say so, and the predicted time divides by less
    than 4 (the fixed parts, the one rank file's merge); AWQ's calibration beyond max calibration's
    per-layer time stays serial (one AWQ layer calibrates at a time)."""
    fp8 = _recipe(tmp_path / "fp8", LLAMA3_70B, "fp8")
    _, one = _plan(cli, fp8, "--gpu", "h200-141gb")  # (the exit code also counts this disk's free space)
    _, four = _plan(cli, fp8, "--gpu", "h200-141gb", "--gpus", "4")
    assert not one["streamed"] and four["streamed"] and four["devices"] == 4 and "split" not in one["time_s"]
    split = four["time_s"]["split"]
    assert split["devices"] == 4 and 1.5 < split["speedup"] < 4.0
    assert four["time_s"]["total_s"] == pytest.approx(split["total_s"] * split["speedup"], rel=0.01)
    rows = {c["stage"]: c for c in four["checks"] if c["where"] == "gpu"}
    assert "per GPU" in rows["calibrate (streamed)"]["note"]
    awq = _recipe(tmp_path / "awq", LLAMA3_70B, "int4_awq")
    _, awq4 = _plan(cli, awq, "--gpu", "h200-141gb", "--gpus", "4")
    from trtconv.memory_plan import TIME_LAYER_S_PER_GIB

    serial = 80 * 1.59 * (TIME_LAYER_S_PER_GIB["awq"] - TIME_LAYER_S_PER_GIB["max"])
    assert serial < awq4["time_s"]["split"]["calibrate_export_s"] < awq4["time_s"]["calibrate_export_s"]
    res = cli("plan", fp8, "--gpu", "h200-141gb", "--gpus", "4")
    assert "predicted time split over 4 GPUs" in res.stdout


def test_plan_here_refuses_what_build_refuses(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("TRTCONV_SIMULATED_DEVICES", raising=False)
    recipe = _recipe(tmp_path, LLAMA3_70B, "fp8")
    code, plan = _plan(cli, recipe, "--gpus", "2", "--max-gpu-memory", "16")
    assert code == 4 and any("--gpus 2: this host has no CUDA GPU" in r for r in plan["refusals"]), plan["refusals"]
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb", "--gpus", "2", "--set", "calibration.streaming=never")
    assert any("calibration.streaming: never" in r for r in plan["refusals"]), plan["refusals"]
    monkeypatch.setenv("TRTCONV_SIMULATED_DEVICES", "2")
    code, plan = _plan(cli, recipe, "--gpus", "2", "--max-gpu-memory", "16")
    assert not any("--gpus" in r for r in plan["refusals"]), plan["refusals"]
    assert json.dumps(plan["time_s"]["split"]["devices"]) == "2"


def test_a_failing_device_stops_the_others():
    """A device that fails at its first layer closes every open hand-off with its error: the device
    waiting for a layer nobody will now produce gets the error instead of waiting for ever."""
    from trtconv.stages.devices import failing_stops_all

    handoffs = [Handoff.complete(["x"]), Handoff(1), Handoff(1), Handoff(1)]

    @failing_stops_all(handoffs)
    def work(slot: int) -> None:
        if slot == 0:
            raise ValueError("layer 0 could not be read")
        handoffs[2].get(0, 0)  # slot 1's layer 2 waits for layer 1's output, which slot 0 would make

    errors = []
    threads = [threading.Thread(target=lambda s=s: _catch(work, s, errors)) for s in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(type(e).__name__ for e in errors) == ["RuntimeError", "ValueError"]


def _catch(fn, arg, errors: list) -> None:
    try:
        fn(arg)
    except Exception as exc:  # noqa: BLE001 - collected for the assertion
        errors.append(exc)


def test_the_whole_run_key_holds_gpus_above_one():
    """The whole-run entry is restored before the build's checks: a --gpus 2 run must not find a --gpus 1
    entry (nor the reverse), and one device keeps the key it always had."""
    from trtconv.cache import runs
    from trtconv.recipe.schema import load_recipe

    recipe = load_recipe("llama-ref-fp8")[0].resolved()
    one = runs.run_key(recipe, [], TWO_H100, False, None)
    assert runs.run_key(recipe, [], TWO_H100, False, None, gpus=1) == one
    assert len({one, runs.run_key(recipe, [], TWO_H100, False, None, gpus=2), runs.run_key(recipe, [], TWO_H100, False, None, gpus=4)}) == 3


def test_stage_meter_before_cuda_is_initialised(monkeypatch):
    """Run G2 (H100): a stage entered before any CUDA call died with "Invalid device argument", because
    reset_peak_memory_stats(idx) with an explicit index does not initialise CUDA. The meter now resets only an
    initialised device, and reads a peak of 0 from one that never was."""
    import torch

    from trtconv.core.ui import Reporter
    from trtconv.stages.base import StageMeter

    Reporter(quiet=True)  # the active reporter the stage's phase prints to (not one an earlier test left behind)

    def refuse(idx=None):
        raise RuntimeError("Invalid device argument")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", refuse)
    with StageMeter("load") as m:
        pass
    assert m.peak_gpu == 0.0 and m.record().peak_gpu_mib == 0.0


def test_weight_error_of_a_large_weight_is_computed_in_blocks():
    """trtllm_reader._rel_error: above ERROR_CHUNK_VALUES the rows are compared a block at a time (run G3: an 8B
    evaluation under a 10 GiB cap ran out of memory on the lm_head's float32 copies); the number agrees with the
    whole computation, and below it is the same to the bit."""
    import torch

    from trtconv.checkpoints import trtllm_reader as tr

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4100, 4096, generator=g).to(torch.bfloat16)  # 16.8 M values: blocks of 4096 rows
    cand = (ref.float() + 0.01 * torch.randn(ref.shape, generator=g)).to(torch.bfloat16)
    assert ref.numel() > tr.ERROR_CHUNK_VALUES
    exact = ((cand.double() - ref.double()).norm() / ref.double().norm()).item()  # float32's own whole norm is off by 6e-4
    assert tr._rel_error(cand, ref).item() == pytest.approx(exact, rel=1e-6)
    small_r, small_c = ref[:64].float(), cand[:64].float()
    assert tr._rel_error(small_c, small_r).item() == ((small_c - small_r).norm() / small_r.norm()).item()
