"""An export that is quantized in name only is caught from its safetensors headers (trtconv.checkpoints.export_bits).

Real ModelOpt 0.47 exports of tiny models (CPU): fp8 and int4_awq linears store 8 and 4 bits per weight and
pass (every family's rule: decoder-layer 2-D weights not in exclude_modules); a linear rewritten to BF16
in an fp8 export (as a ModelOpt bug that skips a module would write it) is refused, exit 2, naming it;
an fp8 MoE export counts its experts.
"""

from __future__ import annotations

import pytest
import torch

from tests.contract.test_hf_checkpoint_executor import export_hf, rewrite_hf_tensor
from tests.exports import _one_thread, make_model, quantize  # noqa: F401
from trtconv.checkpoints.export_bits import check_quantized_size
from trtconv.core.errors import CheckpointError
from trtconv.precisions import PRECISIONS


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("bits"), "llama")


@pytest.mark.parametrize("precision,bits", [("fp8", 8.0), ("int4_awq", 4.0)])
def test_quantized_exports_pass_at_their_bits(llama, tmp_path, precision, bits):
    hf_dir = export_hf(quantize(llama, precision), tmp_path / "hf")
    found = check_quantized_size(hf_dir, precision, PRECISIONS[precision].linear_weight_bytes)
    assert found.bits_per_weight == bits and found.linears == 2 * 7 and not found.wider


def test_a_bf16_linear_in_an_fp8_export_is_refused(llama, tmp_path):
    hf_dir = export_hf(quantize(llama, "fp8"), tmp_path / "hf")
    name = "model.layers.1.mlp.down_proj"
    rewrite_hf_tensor(hf_dir, f"{name}.weight", lambda w: w.to(torch.bfloat16))
    with pytest.raises(CheckpointError, match=rf"not really fp8: .*{name}\.weight \(BF16\)") as err:
        check_quantized_size(hf_dir, "fp8", PRECISIONS["fp8"].linear_weight_bytes)
    assert err.value.exit_code == 2


def test_moe_experts_are_counted(tmp_path):
    model = make_model(tmp_path, "mixtral")
    model.config.architectures = [type(model).__name__]
    found = check_quantized_size(export_hf(quantize(model, "fp8"), tmp_path / "hf"), "fp8", 1.0)
    assert found.linears == 2 * (4 + 4 * 3) and found.bits_per_weight == 8.0  # q k v o + 4 experts x 3, 2 layers
