

def test_hf_checkpoint_executor_reads_nvfp4(exported, tmp_path):
    """The unified HF checkpoint: same packing and scales under hub names; weight_scale_2 unified
    across q/k/v and gate/up (a fused GEMM has one global scale)."""
    import copy

    from modelopt.torch.export import export_hf_checkpoint

    from tests.exports import quantize
    from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

    model, _ = exported
    export_hf_checkpoint(copy.deepcopy(quantize(model, "nvfp4")), dtype=torch.bfloat16, export_dir=tmp_path / "hf")
    executor = load_hf_checkpoint_model(tmp_path / "hf")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    for dequantized, original, group in (
        (executor.layers[1].qkv.weight, qkv, qkv),
        (executor.layers[1].gate.weight, mlp.up_proj.weight.detach(), torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()),
        (executor.layers[1].proj.weight, mlp.down_proj.weight.detach(), mlp.down_proj.weight.detach()),
    ):
        global_scale = float(group.abs().max()) / (6 * 448)
        torch.testing.assert_close(dequantized.float(), reference_nvfp4(original, global_scale), rtol=1e-5, atol=0)
    assert executor.layers[1].qkv.activation_quant.kind == "nvfp4"
