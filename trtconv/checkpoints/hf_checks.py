"""What a Hugging Face checkpoint must be before ModelOpt sees it: sane config sizes, float weights, finite values.

ModelOpt and transformers do not refuse broken input, they crash on it or quantize it silently
(issue 23, item 5): ``num_attention_heads: 0`` is a ZeroDivisionError while the architecture is
built; int32 weights calibrate and export, then overflow; a single int32 weight passes unnoticed;
a NaN or inf in a weight is a traceback deep in calibration. Each is refused here with the key or
tensor named and what is allowed (a ModelError: exit 2).

Costs, chosen for 70B checkpoints:
- the config and dtype checks read config.json and the safetensors headers only (no tensor data);
- the finite check runs on each tensor as it is read anyway (the whole-model load, or one layer at
  a time on the streamed path), never as a separate pass over the files. Its fast path is one
  ``sum()`` per tensor: the sum of any tensor holding NaN or inf is NaN or inf, and it reads the
  tensor once without a temporary (``isfinite(t).all()`` allocates a bool copy and measured 20x
  slower on the 2-core CI host: 64M float32 values in 50-80 ms against 1.6-1.8 s). Only a
  non-finite sum (or one that overflowed) is looked at element by element. Measured: the 3.4 M-parameter
  reference model 1-10 ms, the tiny test model under 1 ms; a float32 8B model (32 GB) is about 6-9 s
  at that host's 3.4-5.6 GB/s, seconds on a server CPU, milliseconds on a GPU.
"""

from __future__ import annotations

from pathlib import Path

from trtconv.core.errors import ModelError

# safetensors dtype strings of weights trtconv can quantize (floating point; transformers casts them to the
# compute dtype on load); integer and already-quantized (F8_*, I8, U8) weights are refused.
ALLOWED_WEIGHT_DTYPES = ("BF16", "F16", "F32", "F64")

# config.json keys that must be positive integers where present (null: the architecture's default).
POSITIVE_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def config_problems(cfg: dict) -> list[str]:
    """Sizes a model cannot have: non-integers, zero or negative values, heads that do not divide."""
    problems = []
    for key in POSITIVE_INT_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"key '{key}' is {value!r}; allowed: a positive integer")
    if problems:
        return problems
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"key 'num_attention_heads' {heads} is not a multiple of 'num_key_value_heads' {kv_heads}; "
                        f"allowed: num_key_value_heads dividing it ({_divisors(heads)})")
    hidden = cfg.get("hidden_size")
    if heads and hidden and cfg.get("head_dim") is None and hidden % heads:
        problems.append(f"key 'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {heads} and there is no "
                        f"'head_dim'; allowed: num_attention_heads dividing it ({_divisors(hidden)}), or a head_dim")
    return problems


def _divisors(n: int, limit: int = 12) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:limit])) + (", …" if len(found) > limit else "")


def check_config(cfg: dict, config_path: Path) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ModelError(f"{config_path}: " + "; ".join(problems))


def dtype_problems(found: dict[str, tuple[tuple[int, ...], str, str]], names: set[str]) -> list[str]:
    """Tensors of `names` (the architecture's state dict) stored in a dtype trtconv cannot quantize.
    `found`: name -> (shape, file name, safetensors dtype) from the headers."""
    return [f"{name} is {found[name][2]} in {found[name][1]}" for name in sorted(names)
            if found[name][2] not in ALLOWED_WEIGHT_DTYPES]


def check_dtypes(found: dict[str, tuple[tuple[int, ...], str, str]], names: set[str], model_dir: Path) -> None:
    bad = dtype_problems(found, names)
    if bad:
        listed = ", ".join(bad[:8]) + (f", and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ModelError(
            f"{model_dir}: {len(bad)} weight tensor(s) are not floating point: {listed}; allowed: "
            f"{', '.join(ALLOWED_WEIGHT_DTYPES)} (trtconv quantizes a floating-point checkpoint; an already "
            "quantized or integer checkpoint cannot be calibrated): use the original bf16/fp16/fp32 weights"
        )


def check_finite(name: str, tensor, where: Path | str) -> None:
    """Refuse a tensor holding NaN or inf (see the module docstring for the cost)."""
    import torch

    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
        return
    bad = ~torch.isfinite(tensor)
    if not bad.any():
        return  # only the sum overflowed
    nans = int(torch.isnan(tensor).sum())
    infs = int(bad.sum()) - nans
    raise ModelError(
        f"{where}: tensor {name} holds {nans} NaN and {infs} inf value(s) of {tensor.numel()}; allowed: finite "
        "numbers only (the checkpoint is damaged: re-export or re-download it)"
    )


# Below this many elements a CPU tensor's sum runs on one thread: waking torch's thread pool for each
# of a model's hundreds of small tensors cost 0.4-0.5 s for the 3.4 M-parameter reference model on the
# loaded 2-core CI host (1 ms on one thread); the large ones (embeddings, an 8B model's linears) keep every thread.
ONE_THREAD_NUMEL = 1 << 24


def check_finite_all(items, where: Path | str | None = None) -> None:
    """check_finite over (name, tensor[, where]) items, small CPU tensors on one thread."""
    import torch

    items = [(i[0], i[1], i[2] if len(i) > 2 else where) for i in items]
    small = [i for i in items if i[1].device.type == "cpu" and i[1].numel() < ONE_THREAD_NUMEL]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, tensor, at in small:
            check_finite(name, tensor, at)
    finally:
        torch.set_num_threads(threads)
    for name, tensor, at in items:
        if not (tensor.device.type == "cpu" and tensor.numel() < ONE_THREAD_NUMEL):
            check_finite(name, tensor, at)


def check_finite_model(model, where: Path | str) -> None:
    """Every parameter of a loaded model, by its state-dict name (buffers are computed, and a mask
    buffer may hold -inf by design)."""
    check_finite_all([(name, tensor.detach()) for name, tensor in model.named_parameters()], where)
