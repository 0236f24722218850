"""detect_device's per-host memo: an unchanged recipe's whole-run cache hit no longer imports torch
(4-5 s of a 6.5 s hit on the H200 host), and anything that could change torch's answer changes the
fingerprint the answer is remembered under."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO
from trtconv.core import environment


def _in_fresh_process(code: str, memo, env_extra: dict | None = None) -> str:
    import os

    env = {**os.environ, **(env_extra or {})}
    prog = ("import sys\nfrom pathlib import Path\nfrom trtconv.core.environment import detect_device\n"
            f"memo = Path({str(memo)!r})\n{code}\nprint('TORCH', 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", prog], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_a_remembered_device_needs_no_torch_import(tmp_path):
    memo = tmp_path / "host-device.json"
    first = _in_fresh_process("print('INFO', detect_device('auto', memo))", memo)
    assert "TORCH True" in first and memo.is_file()
    second = _in_fresh_process("print('INFO', detect_device('auto', memo))", memo)
    assert "TORCH False" in second
    assert first.split("INFO", 1)[1].splitlines()[0] == second.split("INFO", 1)[1].splitlines()[0]


def test_cpu_never_imports_torch(tmp_path):
    assert "TORCH False" in _in_fresh_process("detect_device('cpu')", tmp_path / "memo.json")


def test_device_selection_variables_change_the_fingerprint(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    before = environment._host_fingerprint("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert before is not None and environment._host_fingerprint("auto") not in (None, before)
    assert environment._host_fingerprint("cuda") != environment._host_fingerprint("auto")


def test_a_driver_without_nvidia_smi_is_asked_every_time(monkeypatch, tmp_path):
    """The GPUs (and MIG instances) cannot be listed: nothing is remembered, torch is asked."""
    monkeypatch.setattr(environment, "_read_text", lambda path: "NVRM version: 580.159.04" if "nvidia" in path else "")
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert environment._host_fingerprint("auto") is None
    memo = tmp_path / "memo.json"
    environment.detect_device("auto", memo)
    assert not memo.exists()


def test_a_changed_gpu_list_changes_the_fingerprint(monkeypatch):
    """nvidia-smi -L names every GPU and MIG instance with its UUID: a reconfigured GPU is asked again."""
    import subprocess as sp

    def smi(listing):
        return lambda *a, **k: sp.CompletedProcess(a, 0, stdout=listing, stderr="")

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(sp, "run", smi("GPU 0: NVIDIA H200 (UUID: GPU-1)\n"))
    whole = environment._host_fingerprint("auto")
    monkeypatch.setattr(sp, "run", smi("GPU 0: NVIDIA H200 (UUID: GPU-1)\n  MIG 3g.71gb Device 0: (UUID: MIG-2)\n"))
    assert environment._host_fingerprint("auto") != whole
