"""save_file_streamed writes safetensors' save_file bytes, one tensor at a time, and defers to save_file
for anything it would not write identically (its own errors included)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trtconv.checkpoints.safetensors_stream import save_file_streamed


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "transformer.layers.0.mlp.fc.weight": r(64, 48).to(torch.float8_e4m3fn),
        "transformer.layers.0.mlp.fc.weights_scaling_factor": r(()).abs(),  # 0-d
        "transformer.layers.10.attention.qkv.weight": r(96, 48).to(torch.bfloat16),
        "transformer.layers.2.attention.dense.weight": (r(48, 48) * 50).to(torch.int8),
        "lm_head.weight": r(1000, 48).half(),
        "transformer.vocab_embedding.weight": r(1000, 48).to(torch.bfloat16),
        "e5m2": r(7, 3).to(torch.float8_e5m2),
        "ints": torch.arange(17, dtype=torch.int64),
        "i32": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "u8": torch.arange(256, dtype=torch.uint8),
    }


def test_same_bytes_as_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors")
    save_file_streamed(tensors, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_metadata_goes_to_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file_streamed(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["non-contiguous", "shared memory"])
def test_what_save_file_refuses_it_refuses_alike(tmp_path, case):
    base = torch.randn(8, 8)
    tensors = {"a": base.t()} if case == "non-contiguous" else {"a": base, "b": base[:4]}
    with pytest.raises(Exception) as expected:
        save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(type(expected.value)):
        save_file_streamed(tensors, tmp_path / "b.safetensors")


def test_the_export_uses_it_only_for_its_duration(tmp_path):
    """ModelOpt's module sees the streamed writer inside streamed_save_file and its own save_file after."""
    import safetensors.torch
    from modelopt.torch.export import model_config_export as module

    from trtconv.stages.export import streamed_save_file

    with streamed_save_file():
        assert module.save_file is save_file_streamed
    assert module.save_file is safetensors.torch.save_file
