"""Broken weights and impossible config sizes stop in the load stage (issue 23, item 5).

Before: a NaN or inf in a weight was a ModelOpt traceback (exit 1, the README's "gate failed"), all
weights int32 calibrated and exported and then overflowed (exit 1), one int32 weight passed silently,
and num_attention_heads 0 was a ZeroDivisionError traceback. Each is now exit 2 naming the tensor or
key and what is allowed, before any calibration, with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.integration

SMALL = ["--num-samples", "4", "--seq-len", "64", "--set", "evaluate.enabled=false"]


def broken_copy(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        weights = load_file(dst / "model.safetensors")
        tensors(weights)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def set_value(name: str, value: float):
    def edit(weights):
        weights[name][3, 5] = value
    return edit


def as_int32(*names: str):
    def edit(weights):
        for name in names or list(weights):
            weights[name] = (weights[name].float() * 100).to(torch.int32)
    return edit


def assert_refused(res, out: Path, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in res.output, f"{fragment!r} not in {res.output!r}"
    assert not out.exists()


CASES = {
    # name: (tensor edit, config edit, what the message must say)
    "nan": (set_value("model.layers.1.mlp.down_proj.weight", float("nan")), None,
            ["tensor model.layers.1.mlp.down_proj.weight holds 1 NaN and 0 inf value(s)", "allowed: finite numbers only"]),
    "inf": (set_value("model.layers.0.self_attn.q_proj.weight", float("-inf")), None,
            ["tensor model.layers.0.self_attn.q_proj.weight holds 0 NaN and 1 inf value(s)"]),
    "all_int32": (as_int32(), None,
                  ["21 weight tensor(s) are not floating point", "lm_head.weight is I32 in model.safetensors",
                   "allowed: BF16, F16, F32, F64"]),
    "one_int32": (as_int32("model.layers.0.mlp.up_proj.weight"), None,
                  ["1 weight tensor(s) are not floating point: model.layers.0.mlp.up_proj.weight is I32 in model.safetensors"]),
    "zero_heads": (None, {"num_attention_heads": 0},
                   ["config.json: key 'num_attention_heads' is 0; allowed: a positive integer"]),
    "negative_hidden": (None, {"hidden_size": -128}, ["key 'hidden_size' is -128; allowed: a positive integer"]),
    "string_layers": (None, {"num_hidden_layers": "2"}, ["key 'num_hidden_layers' is '2'; allowed: a positive integer"]),
    "kv_heads_not_dividing": (None, {"num_key_value_heads": 3},
                              ["'num_attention_heads' 4 is not a multiple of 'num_key_value_heads' 3", "(1, 2, 4)"]),
    "heads_not_dividing_hidden": (None, {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
                                  ["'hidden_size' 128 is not a multiple of 'num_attention_heads' 3"]),
    # With a head_dim, trtconv leaves the sizes to the architecture; Llama's config refuses them itself.
    "llama_refuses_its_own_sizes": (None, {"num_attention_heads": 3, "num_key_value_heads": 1},
                                    ["config.json: cannot build the architecture it describes",
                                     "hidden size (128) is not a multiple of the number of attention heads (3)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_refused_in_the_load_stage(cli, tiny_llama, tmp_path, case):
    tensors, config, fragments = CASES[case]
    model = broken_copy(tiny_llama, tmp_path / "m", tensors, config)
    out = tmp_path / "o"
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", out, *SMALL)
    assert_refused(res, out, *fragments)
    assert "calibrate:" not in res.output


def test_nan_is_found_on_the_layer_streamed_path(cli, tiny_llama, tmp_path):
    """One decoder layer at a time, each tensor is checked as it is read (hf_layers.WeightIndex)."""
    model = broken_copy(tiny_llama, tmp_path / "m", set_value("model.layers.1.mlp.gate_proj.weight", float("nan")))
    out = tmp_path / "o"
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", out, *SMALL, "--set", "calibration.streaming=always")
    assert_refused(res, out, "model.safetensors: tensor model.layers.1.mlp.gate_proj.weight holds 1 NaN")
