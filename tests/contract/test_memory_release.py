"""The calibrated model is gone before evaluation, however ModelOpt was first imported.

nvidia-modelopt's dependency pulp keeps its failed optional imports' exceptions, tracebacks and all;
on the H200 those pinned the calibrate stage's frame, and with it the calibrated 8B model (15 GiB of
GPU memory), through evaluation. trtconv.core.imports imports ModelOpt on a thread of its own (on
demand, or started early by the pipeline). The check needs a process where ModelOpt was never
imported, hence the subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

CHILD = r"""
import gc, sys
assert "modelopt" not in sys.modules
from pathlib import Path
from tests.factories import make_tiny_model
from trtconv.checkpoints.hf_model import load_tokenizer, release_memory
from trtconv.core.ui import Reporter
from trtconv.data.packs import builtin_pack
from trtconv.data.samples import calibration_rows
from trtconv.pipeline import run_calibrate_and_export
from trtconv.recipe.schema import recipe_from_dict

out = Path(sys.argv[1])
model_dir = make_tiny_model(out / "m", "llama")  # first: the helper's own transformers imports have no retry
if sys.argv[2] == "background":  # as the pipeline does: started early, joined by the calibrate stage
    from trtconv.core.imports import start_modelopt_import

    start_modelopt_import()
recipe = recipe_from_dict({"name": "r", "model": {"path": str(model_dir)}, "quantization": {"precision": "fp8"},
                           "calibration": {"num_samples": 4, "seq_len": 32}}).resolved()
tok = load_tokenizer(model_dir, False)
rows = calibration_rows(builtin_pack("calib"), tok, 4, 32, 0)
run_calibrate_and_export(recipe, model_dir, "LlamaForCausalLM", tok, rows, out / "art", "cpu", Reporter(quiet=True))
assert "modelopt" in sys.modules  # imported by the unit itself
release_memory()
from transformers import PreTrainedModel
print("LIVE", sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))
"""


@pytest.mark.parametrize("first_import", ["in the unit", "background"])
def test_no_model_outlives_the_calibrate_and_export_unit(tmp_path, first_import):
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), first_import], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LIVE 0" in res.stdout, res.stdout
