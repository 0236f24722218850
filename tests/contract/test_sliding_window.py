"""Mistral sliding-window attention through export, checker and both executors (real ModelOpt exports).

The window (16) is smaller than the sequences (48), so a dropped window changes the logits. The
reference for "right" is transformers' own MistralForCausalLM, with both its sdpa and eager attention.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.exports import _one_thread, edit_config, export_trtllm, hf_logits, make_model, rel_error, token_batches  # noqa: F401
from trtconv.architectures import WINDOW_CONFIG_PATH
from trtconv.checkpoints.trtllm_format import validate_checkpoint
from trtconv.checkpoints.trtllm_reader import load_checkpoint_model
from trtconv.core.errors import CheckpointError, ModelError
from trtconv.stages.export import repair_trtllm_config

pytestmark = pytest.mark.slow

WINDOW, LENGTH = 16, 48


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("hf"), "mistral", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def checkpoint(mistral, tmp_path_factory):
    ckpt = export_trtllm(mistral, tmp_path_factory.mktemp("ckpt") / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    repair_trtllm_config(config, mistral.config, "MistralForCausalLM")  # what the export stage does
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture(scope="module")
def ids(mistral):
    return token_batches(mistral.config.vocab_size, count=1, batch=2, length=LENGTH, seed=5)[0]


def test_export_writes_the_window_where_tensorrt_llm_reads_it(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    section, key = WINDOW_CONFIG_PATH
    assert config[section][key] == [WINDOW]
    assert validate_checkpoint(checkpoint).architecture == "MistralForCausalLM"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_executor_matches_transformers_mistral(mistral, checkpoint, ids, attention):
    mistral.config._attn_implementation = attention
    reference = hf_logits(mistral, ids)
    assert rel_error(load_checkpoint_model(checkpoint).logits(ids), reference) < 1e-5


def test_a_dropped_window_changes_the_logits(mistral, checkpoint, ids, tmp_path):
    bad = shutil.copytree(checkpoint, tmp_path / "no_window")
    edit_config(bad, lambda c: c.pop(WINDOW_CONFIG_PATH[0]))
    validate_checkpoint(bad)  # a window-less checkpoint is valid; only the numbers tell
    assert rel_error(load_checkpoint_model(bad).logits(ids), hf_logits(mistral, ids)) > 0.05


def test_hf_checkpoint_executor_applies_the_window(mistral, ids, tmp_path):
    import copy

    from modelopt.torch.export import export_hf_checkpoint

    from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

    export_hf_checkpoint(copy.deepcopy(mistral), dtype=torch.bfloat16, export_dir=tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sliding_window"] == WINDOW
    assert rel_error(load_hf_checkpoint_model(tmp_path / "hf").logits(ids), hf_logits(mistral, ids)) < 1e-5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(runtime_defaults={"max_attention_window": [16, 32]}), "per-layer windows are not supported"),
        (lambda c: c.update(runtime_defaults={"max_attention_window": [0]}), "allowed: a list of positive integers"),
        (lambda c: c.update(architecture="LlamaForCausalLM"), "converted only for MistralForCausalLM"),
    ],
)
def test_checker_validates_the_window(checkpoint, tmp_path, edit, message):
    bad = shutil.copytree(checkpoint, tmp_path / "bad")
    edit_config(bad, edit)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(bad)


def test_load_stage_refuses_a_window_it_cannot_convert(tmp_path):
    from tests.factories import make_tiny_model
    from trtconv.recipe.schema import ModelSection
    from trtconv.stages.load import inspect_checkpoint

    qwen = make_tiny_model(tmp_path / "qwen", arch="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    with pytest.raises(ModelError, match=r"config.json: sliding_window 16 with Qwen2ForCausalLM: .* only for MistralForCausalLM, .*; allowed"):
        inspect_checkpoint(ModelSection(path=str(qwen)))
    edit_config(qwen, lambda c: c.update(use_sliding_window=False))
    assert inspect_checkpoint(ModelSection(path=str(qwen)))[2] == "Qwen2ForCausalLM"
    mistral = make_tiny_model(tmp_path / "mistral", arch="mistral", sliding_window=16)
    edit_config(mistral, lambda c: c.update(sliding_window=-4))
    with pytest.raises(ModelError, match="sliding_window is -4; allowed: a positive integer"):
        inspect_checkpoint(ModelSection(path=str(mistral)))
