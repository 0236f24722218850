"""quantization.exclude under pipeline parallelism, checked before calibration (issue 23, item 2)."""

from __future__ import annotations

import pytest


def _recipe(exclude, pp):
    from trtconv.recipe.schema import Recipe

    return Recipe.model_validate({"name": "t", "model": {"path": "."}, "quantization": {"precision": "fp8", "exclude": exclude},
                                  "export": {"pp_size": pp}})


def test_one_excluded_layer_under_pipeline_parallelism_is_refused_before_calibration():
    """Issue 23 item 2: the failed gate's advice with pp_size 2 could not be built; it is refused up front."""
    from trtconv.core.errors import UserError
    from trtconv.stages.load import check_stage_exclusions

    with pytest.raises(UserError, match=r"excludes different layers on pipeline stage 0 and stage 1.*export.pp_size 1"):
        check_stage_exclusions(_recipe(["*lm_head*", "*layers.0.*"], 2), 4)
    check_stage_exclusions(_recipe(["*lm_head*", "*layers.0.*"], 1), 4)  # pp 1: fine
    check_stage_exclusions(_recipe(["*lm_head*", "*o_proj*"], 2), 4)  # the same modules on every stage: fine
    check_stage_exclusions(_recipe(["*lm_head*", "*layers.0.*", "*layers.2.*"], 2), 4)  # local layer 0 on both stages
