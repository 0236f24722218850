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
from trtconv.recipe.schema import recipe_from_dict


def _recipe(model: Path, precision: str, kv: str = "none", trtllm: bool = False, samples: int = 8):
    return recipe_from_dict({
        "name": "stream-hf-test", "model": {"path": str(model), "dtype": "bfloat16"},
        "quantization": {"precision": precision, "kv_cache": kv, "awq_group_size": 64},
        "calibration": {"num_samples": samples, "seq_len": 32, "batch_size": 4},
        "export": {"hf_checkpoint": True, "tensorrt_llm_checkpoint": trtllm},
    }).resolved()


def _both_paths(tmp_path: Path, recipe):
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import calibration_rows
    from trtconv.pipeline import run_calibrate_and_export

    model_dir = Path(recipe.model.path)
    tok = load_tokenizer(model_dir, False)
    c = recipe.calibration
    rows = calibration_rows(builtin_pack("calib"), tok, c.num_samples, c.seq_len, c.seed)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    out = {}
    for streamed in (False, True):
        root = tmp_path / ("streamed" if streamed else "in_memory")
        out[streamed] = run_calibrate_and_export(recipe, model_dir, arch, tok, rows, root, "cpu", Reporter(quiet=True),
                                                 streamed=streamed)
    return out


def assert_same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


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
