"""merge_parts writes the bytes save_file writes for the union of the parts' tensors, whether the
kernel copies (copy_file_range) or the copy falls back to reads and writes, even part-way through."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from trtconv.checkpoints.safetensors_stream import merge_parts


def _parts(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = [{f"transformer.layers.{i}.mlp.fc.weight": torch.randint(-128, 127, (64, 48), dtype=torch.int8, generator=g),
               f"transformer.layers.{i}.attention.dense.weight": torch.randn(48, 48, generator=g).to(torch.bfloat16),
               f"transformer.layers.{i}.attention.dense.weights_scaling_factor": torch.rand((), generator=g)}
              for i in range(12)]
    outer = {"transformer.vocab_embedding.weight": torch.randn(100, 48, generator=g).to(torch.bfloat16),
             "lm_head.weight": torch.randn(100, 48, generator=g).half()}
    paths = []
    for k, tensors in enumerate([*layers, outer]):
        paths.append(tmp_path / f"part{k:02d}.safetensors")
        save_file(tensors, paths[-1])
    whole = tmp_path / "whole.safetensors"
    save_file({k: v for t in [*layers, outer] for k, v in t.items()}, whole)
    return paths, whole.read_bytes()


def _failing_after(limit: int):
    real, copied = os.copy_file_range, {"n": 0}

    def fake(src, dst, count, offset_src=None, offset_dst=None):
        if copied["n"] >= limit:
            raise OSError(errno.EXDEV, "cross-device")
        n = real(src, dst, min(count, 7), offset_src, offset_dst)  # a few bytes at a time, then it stops working
        copied["n"] += n
        return n

    return fake


@pytest.mark.parametrize("copy", ["kernel", "fallback", "fails part-way", "absent"])
def test_merge_is_save_file_bytes_however_it_copies(tmp_path, monkeypatch, copy):
    if copy != "absent" and not hasattr(os, "copy_file_range"):
        pytest.skip("no os.copy_file_range here")
    parts, expected = _parts(tmp_path)
    if copy == "fallback":
        monkeypatch.setattr(os, "copy_file_range", _failing_after(0))
    elif copy == "fails part-way":
        monkeypatch.setattr(os, "copy_file_range", _failing_after(500))
    elif copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    merge_parts(parts, tmp_path / "merged.safetensors", chunk=50)
    assert (tmp_path / "merged.safetensors").read_bytes() == expected


def test_a_tensor_in_two_parts_is_refused(tmp_path):
    parts, _ = _parts(tmp_path)
    save_file({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "dup.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight"):
        merge_parts([*parts, tmp_path / "dup.safetensors"], tmp_path / "merged.safetensors")
