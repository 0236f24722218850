"""The original model and its tokenizer, loaded with transformers: what calibrate quantizes and evaluate compares with.

Kept apart from the load stage (which only inspects and hashes the checkpoint) so that the
calibrate and evaluate stages can load the model without importing another stage.
"""

from __future__ import annotations

from pathlib import Path

from trtconv.core.errors import ModelError


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


# On a CPU the original model computes in float32 whatever the checkpoint's dtype. Measured on this
# project's 2-core CI host (Xeon with AMX, torch 2.13): a plain bf16 matmul is ~4x faster than float32
# (160-190 vs 45 GFLOP/s), but the forward that calibration runs is ModelOpt's fake-quantized one, and
# that is ~1.6x *slower* in bf16 (SmolLM2-135M, 4x256 tokens, fp8: 96 s bf16 vs 59 s float32); on CPUs
# without native bf16 (no AMX / avx512_bf16) a bf16 matmul runs at ~1/8 of float32 (5.3 vs 42.7 GFLOP/s,
# issue 12), which made a 135M model take most of an hour. float32 is never the slow choice on a CPU,
# and its calibration statistics do not depend on which bf16 kernels a CPU happens to have. The export
# still writes the recipe's export.dtype: ModelOpt casts each exported tensor to it.
CPU_COMPUTE_DTYPE = "float32"


def compute_dtype(recipe_dtype: str, device: str) -> str:
    """The dtype the original model is loaded in for calibration on `device` ("cpu" | "cuda")."""
    return CPU_COMPUTE_DTYPE if device == "cpu" else recipe_dtype


def load_hf_model(model_dir: Path, dtype: str, trust_remote_code: bool, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{model_dir}: transformers cannot load this checkpoint: {exc}") from None
    model.eval()
    return model.to(device)


def load_tokenizer(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: no usable tokenizer: {exc}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{model_dir}: the tokenizer has no eos token; calibration packs documents separated by it")
    return tok
