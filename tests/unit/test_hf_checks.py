"""checkpoints.hf_checks: config sizes and the finite check's fast path (issue 23, item 5)."""

from __future__ import annotations

import pytest
import torch

from trtconv.checkpoints.hf_checks import check_finite, config_problems
from trtconv.core.errors import ModelError

GOOD = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 256, "vocab_size": 512, "max_position_embeddings": 512}


def test_a_sane_config_has_no_problems():
    assert config_problems(GOOD) == []
    assert config_problems({**GOOD, "num_key_value_heads": None, "head_dim": None}) == []


@pytest.mark.parametrize("key,value", [("num_attention_heads", 0), ("hidden_size", -46), ("vocab_size", 1.5),
                                       ("num_hidden_layers", True), ("intermediate_size", "256")])
def test_sizes_must_be_positive_integers(key, value):
    assert config_problems({**GOOD, key: value}) == [f"key '{key}' is {value!r}; allowed: a positive integer"]


def test_finite_tensors_pass_even_when_their_sum_overflows():
    """The fast path is one sum(); an overflowing sum of finite values is checked element-wise, not refused."""
    big = torch.full((4, 4), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(big.sum())
    check_finite("w", big, "m")
    check_finite("ids", torch.arange(4), "m")  # not floating point: nothing to check


@pytest.mark.parametrize("value,counts", [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf")])
def test_a_non_finite_value_is_named(value, counts):
    w = torch.zeros(3, 3, dtype=torch.bfloat16)
    w[1, 2] = value
    with pytest.raises(ModelError, match=f"m: tensor layer.w holds {counts} value\\(s\\) of 9; allowed: finite numbers only"):
        check_finite("layer.w", w, "m")

