"""The failed gate's advice can be built as printed (issue 23, item 2).

A user copies the list from the "try quantization.exclude: [...]" line into the recipe or --set.
That line is made here by trtconv.gate.sensitivity itself (advice_lines over a record naming
decoder layer 0, as exclude_pattern spells it), cut out the way a user would, and built on the tiny
model: through the TensorRT-LLM checkpoint (with the unified HF checkpoint beside it), through
the unified HF checkpoint alone, and layer by layer (calibration.streaming: always). Gates are relaxed: a random model's accuracy is noise.
"""

from __future__ import annotations

import json

import pytest

from tests.factories import PLUMBING_ARGS
from safetensors import safe_open

from trtconv.gate.sensitivity import advice_lines, exclude_pattern

pytestmark = pytest.mark.integration

FAST = PLUMBING_ARGS


def printed_exclude() -> str:
    """The exclude list exactly as the advice prints it after 'try quantization.exclude: '."""
    record = {
        "method": "test", "full_kl": 0.02, "gate_kl": 0.02, "estimated_gate_kl_with_suggested_exclude": 0.005,
        "layers": [{"layer": "model.layers.0", "kl": 0.015}, {"layer": "model.layers.1", "kl": 0.005}],
        "suggested_exclude": [exclude_pattern("model.layers.0")], "kl_with_suggested_exclude": 0.004,
        "num_layers": 2, "precisions_to_try": ["none"], "wall_s": 1.0,
    }
    line = next(x for x in advice_lines(record, ["*lm_head*"], 0.01) if x.startswith("try quantization.exclude: "))
    return line.removeprefix("try quantization.exclude: ").split(" — ")[0]


def test_the_advice_is_the_issues_list():
    assert printed_exclude() == "['*lm_head*', '*layers.0.*']"


OUTPUTS = {
    "both": ["--hf-checkpoint"],  # TensorRT-LLM checkpoint (gated) + unified HF checkpoint
    "hf_only": ["--hf-checkpoint", "--set", "export.tensorrt_llm_checkpoint=false"],  # gated through the HF reader
    "streamed": ["--set", "calibration.streaming=always"],  # one layer at a time: layer 0 is the shell's only layer
}


@pytest.mark.parametrize("precision,outputs", [("fp8", "both"), ("int4_awq", "hf_only"), ("fp8", "streamed")])
def test_a_rebuild_with_the_advice_succeeds(cli, tiny_llama, tmp_path, precision, outputs):
    out = tmp_path / "out"
    extra = OUTPUTS[outputs]
    res = cli("calibrate", "--model", tiny_llama, "--precision", precision, "-o", out, *FAST, *extra,
              "--set", f"quantization.exclude={printed_exclude()}")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["recipe"]["quantization"]["exclude"] == ["*lm_head*", "*layers.0.*"]
    assert manifest["calibration"]["path"] == ("streamed" if outputs == "streamed" else "in_memory")
    if outputs != "streamed":
        hf_quant = json.loads((out / "hf_checkpoint" / "hf_quant_config.json").read_text())["quantization"]
        assert "model.layers.0*" in hf_quant["exclude_modules"]
    if outputs != "hf_only":
        config = json.loads((out / "checkpoint" / "config.json").read_text())
        assert sorted(config["quantization"]["exclude_modules"]) == ["lm_head", "transformer.layers.0*"]
        with safe_open(str(out / "checkpoint" / "rank0.safetensors"), "pt") as f:
            assert f.get_slice("transformer.layers.0.attention.qkv.weight").get_dtype() == "BF16"
            assert f.get_slice("transformer.layers.1.attention.qkv.weight").get_dtype() == "F8_E4M3"
