"""Test helpers: quantize a tiny model with ModelOpt and export a real TensorRT-LLM checkpoint.

Shared by the format/executor tests and usable by others. Everything here calls ModelOpt 0.47 for
real (CPU); nothing is mocked. Keep models tiny: a quantize+export takes 1-4 s on one core.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.factories import make_tiny_model

# trtconv precision names used in tests -> ModelOpt preset names (modelopt.recipe.presets).
PRECISIONS = ("none", "fp8", "int8_smoothquant", "int4_awq", "w4a8_awq_beta")

# AWQ group 128 must divide every rank-local input dim, so tp 2 AWQ needs hidden 256 (notes §5).
AWQ_TP2_SIZES = {"hidden_size": 256, "intermediate_size": 512}


def load_bf16_exact_model(model_dir: Path) -> torch.nn.Module:
    """The saved model in float32, with every weight rounded to bfloat16 first.

    The exporter writes unquantized tensors in bf16 (it refuses fp32), so a model whose weights
    are already bf16 values exports losslessly and can be compared to float tolerance.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


def make_model(tmp_dir: Path, arch: str = "llama", **sizes) -> torch.nn.Module:
    return load_bf16_exact_model(make_tiny_model(Path(tmp_dir) / f"hf_{arch}", arch=arch, dtype=torch.float32, **sizes))


def token_batches(vocab_size: int, count: int = 4, batch: int = 2, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, length), generator=generator) for _ in range(count)]


def quant_config(precision: str, kv_fp8: bool = False, exclude: tuple[str, ...] = ()) -> dict:
    """The ModelOpt preset, plus quantizer name patterns switched off (as trtconv's quantization.exclude)."""
    import modelopt.torch.quantization as mtq
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES[precision])
    cfg["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in exclude]
    if kv_fp8:
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, KV_QUANT_CFG_CHOICES["fp8"]["quant_cfg"])
    return cfg


def quantize(model: torch.nn.Module, precision: str, kv_fp8: bool = False, seed: int = 0,
             exclude: tuple[str, ...] = ()) -> torch.nn.Module:
    """A calibrated fake-quant copy of ``model`` (the original is left untouched)."""
    import modelopt.torch.quantization as mtq

    quantized = copy.deepcopy(model)
    if precision == "none":
        return quantized
    batches = token_batches(model.config.vocab_size, seed=seed)

    def forward_loop(m: torch.nn.Module) -> None:
        for ids in batches:
            m(ids)

    with torch.no_grad():
        mtq.quantize(quantized, quant_config(precision, kv_fp8, exclude), forward_loop)
    return quantized.eval()


def trtllm_rope_fields(hf_config) -> dict:
    """rotary_base / rotary_scaling as TensorRT-LLM's own converter derives them from HF."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    fields: dict = {"rotary_base": float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        fields["rotary_scaling"] = {"type": rope_type, **{k: rope[k] for k in keys if k in rope}}
    return fields


def write_rope_fields(ckpt_dir: Path, hf_config) -> None:
    """Put back what the exporter drops under transformers 5 (the repair trtconv.stages.export does)."""
    path = Path(ckpt_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(trtllm_rope_fields(hf_config))
    path.write_text(json.dumps(config, indent=2))


def export_trtllm(model: torch.nn.Module, out_dir: Path, tp: int = 1, pp: int = 1, repair_rope: bool = True) -> Path:
    """export_tensorrt_llm_checkpoint in bf16 (always with an explicit tp: the default 0 crashes)."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cannot export tensorrt_llm checkpoint config ..." etc.
        export_tensorrt_llm_checkpoint(
            model,
            get_model_type(model),
            dtype=torch.bfloat16,
            export_dir=out_dir,
            inference_tensor_parallel=tp,
            inference_pipeline_parallel=pp,
        )
    if repair_rope:
        write_rope_fields(out_dir, model.config)
    return out_dir


@torch.no_grad()
def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids).logits.float()


def rel_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """‖candidate − reference‖ / ‖reference‖ over the reference's vocab (drops AWQ vocab padding)."""
    candidate = candidate[..., : reference.shape[-1]]
    return float((candidate - reference).norm() / reference.norm())


def copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return Path(dst)


def edit_config(ckpt_dir: Path, edit) -> None:
    """Apply ``edit(config_dict)`` to a checkpoint's config.json in place."""
    path = Path(ckpt_dir) / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def rewrite_tensor(ckpt_dir: Path, rank: int, name: str, change) -> None:
    """Replace tensor ``name`` of rank{rank}.safetensors by ``change(tensor)`` (safetensors only)."""
    from safetensors.torch import load_file, save_file

    path = Path(ckpt_dir) / f"rank{rank}.safetensors"
    tensors = load_file(path)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, path)


def align_fake_quant_with_checkpoint(quantized: torch.nn.Module, ckpt_dir: Path) -> None:
    """Make the fake-quant model compute what the checkpoint says, where the exporter rounded or
    clamped a value without updating the model:

    - prequant (smoothing) scales are stored in bf16 while the model keeps fp32;
    - FP8 KV-cache scales are clamped to >= 1.0 on export (ModelOpt's get_kv_cache_scaling_factor)
      and k/v are merged into one kv_cache_scaling_factor.
    """
    from safetensors import safe_open

    with safe_open(str(Path(ckpt_dir) / "rank0.safetensors"), framework="pt") as f:
        kv_scales = {
            int(k.split(".")[2]): f.get_tensor(k).float()
            for k in f.keys()
            if k.endswith("attention.kv_cache_scaling_factor")
        }
    with torch.no_grad():
        for module in quantized.modules():
            quantizer = getattr(module, "input_quantizer", None)
            scale = getattr(quantizer, "pre_quant_scale", None) if quantizer is not None else None
            if scale is not None:
                scale.copy_(scale.to(torch.bfloat16).float())
        for index, layer in enumerate(quantized.model.layers):
            if index in kv_scales:
                for name in ("k_bmm_quantizer", "v_bmm_quantizer"):
                    getattr(layer.self_attn, name).amax.fill_(float(kv_scales[index]) * 448.0)


# -- shared pytest fixtures: import them into a test module to use them ------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 cores shared with other jobs: keep every test single-threaded.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_model(root, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def input_ids(models):
    return token_batches(models["llama"].config.vocab_size, count=1, batch=2, length=24, seed=7)[0]


def calibrate_both_ways(tmp_path: Path, recipe) -> dict:
    """The calibrate + export unit run in memory (False) and layer-streamed (True) on the CPU, each into its own
    folder under tmp_path: {streamed: (exported, calibration record, stage records)}."""
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import calibration_rows
    from trtconv.pipeline import run_calibrate_and_export

    model_dir = Path(recipe.model.path)
    tok = load_tokenizer(model_dir, False)
    c = recipe.calibration
    rows = calibration_rows(builtin_pack("calib"), tok, c.num_samples, c.seq_len, c.seed)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    return {streamed: run_calibrate_and_export(recipe, model_dir, arch, tok, rows, tmp_path / ("streamed" if streamed else "in_memory"),
                                               "cpu", Reporter(quiet=True), streamed=streamed)
            for streamed in (False, True)}
