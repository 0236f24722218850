"""NVFP4 on real ModelOpt exports, on CPU: the format row, the executor's numerics and the checker.

ModelOpt's NVFP4 fake-quant forward needs CUDA, but max calibration and both exports run on CPU
(docs: modelopt-notes §0.2), so these tests export for real and check the files against an
independent re-computation from the ORIGINAL weights, written here from the format's definition
(not by calling trtconv's quantizer): global scale = amax / (6 x 448), block scale = FP8(amax of 16
inputs / 6 / global), value = nearest e2m1 of w / (block x global).
"""

from __future__ import annotations

import pytest
import torch

from tests.exports import _one_thread, edit_config, export_trtllm, make_model, quantize, rewrite_tensor  # noqa: F401
from trtconv.checkpoints.trtllm_format import validate_checkpoint
from trtconv.checkpoints.trtllm_reader import load_checkpoint_model
from trtconv.core.errors import CheckpointError

pytestmark = pytest.mark.slow

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_nvfp4(weight: torch.Tensor, global_scale: float) -> torch.Tensor:
    """Quantize-dequantize ``weight`` (out, in) with NVFP4 under ``global_scale``, from first principles."""
    out, inp = weight.shape
    blocks = weight.float().reshape(out, inp // 16, 16)
    block_scale = (blocks.abs().amax(-1, keepdim=True) / 6.0 / global_scale).to(torch.float8_e4m3fn).float()
    scale = block_scale * global_scale
    scaled = (blocks / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-6, 6)
    distance = (scaled.abs().unsqueeze(-1) - E2M1_GRID).abs()
    # Nearest grid value; on a tie the even code (round-to-nearest-even, as the hardware's cvt does).
    # bf16 weights hit exact ties (1.75, 3.5, ...) often, so the tie rule is part of the format.
    not_nearest = (distance != distance.min(-1, keepdim=True).values).float()
    nearest = E2M1_GRID[(not_nearest * 2 + torch.arange(8) % 2).argmin(-1)]
    return (torch.sign(scaled) * nearest * scale).reshape(out, inp)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvfp4")
    model = make_model(root, "llama")
    ckpt = export_trtllm(quantize(model, "nvfp4"), root / "ckpt")
    return model, ckpt


def test_export_is_what_the_row_describes(exported):
    _, ckpt = exported
    report = validate_checkpoint(ckpt)
    assert report.quant_algo == "NVFP4"


def test_executor_weights_equal_an_independent_requantization(exported):
    model, ckpt = exported
    executor = load_checkpoint_model(ckpt)
    from safetensors import safe_open

    with safe_open(str(ckpt / "rank0.safetensors"), framework="pt") as f:
        layer0 = executor.layers[0]
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        # name -> (executor's weight, original weight, weights sharing its global scale: the exporter
        # unifies it across q/k/v and across gate/up, which TensorRT-LLM fuses into one GEMM).
        cases = {
            "attention.qkv": (layer0.qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), []),
            "attention.dense": (layer0.dense.weight, attn.o_proj.weight, []),
            "mlp.fc": (layer0.fc.weight, mlp.gate_proj.weight, [mlp.up_proj.weight]),
            "mlp.gate": (layer0.gate.weight, mlp.up_proj.weight, [mlp.gate_proj.weight]),
            "mlp.proj": (layer0.proj.weight, mlp.down_proj.weight, []),
        }
        for name, (dequantized, original, partners) in cases.items():
            global_scale = float(f.get_tensor(f"transformer.layers.0.{name}.weights_scaling_factor_2"))
            # The global scale is the fused group's weight amax / (6 x 448).
            original = original.detach()
            amax = max(float(w.detach().abs().max()) for w in [original, *partners])
            assert global_scale == pytest.approx(amax / (6 * 448), rel=1e-6), name
            expected = reference_nvfp4(original, global_scale)
            # Equal up to float32 rounding of the product code x block x global (order of multiplication).
            torch.testing.assert_close(dequantized.float(), expected, rtol=1e-6, atol=0, msg=name)


def test_activation_emulation_matches_modelopt_nvfp4_tensor():
    """trtconv's dynamic FP4 activation round trip == ModelOpt's NVFP4QTensor (pure PyTorch on CPU)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from trtconv.checkpoints.quant import nvfp4_round_trip

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 3
    x[0, :16] = 0.0  # an all-zero block
    global_scale = x.abs().max() / (6 * 448)
    qtensor, block_scale, g = NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=global_scale)
    theirs = qtensor.dequantize(dtype=torch.float32, scale=block_scale, double_scale=g, block_sizes={-1: 16})
    assert torch.equal(nvfp4_round_trip(x, global_scale), theirs)


def test_checker_rejects_a_misshaped_block_scale(exported, tmp_path):
    import shutil

    _, ckpt = exported
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    name = "transformer.layers.1.mlp.proj.weights_scaling_factor"
    rewrite_tensor(bad, 0, name, lambda t: t[:, : t.shape[1] // 2])  # one scale per 32 inputs
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[128, 8\], expected \[128, 16\]"):
        validate_checkpoint(bad)


def test_checker_rejects_another_block_size(exported, tmp_path):
    import shutil

    _, ckpt = exported
    bad = shutil.copytree(ckpt, tmp_path / "bad_group")
    edit_config(bad, lambda c: c["quantization"].update(group_size=32))
    with pytest.raises(CheckpointError, match="NVFP4 blocks are 16 inputs"):
        validate_checkpoint(bad)


def test_hf_checkpoint_executor_reads_nvfp4(exported, tmp_path):
    """The unified HF checkpoint: the same packing and scales under hub names, with weight_scale_2
    unified across q/k/v and across gate/up (a fused GEMM has one global scale)."""
    import copy

    from modelopt.torch.export import export_hf_checkpoint
    from safetensors import safe_open

    from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

    model, _ = exported
    export_hf_checkpoint(copy.deepcopy(quantize(model, "nvfp4")), dtype=torch.bfloat16, export_dir=tmp_path / "hf")
    executor = load_hf_checkpoint_model(tmp_path / "hf")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    prefix = "model.layers.1"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        for dequantized, original, group, scale_of in (
            (executor.layers[1].qkv.weight, qkv, qkv, f"{prefix}.self_attn.k_proj"),
            (executor.layers[1].gate.weight, mlp.up_proj.weight.detach(), gate_up, f"{prefix}.mlp.gate_proj"),
            (executor.layers[1].proj.weight, mlp.down_proj.weight.detach(), mlp.down_proj.weight.detach(), f"{prefix}.mlp.down_proj"),
        ):
            global_scale = float(f.get_tensor(f"{scale_of}.weight_scale_2"))
            assert global_scale == pytest.approx(float(group.abs().max()) / (6 * 448), rel=1e-6), scale_of
            torch.testing.assert_close(dequantized.float(), reference_nvfp4(original, global_scale), rtol=1e-6, atol=0, msg=scale_of)
    assert executor.layers[1].qkv.activation_quant.kind == "nvfp4"
