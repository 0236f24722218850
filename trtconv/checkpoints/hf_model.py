"""The original model and its tokenizer, loaded with transformers: what calibrate quantizes and evaluate compares with.

Kept apart from the load stage (which only inspects and hashes the checkpoint) so that the
calibrate and evaluate stages can load the model without importing another stage.
"""

from __future__ import annotations

from pathlib import Path

from trtconv.checkpoints.hf_checks import check_finite_model
from trtconv.core.errors import ModelError
from trtconv.core.imports import retry_after_import_deadlock
from trtconv.core.jsonio import read_json_object

# The files a tokenizer may consist of (hashed as the tokenizer input, copied into the artifact).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def read_hf_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} has no config.json: not a Hugging Face checkpoint folder")
    return read_json_object(cfg_path, "a Hugging Face model config", ModelError)


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
    # Straight onto the device: on a GPU the weights go from the file to GPU memory without a
    # whole-model copy in host RAM (an 8B model is 16 GB of bf16; a float32 host copy 32 GB).
    placement = {} if str(device) == "cpu" else {"device_map": str(device)}
    placement.update(family_attention(model_dir))

    def load():  # the import too: it can meet the background ModelOpt import half way (KeyError 'accelerate', loaded host)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True, **placement)

    try:
        model = retry_after_import_deadlock(load)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{model_dir}: transformers cannot load this checkpoint: {exc}") from None
    model.eval()
    model = model if placement else model.to(device)
    check_finite_model(model, model_dir)  # NaN/inf stop here, named, not deep inside ModelOpt (hf_checks)
    return model


def import_model_class(hf_cfg: dict) -> None:
    """Import transformers' model-loading stack and the family's modeling module on this thread, before ModelOpt's
    background import starts (trtconv.core.imports). Both need accelerate and transformers' generation utilities;
    importing them from two threads at once left accelerate half imported on the loaded 2-core host, past any
    retry (its modules import each other in a fixed order), and cost ModelOpt its HF plugins. The background
    import then finds them whole. Best effort: a model_type transformers does not know (remote code) imports the
    stack only, and any error is left to the load, which reports it."""
    try:
        from transformers import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # with generation utilities, accelerate

        MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[hf_cfg.get("model_type", "")]]
    except Exception:  # noqa: BLE001 - the load that follows reports what is wrong
        pass


def family_attention(model_dir: Path) -> dict:
    """{"attn_implementation": ...} where the family's row needs one (trtconv.architectures), else {}."""
    from trtconv.architectures import row_for_config

    row = row_for_config(read_hf_config(Path(model_dir)))
    return {"attn_implementation": row.attn_implementation} if row is not None and row.attn_implementation else {}


def release_memory() -> None:
    """Give dropped models' memory back now (the calibrated model, before evaluation loads the
    original): collect the reference cycles ModelOpt's wrappers leave, return cached CUDA blocks."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# A tokenizer needs one vocabulary file; tokenizer_config.json alone only says which class reads it.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def check_tokenizer_files(model_dir: Path) -> None:
    """Name the missing tokenizer files, instead of letting transformers blame sentencepiece or tiktoken."""
    if any((model_dir / name).is_file() for name in VOCABULARY_FILES) or any(model_dir.glob("*.tiktoken")):
        return
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    raise ModelError(
        f"{model_dir} has no tokenizer vocabulary: none of {', '.join(VOCABULARY_FILES)} is there"
        + (f" (found only {', '.join(present)})" if present else "")
        + "; copy the tokenizer files of this model into the folder (AutoTokenizer.save_pretrained writes them)"
    )


def load_tokenizer(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    check_tokenizer_files(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: no usable tokenizer: {exc}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{model_dir}: the tokenizer has no eos token; calibration packs documents separated by it")
    return tok


def head_logits(model, hidden):
    """A transformers causal LM's logits from its last decoder layer's output: the family's own tail (final norm,
    lm_head, Gemma 2's soft-capping), run by its forward with no decoder layer (as the whole model's: the same
    operations on the same tensors, the same numbers). The streamed evaluation's baseline and precision auto's
    trials (stages.search.Baseline) run it."""
    import torch

    layers, model.model.layers = model.model.layers, torch.nn.ModuleList()
    try:
        with torch.no_grad():
            return model(inputs_embeds=hidden, use_cache=False).logits
    finally:
        model.model.layers = layers
