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
