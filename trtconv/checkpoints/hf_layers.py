"""A Hugging Face checkpoint read one decoder layer at a time, never whole.

`safe_open` memory-maps each safetensors shard, so reading `model.layers.7.*` touches only that
layer's pages: host memory stays about one layer however large the model. Layer-streamed
calibration, export and evaluation all read through this one index, which also checks up front
that every shard the index names exists (a missing shard is found before any work, by name).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path, PurePosixPath

from trtconv.checkpoints.hf_checks import check_finite_all
from trtconv.core.errors import ModelError

LAYER_PREFIX = "model.layers."


def check_shard_name(index: Path, tensor: str, shard: str) -> None:
    """A shard must be a file inside the model folder: the load hashes the folder's files as the
    model's inputs (what the cache keys and the manifest are made of), so a shard named outside it
    (``../other/model.safetensors``, an absolute path) would be read but never hashed, and a change
    to it would bring back a stale artifact from the cache. transformers 5.14 follows such a path;
    trtconv refuses it whatever transformers does. A symlink inside the folder is fine: it is
    followed, and the bytes it leads to are hashed under its name."""
    parts = PurePosixPath(shard.replace("\\", "/")).parts
    if shard and not os.path.isabs(shard) and ".." not in parts:
        return
    raise ModelError(
        f"{index}: weight_map[{tensor!r}] names shard {shard!r}, which is not inside the model folder "
        f"{index.parent}; a shard must be a file name in that folder (or a path below it, without '..' and not "
        "absolute). Copy the shard into the folder, or link it there (a symlink inside the folder is followed and hashed)"
    )


def read_index(index: Path) -> dict[str, Path]:
    """Tensor name -> shard path from a safetensors index; a shard it names but that is absent is an error."""
    model_dir = index.parent
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = {str(s) for s in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{index}: not a safetensors index (needs a 'weight_map' object): {exc}") from None
    for tensor, shard in weight_map.items():
        check_shard_name(index, tensor, str(shard))
    missing = sorted(s for s in names if not (model_dir / s).is_file())
    if missing:
        raise ModelError(
            f"{index} names shard{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not found in {model_dir}: "
            "the checkpoint is incomplete; download the missing shard(s) again"
        )
    return {name: model_dir / shard for name, shard in weight_map.items()}


class WeightIndex:
    """Tensor name -> the shard holding it, from model.safetensors.index.json or the single file."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = read_index(index)
        else:
            self.files = self._from_files(sorted(self.model_dir.glob("*.safetensors")))

    def _from_files(self, files: list[Path]) -> dict[str, Path]:
        from safetensors import safe_open

        if not files:
            raise ModelError(f"{self.model_dir} has no *.safetensors weight files")
        out: dict[str, Path] = {}
        for f in files:
            with safe_open(f, "pt") as s:
                out.update({k: f for k in s.keys()})
        return out

    def num_layers(self) -> int:
        ids = {int(k[len(LAYER_PREFIX):].split(".", 1)[0]) for k in self.files if k.startswith(LAYER_PREFIX)}
        return max(ids) + 1 if ids else 0

    def tensors(self, names: list[str], dtype=None, device: str = "cpu", strip: str = "") -> dict:
        """The named tensors (read from the memory map shard by shard), keys without `strip`."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out, read = {}, []
        for f, group in by_file.items():
            with safe_open(f, "pt") as s:
                for n in group:
                    t = s.get_tensor(n)
                    t = t.to(device=device, dtype=dtype or t.dtype)
                    read.append((n, t, f))
                    out[n[len(strip):] if strip and n.startswith(strip) else n] = t
        check_finite_all(read)  # what was just read, while it is in memory: no pass of its own (hf_checks)
        return out

    def layer(self, i: int, dtype=None, device: str = "cpu") -> dict:
        prefix = f"{LAYER_PREFIX}{i}."
        return self.tensors(sorted(k for k in self.files if k.startswith(prefix)), dtype, device, strip=prefix)

    def outer(self, dtype=None, device: str = "cpu") -> dict:
        """Everything that is not a decoder layer: embeddings, final norm, lm_head."""
        return self.tensors(sorted(k for k in self.files if not k.startswith(LAYER_PREFIX)), dtype, device)

    def layer_bytes(self, i: int = 0) -> int:
        """Bytes of layer i as stored (from the shard headers; nothing is read)."""
        from safetensors import safe_open

        prefix, total = f"{LAYER_PREFIX}{i}.", 0
        for f in {self.files[k] for k in self.files if k.startswith(prefix)}:
            with safe_open(f, "pt") as s:
                for k in s.keys():
                    if k.startswith(prefix):
                        sl = s.get_slice(k)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        total += n * _DTYPE_SIZE.get(sl.get_dtype(), 2)
        return total


_DTYPE_SIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I8": 1, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------------------------------------
# The model around the layers: a one-layer shell with the real outer weights, and one layer at a time


class _Stop(Exception):
    pass


def first_output(out):
    """A decoder layer's hidden states: transformers' layers return them alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def build_shell(model_dir: Path, index: WeightIndex, dtype, device: str):
    """(one-layer model with the real outer weights, the decoder layer class, the full config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    full = AutoConfig.from_pretrained(model_dir)
    cfg = copy.deepcopy(full)
    cfg.num_hidden_layers = 1
    from accelerate import init_empty_weights

    # Parameters on meta, buffers real: the non-persistent ones (rope tables, Gemma's embed_scale) are made
    # by the modules' own code, as from_pretrained makes them.
    from trtconv.checkpoints.hf_model import family_attention

    with init_empty_weights(include_buffers=False):  # the family's attention, as load_hf_model picks it (Gemma 2: eager)
        shell = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **family_attention(model_dir))
    layer_cls = type(shell.model.layers[0])
    shell.load_state_dict(index.outer(dtype, device), strict=False, assign=True)
    if shell.config.tie_word_embeddings:
        shell.tie_weights()
    for module in shell.modules():
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[key] = buf.to(device)
    return shell.eval(), layer_cls, full


def eager_experts(shell, architecture: str) -> None:
    """For calibration: a mixture-of-experts family's layers (built from the shell's config) compute their experts in
    transformers' eager loop, F.linear per expert, which ModelOpt's fused-experts quantizers intercept. ModelOpt forces
    that on a model holding experts (force_eager_experts_impl_on_the_fly); a shell whose one layer is dense
    (DeepSeek-V3's first_k_dense_replace) holds none, and grouped_mm left every MoE layer's input quantizers
    uncalibrated. Not for the gate's original, which runs transformers' default as the in-memory gate's does."""
    from trtconv.architectures import ARCHITECTURES

    if ARCHITECTURES[architecture].experts is not None:
        shell.config._experts_implementation = "eager"


def capture_layer0_inputs(shell, batches, layer_type=None) -> list[tuple[tuple, dict]]:
    """Layer 0's positional and keyword arguments for every batch, as the model passes them.

    `layer_type`: the arguments a layer of that type gets (Gemma 2/3, Qwen3 with windows: the model
    picks each layer's mask and rope tables by config.layer_types[i]; the shell's one layer is i = 0,
    so its entry is set to the type asked for while the batches run)."""
    import torch

    cached = []

    def hook(_mod, args, kwargs):
        cached.append((args, dict(kwargs)))
        raise _Stop

    types = getattr(shell.config, "layer_types", None)
    if layer_type is not None and types:
        shell.config.layer_types = [layer_type, *types[1:]]
    handle = shell.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    shell(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
        if types:
            shell.config.layer_types = types
    return cached


def layer_type(config, i: int):
    """config.layer_types[i] (the kind of attention layer i runs: full or sliding), or None."""
    types = getattr(config, "layer_types", None)
    return types[i] if types else None


class LayerInputs:
    """The keyword arguments (mask, rope tables, positions) each batch gives a layer of each type, captured
    once per type on the shell: a layer's inputs are the previous layer's hidden states and these."""

    def __init__(self, shell, batches):
        self.shell, self.batches, self.by_type = shell, batches, {}
        first = layer_type(shell.config, 0)
        self.by_type[first] = capture_layer0_inputs(shell, batches, first)

    def first(self) -> list[tuple[tuple, dict]]:
        return self.by_type[layer_type(self.shell.config, 0)]

    def for_layer(self, i: int) -> list[tuple[tuple, dict]]:
        kind = layer_type(self.shell.config, i)
        if kind not in self.by_type:
            self.by_type[kind] = capture_layer0_inputs(self.shell, self.batches, kind)
        return self.by_type[kind]


def load_layer(layer_cls, config, index: WeightIndex, i: int, dtype, device: str):
    import torch

    with torch.device("meta"):
        layer = layer_cls(config, layer_idx=i)
    layer.load_state_dict(fold_layer_experts(index.layer(i, dtype, device), config), strict=True, assign=True)
    return layer.eval()


def fold_layer_experts(tensors: dict, config) -> dict:
    """One layer's tensors as transformers 5's modules hold them: a MoE family's per-expert files
    (Mixtral `block_sparse_moe.experts.3.w1`) stacked into the fused experts (`mlp.experts.gate_up_proj`
    [E, 2I, H]: gate rows, then up; `down_proj` [E, H, I]), the block renamed; what from_pretrained's
    conversion does for the whole model (trtconv.architectures.Experts, stages/load.fold_experts)."""
    import torch

    from trtconv.architectures import by_hf_name

    row = by_hf_name((getattr(config, "architectures", None) or [None])[0])
    moe = row.experts if row is not None else None
    if moe is None:
        return tensors
    gate, up, down = moe.file_leaves
    per_expert, out = {}, {}
    prefix = f"{moe.file_block}.experts."
    for name, t in tensors.items():
        if name.startswith(prefix) and name.endswith(".weight"):
            e, leaf = name[len(prefix):-len(".weight")].split(".", 1)
            per_expert[(int(e), leaf)] = t
        else:
            out[name.replace(f"{moe.file_block}.", f"{moe.module_block}.", 1)] = t
    if per_expert:
        count = 1 + max(e for e, _ in per_expert)
        fused = f"{moe.module_block}.experts"
        out[f"{fused}.gate_up_proj"] = torch.stack([torch.cat([per_expert[(e, gate)], per_expert[(e, up)]]) for e in range(count)])
        out[f"{fused}.down_proj"] = torch.stack([per_expert[(e, down)] for e in range(count)])
    return out
