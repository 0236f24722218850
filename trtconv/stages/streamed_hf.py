"""The unified HF checkpoint written one decoder layer at a time, as `export_hf_checkpoint` writes the whole model.

ModelOpt 0.47's `export_hf_checkpoint` needs every weight resident (its own streaming writer,
unified_export_hf_streaming, wants an accelerate-offloaded whole model). The layer-streamed path
(stages/streamed.py) holds one calibrated layer at a time, so each layer is exported by running
ModelOpt's own in-memory steps, `_export_transformers_checkpoint` (MoE input preparation, the
fused-group amax/scale unification `requantize_resmooth_fused_llm_layers` with its dummy forward,
`get_quant_config`, per-module `_export_quantized_weight`, the fused-experts reconstruction,
`postprocess_state_dict`) and the quant-aware hub-name reversal, on the one-layer shell with layer i
swapped in. Every one of those steps acts within a decoder layer (fusion groups share an input
tensor, which never crosses a layer), so layer i's tensors are those of the whole model's export.
What spans layers is assembled afterwards the way ModelOpt assembles it:

- the per-module quantization entries that `get_quant_config` condenses (process_layer_quant_config)
  are recorded per layer and condensed once, in the whole model's module order (layers, then lm_head,
  then MoE routers, which ModelOpt appends last);
- tensors go to a part file per layer and are merged into shards byte-identical to
  `save_pretrained(max_shard_size="10GB")` (huggingface_hub's own shard split; safetensors_stream);
- config.json is the full config as save_pretrained writes it, then ModelOpt's `_write_hf_export_config`
  (hf_quant_config.json, `quantization_config`).

The shell's outer tensors (embeddings, final norm, lm_head, a tied Gemma head dropped by name) come
from exporting layer 0. tests/contract/test_streaming_hf.py compares the result with the in-memory
export byte for byte.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LAYER0 = "model.layers.0."
MAX_SHARD_SIZE = "10GB"  # export_hf_checkpoint's default, which stages/export.export_hf uses
PLAIN_SHARD_SIZE = "50GB"  # save_pretrained's default: the unquantized export (precision none, no KV cache) is save_pretrained


@dataclass
class ExportedLayer:
    tensors: dict  # file name -> tensor (named for layer i)
    entries: dict  # get_quant_config's per-module entries of the layer (module names for layer i)
    routers: dict  # the layer's unquantized MoE routers' entries (ModelOpt appends them after all modules)
    outer: dict = field(default_factory=dict)  # layer 0 only: the tensors around the layers, in state-dict order
    outer_before: list = field(default_factory=list)  # layer 0 only: the outer names that come before the layers
    outer_entries: tuple = ({}, {})  # layer 0 only: quantization entries of modules before / after the layers (lm_head)
    kv_cache_quant_algo: str | None = None
    parameters: int = 0  # the layer's parameters after export (the index's total_parameters)


@contextmanager
def recorded_entries(box: dict):
    """get_quant_config with its final condensing step recording the per-module entries instead."""
    from modelopt.torch.export import quant_utils

    original = quant_utils.process_layer_quant_config

    def record(entries: dict) -> dict:
        box.update(entries)
        return {}

    quant_utils.process_layer_quant_config = record
    try:
        yield box
    finally:
        quant_utils.process_layer_quant_config = original


def _renamed(name: str, i: int) -> str:
    return f"model.layers.{i}." + name[len(LAYER0):] if name.startswith(LAYER0) else name


def export_layer(shell, layer, i: int, dtype) -> ExportedLayer:
    """ModelOpt's unified export of the one-layer shell with calibrated layer i in it (the layer is
    changed in place: its weights become the quantized ones)."""
    import torch
    from modelopt.torch.export.quant_aware_conversion import revert_weight_conversion_quant_aware
    from modelopt.torch.export.quant_utils import _get_unquantized_moe_router_names
    from modelopt.torch.export.unified_export_hf import _export_transformers_checkpoint

    shell.model.layers[0] = layer
    entries: dict = {}
    try:
        with torch.no_grad(), recorded_entries(entries):
            state, quant = _export_transformers_checkpoint(shell, dtype)
        state = revert_weight_conversion_quant_aware(shell, state)  # no-op unless the family renames (Mixtral)
        routers = {f"{r}.quantization" for r in _get_unquantized_moe_router_names(shell)}
    finally:
        shell.model.layers[0] = torch.nn.Identity()
    tensors = {_renamed(k, i): v for k, v in state.items() if k.startswith(LAYER0)}
    out = ExportedLayer(
        tensors=tensors,
        entries={_renamed(k, i): v for k, v in entries.items() if k.startswith(LAYER0) and k not in routers},
        routers={_renamed(k, i): v for k, v in entries.items() if k in routers},
        kv_cache_quant_algo=quant["quantization"].get("kv_cache_quant_algo"),
        parameters=sum(p.numel() for p in layer.parameters()),
    )
    if i == 0:
        out.outer = {k: v for k, v in state.items() if not k.startswith(LAYER0)}
        out.outer_before = _before_layers(state)
        outer = [k for k in entries if k not in routers]
        before = set(_before_layers(dict.fromkeys(outer)))
        out.outer_entries = ({k: entries[k] for k in outer if k in before},
                             {k: entries[k] for k in outer if k not in before and not k.startswith(LAYER0)})
    return out


def plain_layer(shell, layer, i: int) -> ExportedLayer:
    """save_pretrained's tensors of the shell with layer i in it (the unquantized export: stages/export.export_hf)."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    shell.model.layers[0] = layer
    try:
        state = revert_weight_conversion(shell, remove_tied_weights_from_state_dict(shell.state_dict(), shell))
    finally:
        shell.model.layers[0] = torch.nn.Identity()
    out = ExportedLayer(tensors={_renamed(k, i): v for k, v in state.items() if k.startswith(LAYER0)}, entries={}, routers={},
                        parameters=sum(p.numel() for p in layer.parameters()))
    if i == 0:
        out.outer = {k: v for k, v in state.items() if not k.startswith(LAYER0)}
        out.outer_before = _before_layers(state)
    return out


def _before_layers(ordered: dict) -> list[str]:
    """The names that come before the first of layer 0's (dicts keep the model's module order)."""
    names = list(ordered)
    first = next((n for n, k in enumerate(names) if k.startswith(LAYER0)), len(names))
    return names[:first]


def quant_config(layers_entries: dict, outer_entries: tuple, routers: dict, kv_cache_quant_algo: str | None) -> dict:
    """hf_quant_config as get_quant_config returns it for the whole model: entries in module order."""
    from modelopt import __version__
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    quantization = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config({**outer_entries[0], **layers_entries, **outer_entries[1], **routers}))
    if kv_cache_quant_algo is not None:
        quantization["kv_cache_quant_algo"] = kv_cache_quant_algo
    return {"producer": {"name": "modelopt", "version": __version__}, "quantization": quantization}


class ShardPlan:
    """Tensor order as the whole model's state dict has it (the outer tensors before the layers go first,
    the ones after last), split into shards as save_pretrained splits it (huggingface_hub's own function)."""

    def __init__(self):
        self.before: list[tuple[str, int]] = []
        self.layers: list[tuple[str, int]] = []
        self.after: list[tuple[str, int]] = []

    def add_outer(self, outer: dict, before: list[str]) -> None:
        for k, v in outer.items():
            (self.before if k in before else self.after).append((k, v.numel() * v.element_size()))

    def add_layer(self, tensors: dict) -> None:
        self.layers += [(k, v.numel() * v.element_size()) for k, v in tensors.items()]

    def shards(self, max_shard_size: str) -> tuple[dict[str, list[str]], int]:
        from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

        sizes = dict(self.before + self.layers + self.after)
        split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, get_storage_id=lambda n: None,
                                                     filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
        return split.filename_to_tensors, split.metadata["total_size"]


def write_shards(parts: list[Path], plan: ShardPlan, out: Path, total_parameters: int, max_shard_size: str) -> None:
    """The shards (and, when more than one, the index) save_pretrained writes, from the part files."""
    from trtconv.checkpoints.safetensors_stream import merge_parts

    files, total_size = plan.shards(max_shard_size)
    for name, tensors in files.items():
        merge_parts(parts, out / name, names=set(tensors), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                 "weight_map": {t: name for name, tensors in files.items() for t in tensors}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(shell, full_config, hf_quant_config: dict | None, out: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them for the whole model, then
    ModelOpt's own hf_quant_config.json / quantization_config step."""
    import copy

    from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper, revert_quant_config_names
    from modelopt.torch.export.unified_export_hf import _sanitize_generation_config_for_save, _write_hf_export_config

    config = copy.deepcopy(full_config)
    config.dtype = str(shell.dtype).split(".")[1]
    config.architectures = [type(shell).__name__]
    config.save_pretrained(out)
    _sanitize_generation_config_for_save(shell)
    if shell.can_generate():
        shell.generation_config.save_pretrained(out)
    if hf_quant_config is None:  # the unquantized export is save_pretrained alone
        return
    mapper = build_reverse_name_mapper(shell)
    if mapper is not None:
        revert_quant_config_names(hf_quant_config.get("quantization", {}), mapper)
    _write_hf_export_config(shell, hf_quant_config, out)


class HFLayerWriter:
    """Collects each exported layer (part files) and writes the checkpoint at the end."""

    def __init__(self, shell, full_config, out: Path, dtype, quantized: bool = True, copy_layer: bool = False):
        self.shell, self.full_config, self.out, self.dtype = shell, full_config, Path(out), dtype
        self.quantized, self.copy_layer = quantized, copy_layer  # copy: another export reads the layer after this one
        self.parts_dir = self.out / ".layer-parts"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.parts: list[Path] = []
        self.plan = ShardPlan()
        self.entries: dict = {}
        self.routers: dict = {}
        self.outer_entries: tuple = ({}, {})
        self.kv: str | None = None
        self.parameters = 0

    def add(self, layer, i: int) -> None:
        import copy

        if self.copy_layer:
            layer = copy.deepcopy(layer)
        done = export_layer(self.shell, layer, i, self.dtype) if self.quantized else plain_layer(self.shell, layer, i)
        if i == 0:
            self.plan.add_outer(done.outer, done.outer_before)
            self._save(done.outer, "outer")
            self.outer_entries = done.outer_entries
            self.parameters += sum(p.numel() for n, p in self.shell.named_parameters() if not n.startswith("model.layers."))
        self.plan.add_layer(done.tensors)
        self._save(done.tensors, f"layer{i:05d}")
        self.entries.update(done.entries)
        self.routers.update(done.routers)
        self.kv = self.kv or done.kv_cache_quant_algo
        self.parameters += done.parameters

    def _save(self, tensors: dict, name: str) -> None:
        from safetensors.torch import save_file

        path = self.parts_dir / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
        self.parts.append(path)

    def finish(self) -> dict | None:
        """Shards, index, config.json, generation_config.json, hf_quant_config.json; the hf_quant_config."""
        size = MAX_SHARD_SIZE if self.quantized else PLAIN_SHARD_SIZE
        write_shards(self.parts, self.plan, self.out, self.parameters, size)
        qc = quant_config(self.entries, self.outer_entries, self.routers, self.kv) if self.quantized else None
        write_configs(self.shell, self.full_config, qc, self.out)
        return qc

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.parts_dir, ignore_errors=True)
