"""The HF-checkpoint executor runs real ModelOpt 0.47 ``export_hf_checkpoint`` output (tiny models, CPU).

Its reference is the TensorRT-LLM-checkpoint executor on ``export_tensorrt_llm_checkpoint`` output of
the SAME calibrated model. The two exporters do not write the same numbers, so each case exports
twice:

- "aligned": before exporting, the calibrated model is put in the state both exporters agree on
  (``align_for_both_exporters``). Then every difference in logits is the reader's; measured: 0.0 for
  FP8, FP8+KV, INT8-SQ, INT4-AWQ, and 3.7e-3 for W4A8-AWQ, which is the float16 rounding of the W4A8
  kernel's group scales (weight_scale / weight_scale_2) that this reader emulates and the TensorRT-LLM
  executor does not (0.0 without it).
- "as exported": the plain calibrated model. The files then differ by design (see the test), the
  gap is at the level of the quantization noise itself, and the accuracy against the original model
  is what has to agree.

bf16 models throughout: that is what both exporters write, so unquantized tensors are identical.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.exports import _one_thread, input_ids, models  # noqa: F401  (shared fixtures)
from tests.exports import (
    copy_checkpoint,
    export_trtllm,
    hf_logits,
    quantize,
    rel_error,
)
from trtconv.core.errors import CheckpointError
from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model
from trtconv.checkpoints.trtllm_reader import load_checkpoint_model


@pytest.fixture(params=["hand_written", "family_class"])
def load(request):
    """Both executors of the unified checkpoint: the hand-written forward (kept for comparison) and the family's
    own transformers class with the shipped tensors (checkpoints/hf_executor.py, what the gate runs)."""
    from trtconv.checkpoints.hf_executor import load_shipped_model

    return load_hf_checkpoint_model if request.param == "hand_written" else load_shipped_model




# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def export_hf(model: torch.nn.Module, out_dir: Path) -> Path:
    """export_hf_checkpoint of a copy (the exporter folds and requantizes the model it is given)."""
    from modelopt.torch.export import export_hf_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(copy.deepcopy(model), dtype=torch.bfloat16, export_dir=out_dir)
    return Path(out_dir)


def rewrite_hf_tensor(hf_dir: Path, name: str, change) -> None:
    """Replace tensor ``name`` of model.safetensors by ``change(tensor)``; None removes it."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    new = change(tensors.pop(name))
    if new is not None:
        tensors[name] = new.contiguous()
    save_file(tensors, path)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@torch.no_grad()
def align_for_both_exporters(model: torch.nn.Module) -> None:
    """Put a calibrated model in the state where both exporters write the same numbers.

    - q/k/v and gate/up: ModelOpt's own fusion preprocessing (averaged smoothing, shared input amax,
      shared weight_scale_2). export_hf_checkpoint does it for fused groups; the TensorRT-LLM
      exporter does it for qkv only and keeps gate/up smoothing separate.
    - FP8 weight scales rounded up to powers of two: the HF exporter divides by the scale in bf16,
      the TensorRT-LLM exporter in float32; with a power-of-two scale both are exact. It also makes
      the runtime's requantization of a fused group to its largest scale lossless.
    - FP8 KV amax 896 (scale 2.0): the TensorRT-LLM exporter clamps KV scales to >= 1 and merges
      k and v; the HF exporter does neither.
    """
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        preprocess_linear_fusion([attn.q_proj, attn.k_proj, attn.v_proj])
        preprocess_linear_fusion([mlp.gate_proj, mlp.up_proj])
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            quantizer = linear.weight_quantizer
            if getattr(quantizer, "num_bits", None) == (4, 3) and quantizer.amax is not None:
                quantizer.amax = 448.0 * 2.0 ** torch.ceil(torch.log2(quantizer.amax.float() / 448.0))
        for name in ("k_bmm_quantizer", "v_bmm_quantizer"):
            quantizer = getattr(attn, name, None)
            if quantizer is not None and quantizer.is_enabled:
                quantizer.amax = torch.tensor(896.0)


# ------------------------------------------------------------------------------------------
# Unquantized: save_pretrained output must be the transformers model, to float tolerance
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])

def test_save_pretrained_reproduces_transformers(models, input_ids, tmp_path, arch, load):
    model = models[arch]
    model.save_pretrained(tmp_path / "hf")
    err = rel_error(load(tmp_path / "hf").logits(input_ids), hf_logits(model, input_ids))
    print(f"{arch}: rel err {err:.2e}")  # measured 2.6e-7 (llama)
    assert err < 1e-5


def test_sharded_checkpoint_is_read_through_the_index(models, input_ids, tmp_path, load):
    model = models["llama"]
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    single = load(tmp_path / "single").logits(input_ids)
    assert torch.equal(load(tmp_path / "sharded").logits(input_ids), single)


# ------------------------------------------------------------------------------------------
# Quantized: HF executor vs TensorRT-LLM executor on exports of the same calibrated model
# ------------------------------------------------------------------------------------------

# name: arch, ModelOpt preset, FP8 KV, tolerance on aligned exports
QUANT_CASES = {
    "fp8": ("llama", "fp8", False, 1e-6),
    "fp8_kv": ("llama", "fp8", True, 1e-6),
    "int8_sq": ("llama", "int8_smoothquant", False, 1e-6),
    "int4_awq": ("llama", "int4_awq", False, 1e-6),
    "qwen2_int4_awq": ("qwen2", "int4_awq", False, 1e-6),
    # float16 kernel group scales (emulated here, not in the TensorRT-LLM executor): measured 3.7e-3
    "w4a8_awq": ("llama", "w4a8_awq_beta", False, 1e-2),
}


@pytest.fixture(scope="module", params=list(QUANT_CASES))
def quant_case(request, models, input_ids, tmp_path_factory):
    arch, precision, kv_fp8, tol = QUANT_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    original = models[arch]
    quantized = quantize(copy.deepcopy(original).to(torch.bfloat16), precision, kv_fp8=kv_fp8)
    case = dict(name=request.param, tol=tol, ids=input_ids, reference=hf_logits(original, input_ids))
    case["hf_plain"] = export_hf(quantized, root / "hf_plain")
    case["trt_plain"] = export_trtllm(copy.deepcopy(quantized), root / "trt_plain", tp=1)
    align_for_both_exporters(quantized)
    case["hf"] = export_hf(quantized, root / "hf")
    case["trt"] = export_trtllm(copy.deepcopy(quantized), root / "trt", tp=1)
    case["trt_logits"] = load_checkpoint_model(case["trt"]).logits(input_ids)
    return case


def test_aligned_exports_match_trtllm_executor(quant_case, load):
    logits = load(quant_case["hf"]).logits(quant_case["ids"])
    vs_trt = rel_error(quant_case["trt_logits"], logits)  # TRT AWQ pads the vocab: compare HF's columns
    vs_original = rel_error(logits, quant_case["reference"])
    print(f"{quant_case['name']}: aligned HF vs TRT-LLM executor {vs_trt:.2e}, vs original {vs_original:.2e}")
    assert vs_trt < quant_case["tol"]
    assert vs_original > 10 * vs_trt  # the quantization itself is visible


def test_as_exported_is_as_accurate_as_trtllm_export(quant_case, load):
    """Without alignment the files differ by design: the HF exporter divides FP8 weights by their
    scale in bf16 (1.4% of them land one FP8 step away), leaves FP8 q/k/v and gate/up scales
    separate (the runtime requantizes them to the group's largest), smooths gate/up with their
    average, and does not clamp FP8 KV scales to >= 1. On these random tiny models any change of
    rounding moves logits by about the quantization error itself (measured: FP8 7.0e-2 against an
    error of 6.0e-2 vs the original, INT8-SQ 0.0, INT4-AWQ 4.3e-2 against 1.8e-1). What must agree is
    the accuracy against the original model."""
    ids, reference = quant_case["ids"], quant_case["reference"]
    hf = load(quant_case["hf_plain"]).logits(ids)
    trt = load_checkpoint_model(quant_case["trt_plain"]).logits(ids)
    hf_err, trt_err = rel_error(hf, reference), rel_error(trt, reference)
    print(f"{quant_case['name']}: as exported HF vs TRT {rel_error(trt, hf):.2e}; vs original HF {hf_err:.2e}, TRT {trt_err:.2e}")
    assert abs(hf_err - trt_err) < 0.15 * trt_err
    assert rel_error(trt, hf) < 1.5 * trt_err


def test_corrupt_weight_scale_moves_logits(quant_case, tmp_path, load):
    """One weight_scale x4 must move the logits far more than the reader's own error."""
    broken = copy_checkpoint(quant_case["hf"], tmp_path / "broken")
    rewrite_hf_tensor(broken, "model.layers.0.mlp.down_proj.weight_scale", lambda t: t * 4)
    good = rel_error(quant_case["trt_logits"], load(quant_case["hf"]).logits(quant_case["ids"]))
    bad = rel_error(quant_case["trt_logits"], load(broken).logits(quant_case["ids"]))
    print(f"{quant_case['name']}: good {good:.2e}, x4 weight_scale {bad:.2e}")
    assert bad > 0.05 and bad > 20 * max(good, 1e-4)


# ------------------------------------------------------------------------------------------
# FP8 KV cache scales
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_kv_case(models, input_ids, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_kv_scales")
    quantized = quantize(copy.deepcopy(models["llama"]).to(torch.bfloat16), "fp8", kv_fp8=True)
    align_for_both_exporters(quantized)
    return export_hf(quantized, root / "hf")


def test_kv_scales_are_read(fp8_kv_case, input_ids, tmp_path, load):
    """v_scale x256 pushes V into FP8's subnormals: the cache scale must be the checkpoint's."""
    good = load(fp8_kv_case).logits(input_ids)
    broken = copy_checkpoint(fp8_kv_case, tmp_path / "broken")
    rewrite_hf_tensor(broken, "model.layers.0.self_attn.v_proj.v_scale", lambda t: t * 256)
    assert rel_error(load(broken).logits(input_ids), good) > 0.05
    unit = load(fp8_kv_case, kv_cache_scales="unit").logits(input_ids)
    assert 0 < rel_error(unit, good) < 0.05  # scale 2 vs 1: only subnormal roundings differ (2.9e-2)


# ------------------------------------------------------------------------------------------
# Refusals: CheckpointError naming the file and what is wrong
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    ["model.layers.1.self_attn.k_proj.weight_scale", "model.layers.1.self_attn.v_proj.v_scale", "model.norm.weight"],
)
def test_missing_tensor_names_file_and_tensor(fp8_kv_case, tmp_path, tensor, load):
    broken = copy_checkpoint(fp8_kv_case, tmp_path / "broken")
    rewrite_hf_tensor(broken, tensor, lambda t: None)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: .*{tensor.replace('.', '[.]')}"):  # the file and the tensor
        load(broken)


def test_unknown_quant_algo_is_refused(fp8_kv_case, tmp_path, load):
    broken = copy_checkpoint(fp8_kv_case, tmp_path / "mxfp8")
    edit_json(broken / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="MXFP8"))
    with pytest.raises(CheckpointError, match=r"hf_quant_config\.json: quant_algo 'MXFP8' disagrees with .*config\.json"):
        load(broken)  # config.json still says FP8: the runtimes would disagree
    edit_json(broken / "config.json", lambda c: c["quantization_config"].update(quant_algo="MXFP8"))
    with pytest.raises(CheckpointError, match=r"hf_quant_config\.json: quant_algo 'MXFP8' is not supported"):
        load(broken)


def test_quantization_from_config_json_alone(fp8_kv_case, input_ids, tmp_path, load):
    """vLLM reads config.json's quantization_config; without hf_quant_config.json it is enough."""
    copy_ = copy_checkpoint(fp8_kv_case, tmp_path / "no_hf_quant_config")
    (copy_ / "hf_quant_config.json").unlink()
    expected = load(fp8_kv_case).logits(input_ids)
    assert torch.equal(load(copy_).logits(input_ids), expected)


def test_unsupported_architecture_is_named(models, tmp_path, load):
    models["llama"].save_pretrained(tmp_path / "hf")
    edit_json(tmp_path / "hf" / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(CheckpointError, match=r"config\.json: architecture 'GPT2LMHeadModel' is not supported"):
        load(tmp_path / "hf")
