"""Shapes as real models have them, through export, the format checker and the gate's executors.

The trained reference models have untied embeddings, head_dim = hidden / heads and a vocabulary
that is a multiple of 64; SmolLM2, Gemma-style and Qwen-style checkpoints do not. One tiny model
(tests/factories.make_real_shaped_model) has all four oddities: tied embeddings, head_dim 48 with
hidden 128 / 4 heads, vocabulary 517, a chat template. Exported unquantized, the checkpoint read back
by each executor must reproduce the original (KL ~ 0): any shape the executor gets wrong shows
there. Quantized (fp8, int4_awq with its automatic group 64), export, checker and gate must run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = ["--num-samples", "4", "--seq-len", "64", "--set", "evaluate.num_samples=6", "--set", "evaluate.seq_len=64"]
HF_ONLY = ["--set", "export.tensorrt_llm_checkpoint=false", "--set", "export.hf_checkpoint=true"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def odd_model(request, tmp_path_factory) -> Path:
    from tests.factories import make_real_shaped_model

    return make_real_shaped_model(tmp_path_factory.mktemp(f"odd_{request.param}"), request.param)


def build(cli, model: Path, out: Path, precision: str, *extra: str):
    res = cli("calibrate", "--model", model, "--precision", precision, "-o", out, *SMALL, *extra)
    assert res.exit_code in (0, 1), res.output  # 1: a gate on a random-init model may fail; the files are written
    return res, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("layout", ["trtllm", "hf"])
def test_unquantized_export_is_reproduced_exactly(cli, odd_model, tmp_path, layout):
    res, manifest = build(cli, odd_model, tmp_path / "o", "none", *(HF_ONLY if layout == "hf" else []))
    assert res.exit_code == 0, res.output
    assert manifest["metrics"]["mean_kl"]["value"] < 1e-5
    assert manifest["metrics"]["top1_agreement"]["value"] > 0.999
    tok = json.loads((tmp_path / "o" / "tokenizer" / "tokenizer_config.json").read_text())
    assert "chat_template" in tok or (tmp_path / "o" / "tokenizer" / "chat_template.jinja").is_file()
    if layout == "trtllm":
        cfg = json.loads((tmp_path / "o" / "checkpoint" / "config.json").read_text())
        assert cfg["head_size"] == 48 and cfg["hidden_size"] == 128


@pytest.mark.parametrize("precision", ["fp8", "int4_awq"])
@pytest.mark.parametrize("layout", ["trtllm", "hf"])
def test_quantized_export_checks_and_gates(cli, odd_model, tmp_path, precision, layout):
    res, manifest = build(cli, odd_model, tmp_path / "o", precision, *(HF_ONLY if layout == "hf" else []))
    metrics = manifest["metrics"]
    assert math.isfinite(metrics["mean_kl"]["value"]) and metrics["ppl_candidate"]["value"] > 1
    if layout == "trtllm":
        assert manifest["export"]["validation"]
    if precision == "int4_awq":
        assert manifest["calibration"]["awq_group_size"] == 64 and "AWQ group size 64 (auto" in res.output
