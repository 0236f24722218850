"""AWQ group size: the largest of 128, 64, 32 that divides every quantized layer, unless pinned.

Plain torch modules stand in for a model (the choice only reads Linear input dims): fast, no ModelOpt.
"""

from __future__ import annotations

import pytest
import torch

from trtconv.core.errors import UserError
from trtconv.recipe.schema import QuantizationSection
from trtconv.stages.calibrate import choose_group_size


def model(hidden: int, inter: int, heads_dim: int | None = None) -> torch.nn.Module:
    attn = heads_dim or hidden
    layer = torch.nn.Module()
    layer.q_proj, layer.o_proj = torch.nn.Linear(hidden, attn), torch.nn.Linear(attn, hidden)
    layer.up_proj, layer.down_proj = torch.nn.Linear(hidden, inter), torch.nn.Linear(inter, hidden)
    root = torch.nn.Module()
    root.layer, root.lm_head = layer, torch.nn.Linear(hidden, 1000)
    return root


def section(precision="int4_awq", **kw) -> QuantizationSection:
    return QuantizationSection(precision=precision, **kw)


def test_auto_takes_the_largest_that_divides_and_says_why():
    assert choose_group_size(model(256, 512), section(), 1).size == 128
    smol = choose_group_size(model(576, 1536), section(), 1)  # SmolLM2: 576 = 9 x 64
    assert (smol.size, smol.source) == (64, "auto")
    assert "128 does not divide layer.q_proj (input dim 576)" in smol.note
    assert choose_group_size(model(96, 192), section("w4a8_awq"), 1).size == 32


def test_tp_splits_row_parallel_inputs():
    assert choose_group_size(model(256, 512), section(), 1).size == 128
    assert choose_group_size(model(256, 256), section(), 4).size == 64  # down_proj: 256 / 4 = 64 per rank


def test_pinned_size_that_does_not_fit_is_refused_with_the_size_that_would():
    with pytest.raises(UserError, match=r"awq_group_size 128: .*layer.q_proj \(input dim 576\).*use awq_group_size 64"):
        choose_group_size(model(576, 1536), section(awq_group_size=128), 1)
    assert choose_group_size(model(576, 1536), section(awq_group_size=32), 1).source == "pinned"


def test_no_size_fits_names_the_layers_and_excluded_layers_do_not_count():
    with pytest.raises(UserError, match=r"no AWQ group size \(128, 64, 32\) divides"):
        choose_group_size(model(100, 256), section(), 1)
    # lm_head is excluded by default; excluding the odd layers makes the rest fit.
    assert choose_group_size(model(256, 200), section(exclude=["*lm_head*", "*down_proj*"]), 1).size == 128


def test_precisions_without_groups_choose_nothing():
    assert choose_group_size(model(100, 100), section("fp8"), 1).size is None
