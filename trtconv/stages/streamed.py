"""Calibrate and export one decoder layer at a time: models larger than the GPU (and than host RAM).

ModelOpt 0.47's own `layerwise` calibration (algorithm: {layerwise: {enable: true}}) walks the
layers of a whole model object: the weights must be on the GPU or accelerate-offloaded, and with
accelerate's CPU offload `export_tensorrt_llm_checkpoint` fails on meta tensors. So trtconv drives
ModelOpt per layer, as llm-compressor and AutoAWQ do, and proves it gives the same checkpoint:

1. A one-layer "shell" of the model (meta device) holds the real embeddings, final norm and lm_head,
   read from the memory-mapped safetensors. It runs the calibration batches up to decoder layer 0,
   whose inputs (hidden states and the keyword arguments the model passes: rotary cos/sin, mask,
   positions) are cached on the device; the keyword arguments once per kind of layer (Gemma's sliding
   and full layers get their own mask and rope tables: hf_layers.LayerInputs).
2. Layer i is built from its tensors alone, quantized with ModelOpt's own modes under the name
   `model.layers.{i}` (so recipe exclude patterns match the same quantizers), and calibrated by a
   forward loop that replays the cached inputs. ModelOpt runs that loop once for max/SmoothQuant
   and twice for AWQ (statistics, then search); pass p's outputs become layer i+1's pass-p inputs,
   exactly what layer i+1 sees inside the whole model. (With an FP8 KV cache AWQ's second pass
   sees quantized attention, so two input streams are kept.)
3. The layer is exported by each checkpoint's writer, then freed. The TensorRT-LLM checkpoint
   (TrtllmLayerWriter): ModelOpt's own per-layer export steps (the ones `torch_to_tensorrt_llm_checkpoint`
   runs for every layer), tensors renamed to layer i and written to a part file per rank; embeddings/
   lm_head from exporting the shell once, with layer 0 swapped in. The unified HF checkpoint
   (stages/streamed_hf.py): ModelOpt's in-memory unified export on the shell with layer i swapped in.
   A MoE layer's expert tokens are counted while it calibrates (calibrate.ExpertTokens, per layer).
4. The part files are merged into files byte-identical to `save_file` / `save_pretrained` (checkpoints.
   safetensors_stream), and the configs are assembled the way ModelOpt assembles them.

tests/contract/test_streaming.py and test_streaming_hf.py compare the results with the in-memory path
byte for byte.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trtconv.checkpoints.hf_layers import WeightIndex, build_shell, eager_experts, first_output, load_layer
from trtconv.checkpoints.hf_model import torch_dtype
from trtconv.core.errors import UserError
from trtconv.core.ui import quiet_dependency

PARTS_DIR = ".layer-parts"


def check_supported(recipe, devices: int = 1) -> None:
    """What the streamed path cannot do yet, named before any work (plan, doctor and build call this through
    memory_plan.streamed_refusals); `devices`: the GPUs the layers are split over (--gpus)."""
    if devices > 1 and recipe.export.hf_checkpoint:
        raise UserError(f"--gpus {devices}: the unified HF checkpoint (export.hf_checkpoint) is written layer by layer on one "
                        "device only (its export runs on the model's one-layer shell); use --gpus 1")
    if recipe.export.pp_size != 1:
        raise UserError(f"calibration.streaming: export.pp_size {recipe.export.pp_size} is not supported by the layer-streamed "
                        "path (pp_size 1 only; tp_size may be any); set calibration.streaming: never or export.pp_size: 1")
    if recipe.model.trust_remote_code:
        raise UserError("calibration.streaming: models with their own code (model.trust_remote_code) are not streamed; "
                        "set calibration.streaming: never")


def named_root(layer, i: int):
    """A container in which the layer's modules are named `model.layers.{i}.*`, as in the whole model."""
    import torch

    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleDict({str(i): layer})
    return root


def quantize_layer(root, cfg: dict, forward_loop) -> None:
    """`mtq.quantize` minus its whole-model guard (a layer may legitimately have nothing enabled);
    trtconv's census checks the guard's condition over all layers instead."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.opt import apply_mode
    from modelopt.torch.quantization.mode import QuantizeModeRegistry

    root = apply_mode(root, mode=[("quantize", dict(cfg))], registry=QuantizeModeRegistry)
    mtq.calibrate(root, cfg.get("algorithm"), forward_loop=forward_loop)


def calibrate_layer(layer, i: int, cfg: dict | None, streams: list, kwargs: list | None = None) -> list:
    """Calibrate layer i on the cached inputs; the inputs of layer i+1 (one list per stream).
    `kwargs`: the (args, kwargs) layer i's type gets per batch (mask, rope tables), when they differ
    from the stream's (Gemma's sliding and full layers)."""
    import torch

    if kwargs is not None:
        streams = [[((a[0],) + t[0][1:], t[1]) for (a, _), t in zip(stream, kwargs)] for stream in streams]

    if cfg is None:  # nothing to calibrate: just run the layer
        with torch.no_grad():
            return [_with_outputs(streams[0], [layer(*a, **k) for a, k in streams[0]])]
    recorded: list[list] = []

    def forward_loop(model) -> None:
        # ModelOpt's pass p here is the whole model's pass p: replay the pass-p inputs.
        src = streams[min(len(recorded), len(streams) - 1)]
        with torch.no_grad():
            recorded.append([model.model.layers[str(i)](*a, **k) for a, k in src])

    quantize_layer(named_root(layer, i), cfg, forward_loop)
    nxt: list = []
    for outs in recorded:
        if nxt and all(torch.equal(first_output(o), first_output(prev[0])) for o, prev in zip(outs, nxt[-1])):
            continue  # identical to the previous pass (no quantized attention in between): one stream
        nxt.append(_with_outputs(streams[0], outs))
    return nxt


def _with_outputs(template: list, outs: list) -> list:
    return [((first_output(o),) + tuple(a[1:]), k) for o, (a, k) in zip(outs, template)]


def export_layer(layer, i: int, hf_config, dtype, quantization: str | None, decoder_type: str, tp_size: int):
    """ModelOpt's per-layer export steps (model_config_export.torch_to_tensorrt_llm_checkpoint) on one
    layer: ([per-rank tensors], per-layer quantization entries), named for layer i."""
    from modelopt.torch.export.layer_utils import build_decoder_config
    from modelopt.torch.export.model_config import ModelConfig
    from modelopt.torch.export.model_config_utils import (merge_gate_fc, merge_qkv, model_config_to_dict,
                                                          pack_linear_weights, split_config_and_weights)
    from modelopt.torch.export.postprocess import (check_weight_shape_valid, postprocess_model_config,
                                                   postprocess_tensors)

    meta = dict(hf_config.__dict__)
    meta["training_pipeline_parallel"] = 1
    meta["training_tensor_parallel"] = 1
    mc = ModelConfig(architecture=hf_config.architectures[0], dtype=str(dtype).split(".")[1], rank=0,
                     tensor_parallel=1, pipeline_parallel=1, vocab_size=hf_config.vocab_size)
    mc.layers = [build_decoder_config(layer, meta, decoder_type, tp_size=tp_size)]
    mc.quantization = quantization
    check_weight_shape_valid(mc, tp_size, 1)
    ranks, layer_cfg = [], {}
    rename = lambda k: k.replace("transformer.layers.0.", f"transformer.layers.{i}.", 1)  # noqa: E731
    for rank_cfg in postprocess_model_config(mc, tp_size, 1, training_pipeline_parallel=1):
        merge_qkv(rank_cfg)
        merge_gate_fc(rank_cfg)
        pack_linear_weights(rank_cfg)
        weights, cfgs = {}, {}
        split_config_and_weights(model_config_to_dict(rank_cfg), weights, "transformer", cfgs)
        postprocess_tensors(weights, dtype=dtype, force_cpu=True, force_contiguous=True, force_non_view=False)
        ranks.append({rename(k): v for k, v in weights.items()})
        layer_cfg = {rename(k): v for k, v in cfgs.items()}
    return ranks, layer_cfg


def export_shell(shell, layer, dtype, decoder_type: str, tp_size: int, tmp: Path) -> tuple[list[dict], dict, dict | None]:
    """Export the one-layer shell with layer 0 swapped in: the non-layer tensors of each rank, config.json
    and quant_cfg.json (None when ModelOpt writes none)."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from safetensors.torch import load_file

    import torch

    shell.model.layers[0] = layer
    try:
        export_tensorrt_llm_checkpoint(shell, decoder_type, dtype=dtype, export_dir=tmp,
                                       inference_tensor_parallel=tp_size, inference_pipeline_parallel=1)
    finally:
        shell.model.layers[0] = torch.nn.Identity()  # the shell must not keep layer 0 alive
    outer = []
    for r in range(tp_size):
        tensors = load_file(tmp / f"rank{r}.safetensors")
        outer.append({k: v for k, v in tensors.items() if not k.startswith("transformer.layers.")})
    quant_cfg = tmp / "quant_cfg.json"
    cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    return outer, cfg, json.loads(quant_cfg.read_text(encoding="utf-8")) if quant_cfg.is_file() else None


def assemble_config(cfg0: dict, layer_cfg: dict, n_layers: int, shell_quant_cfg: dict | None) -> tuple[dict, dict | None]:
    """(config.json, quant_cfg.json or None) of the whole model from the shell's and every layer's
    quantization entries, as export_tensorrt_llm_checkpoint assembles them (process_layer_quant_config;
    exclude_modules through a set; per-layer formats in quant_cfg.json when it writes one)."""
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    cfg = copy.deepcopy(cfg0)
    cfg["num_hidden_layers"] = n_layers
    entries = dict(layer_cfg)
    outer = (shell_quant_cfg or {}).get("quantized_layers") or {}
    shell_quant = cfg0.get("quantization") or {}
    # A shell whose one layer is excluded exports unquantized, without exclude_modules: its lm_head is
    # unquantized all the same, and the whole model's export names it.
    outer_excluded = shell_quant.get("exclude_modules") or ([] if shell_quant.get("quant_algo") else ["lm_head"])
    for m in outer_excluded:
        if not m.startswith("transformer.layers."):
            entries[f"{m}.quantization"] = None  # non-layer modules (lm_head) come after the layers
    qc = process_layer_quant_config(entries)
    qc["kv_cache_quant_algo"] = (cfg0.get("quantization") or {}).get("kv_cache_quant_algo")
    if "quantized_layers" in qc:
        qc["quantized_layers"].update({k: v for k, v in outer.items() if not k.startswith("transformer.layers.")})
        cfg["quantization"] = {k: qc[k] for k in ("quant_algo", "kv_cache_quant_algo")}
        return cfg, qc
    qc["exclude_modules"] = list(set(qc.get("exclude_modules") or []))
    cfg["quantization"] = qc
    return cfg, None


def run(recipe, model_dir: Path, architecture: str, tokenizer, calib_tokens, root: Path, device: str, reporter, devices=None):
    """Calibrate + export layer by layer into root; (ExportResult, calibration record, census).
    `devices` (trtconv.stages.devices.Devices): more than one splits the layers over them."""
    import time

    import torch

    from trtconv.checkpoints.hf_layers import LayerInputs
    from trtconv.checkpoints.hf_model import compute_dtype
    from trtconv.core.imports import import_modelopt
    from trtconv.stages import calibrate, export

    split = devices is not None and devices.count > 1
    check_supported(recipe, devices.count if split else 1)
    import_modelopt()  # first, on its own thread: see trtconv.core.imports
    t0 = time.monotonic()
    q, ex = recipe.quantization, recipe.export
    # The same compute dtype as the in-memory path (float32 on a CPU), so both write the same bytes.
    dtype, export_dtype = torch_dtype(compute_dtype(recipe.model.dtype, device)), torch_dtype(ex.dtype)
    log: list[str] = []
    cfg = calibrate.recipe_quant_config(q, log) if q.quantizes else None
    index = WeightIndex(model_dir)
    shell, layer_cls, hf_config = build_shell(model_dir, index, dtype, device)
    n_layers = hf_config.num_hidden_layers
    from modelopt.torch.export.model_utils import get_model_type
    from modelopt.torch.quantization.plugins.huggingface import register_hf_attentions_on_the_fly

    decoder_type = get_model_type(shell)
    with quiet_dependency(log):
        if cfg is not None:
            # KV-cache quantizers need the HF attention class registered, which ModelOpt only does for a
            # PreTrainedModel root; and lm_head must become the same (disabled) QuantLinear as in the whole model.
            # Without mtq.quantize's guard: the shell's one layer may be excluded (the failed gate's advice).
            register_hf_attentions_on_the_fly(shell)
            eager_experts(shell, architecture)  # what ModelOpt's plugin does for a whole model holding experts
            quantize_layer(shell, {**copy.deepcopy(cfg), "algorithm": None}, None)
    rows = torch.tensor(calib_tokens.rows, dtype=torch.long)
    batches = [rows[s : s + recipe.calibration.batch_size].to(device) for s in range(0, len(rows), recipe.calibration.batch_size)]
    inputs = LayerInputs(shell, batches)
    streams = [inputs.first()]
    reporter.stage("calibrate", f"layer-streamed: {n_layers} layers of {index.layer_bytes(0) / 2**20:.0f} MiB, "
                   f"{len(batches)} cached batches")
    checkpoint = root / export.CHECKPOINT_DIR
    parts = checkpoint / PARTS_DIR
    for r in range(ex.tp_size if ex.tensorrt_llm_checkpoint else 0):
        (parts / f"rank{r}").mkdir(parents=True, exist_ok=True)
    census: dict = {"enabled": {}, "invalid_amax": []}
    layer_cfgs: dict = {}
    experts = _ExpertCounts()
    seconds: dict = {"shell": round(time.monotonic() - t0, 3), "layers": []}  # what a larger model's time scales with
    tmp = Path(tempfile.mkdtemp(prefix="trtconv-shell-"))
    job = LayerJob(cfg, index, layer_cls, shell, hf_config, dtype, export_dtype, decoder_type, ex.tp_size, parts, tmp,
                   hf=_hf_writer(recipe, shell, hf_config, root, export_dtype), trtllm=ex.tensorrt_llm_checkpoint)
    try:
        if split:  # the split (trtconv.stages.devices.Devices)
            with reporter.progress(f"calibration layers ({devices.describe()})", total=n_layers) as advance:
                with quiet_dependency(log):  # once, around every thread: it swaps sys.stdout and the warning filters
                    done = devices.calibrate_layers(job, streams, n_layers, advance)
        else:
            done = []
            with reporter.progress("calibration layers", total=n_layers) as advance:
                for i in range(n_layers):
                    t_layer = time.monotonic()
                    layer = load_layer(layer_cls, shell.config, index, i, dtype, device)
                    with quiet_dependency(log):
                        with experts.counting(layer, i, hf_config, cfg is not None):
                            streams = calibrate_layer(layer, i, cfg, streams, inputs.for_layer(i))
                        done.append(finish_layer(job, layer, i))
                    del layer
                    if device != "cpu":
                        torch.cuda.empty_cache()
                    done[-1]["seconds"] = round(time.monotonic() - t_layer, 3)
                    advance(1)
        for i, one in enumerate(done):  # in layer order, whichever device did the layer
            _merge_census(census, one["census"], i)
            layer_cfgs.update(one["layer_cfg"])
            seconds["layers"].append(one["seconds"])
        t_merge = time.monotonic()
        if cfg is not None:
            calibrate.check_census(census, q)
            experts.check()
        if job.hf is not None:
            job.hf.finish()
        if ex.tensorrt_llm_checkpoint:
            cfg0, quant_cfg0 = job.shell_config
            merge_ranks(parts, checkpoint, ex.tp_size, devices.count if devices is not None else 1)
            config, quant_cfg = assemble_config(cfg0, layer_cfgs, n_layers, quant_cfg0)
            (checkpoint / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
            if quant_cfg is not None:
                (checkpoint / "quant_cfg.json").write_text(json.dumps(quant_cfg, indent=4), encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(parts, ignore_errors=True)
        if job.hf is not None:
            job.hf.cleanup()
    seconds["merge"] = round(time.monotonic() - t_merge, 3)
    t_finish = time.monotonic()
    result = _result(recipe, hf_config, architecture, tokenizer, root, log)
    result.seconds = {**seconds, "tokenizer_repair_validation": round(time.monotonic() - t_finish, 3)}
    record = {"quant_config": calibrate._jsonable(cfg) if cfg is not None else {}, "census": census}
    if experts.record() is not None and cfg is not None:
        record["experts"] = experts.record()
        if experts.without_tokens():
            reporter.warn(f"{len(experts.without_tokens())} experts received no calibration token "
                          f"({', '.join(experts.without_tokens()[:4])}); their weight scales come from their own weights, "
                          "their input scale is their layer's (manifest: calibrate.experts)")
    return result, record, log


def _hf_writer(recipe, shell, hf_config, root: Path, export_dtype):
    """The unified HF checkpoint's layer writer (stages/streamed_hf.py), or None when it is not exported."""
    from trtconv.stages import export
    from trtconv.stages.streamed_hf import HFLayerWriter

    if not recipe.export.hf_checkpoint:
        return None
    return HFLayerWriter(shell, hf_config, root / export.HF_CHECKPOINT_DIR, export_dtype,
                         quantized=recipe.quantization.quantizes, copy_layer=recipe.export.tensorrt_llm_checkpoint)


def _result(recipe, hf_config, architecture: str, tokenizer, root: Path, log: list):
    from trtconv.checkpoints.trtllm_format import validate_checkpoint
    from trtconv.stages import export

    q, ex = recipe.quantization, recipe.export
    tok_dir = root / export.TOKENIZER_DIR
    export.save_tokenizer(tokenizer, tok_dir)
    result = export.ExportResult(checkpoint_dir=None, hf_checkpoint_dir=None, tokenizer_dir=tok_dir, dependency_warnings=log)
    if ex.hf_checkpoint:
        result.hf_checkpoint_dir = root / export.HF_CHECKPOINT_DIR
        result.repairs += export.finish_hf_checkpoint(result.hf_checkpoint_dir, tokenizer, ex)
        result.validation.update(export.hf_validation(result.hf_checkpoint_dir, q))
    if ex.tensorrt_llm_checkpoint:
        result.checkpoint_dir = root / export.CHECKPOINT_DIR
        result.repairs += export.finish_trtllm_config(result.checkpoint_dir, hf_config, architecture, q)
        report = validate_checkpoint(result.checkpoint_dir)
        raw = report.to_dict() if hasattr(report, "to_dict") else dict(report.__dict__)
        result.validation.update(json.loads(json.dumps(raw, default=str)))
    return result


class _ExpertCounts:
    """calibrate.ExpertTokens over the layers: each layer's routers counted while it calibrates, the
    uncalibrated experts refused as in memory (calibrate.check_experts)."""

    def __init__(self):
        self.counts: dict = {}
        self.moe = None
        self.bad: list[str] = []

    @contextmanager
    def counting(self, layer, i: int, hf_config, quantized: bool):
        from trtconv.stages.calibrate import ExpertTokens, uncalibrated_experts

        root = named_root(layer, i)
        root.config = hf_config
        with ExpertTokens(root) as tokens:
            self.moe = tokens.moe
            yield
        self.counts.update(tokens.counts)
        if quantized:
            self.bad += uncalibrated_experts(root, tokens)

    def without_tokens(self) -> list[str]:
        return [f"{b}.experts.{e}" for b, c in self.counts.items() for e in (c == 0).nonzero().flatten().tolist()]

    def check(self) -> None:
        from trtconv.stages.calibrate import refuse_uncalibrated

        refuse_uncalibrated(self.bad, self.counts)

    def record(self) -> dict | None:
        if self.moe is None:
            return None
        return {"tokens": {b: c.tolist() for b, c in self.counts.items()}, "without_tokens": self.without_tokens(),
                "method_without_tokens": "weight amax from the expert's own weights (data-free), input scale of the layer's experts"}


@dataclass
class LayerJob:
    """What every layer's calibration and export needs (shared by the one-device loop and the split)."""

    cfg: dict | None
    index: object  # WeightIndex
    layer_cls: type
    shell: object
    hf_config: object
    dtype: object
    export_dtype: object
    decoder_type: str
    tp_size: int
    parts: Path
    tmp: Path
    shell_config: tuple = (None, None)  # (config.json, quant_cfg.json) of the shell's export, set by layer 0
    hf: object = None  # streamed_hf.HFLayerWriter when the unified HF checkpoint is exported (one device)
    trtllm: bool = True  # whether the TensorRT-LLM checkpoint is exported


def finish_layer(job: LayerJob, layer, i: int) -> dict:
    """After layer i's calibration: its census, its export (layer 0 also exports the shell) and its part
    files, one per rank; the unified HF checkpoint's layer (job.hf) before them. Returns {"census", "layer_cfg"};
    the caller merges them in layer order."""
    import torch
    from safetensors.torch import save_file

    from trtconv.stages import calibrate

    census = calibrate.quantizer_census(layer)
    if job.hf is not None:  # first, as in memory (export.export_hf); on a copy when the TensorRT-LLM export follows
        with torch.no_grad():
            job.hf.add(layer, i)
    if not job.trtllm:
        return {"census": census, "layer_cfg": {}}
    quant_format = _quant_format(layer) if job.cfg is not None else None
    with torch.no_grad():
        if i == 0:
            outer, cfg0, quant_cfg0 = export_shell(job.shell, layer, job.export_dtype, job.decoder_type, job.tp_size, job.tmp)
            for r, tensors in enumerate(outer):
                save_file(tensors, job.parts / f"rank{r}" / "outer.safetensors")
            del outer
            job.shell_config = (cfg0, quant_cfg0)
        ranks, layer_cfg = export_layer(layer, i, job.hf_config, job.export_dtype, quant_format, job.decoder_type, job.tp_size)
    for r, tensors in enumerate(ranks):
        save_file(tensors, job.parts / f"rank{r}" / f"layer{i:05d}.safetensors")
    return {"census": census, "layer_cfg": layer_cfg}


def merge_ranks(parts: Path, checkpoint: Path, tp_size: int, workers: int = 1) -> None:
    """Each rank's part files into its rank file; with several devices the ranks are merged at once, on
    threads (each file's bytes are what the one-at-a-time merge writes: the same parts in the same order)."""
    from concurrent.futures import ThreadPoolExecutor

    from trtconv.checkpoints.safetensors_stream import merge_parts

    def merge(r: int) -> None:
        merge_parts(sorted((parts / f"rank{r}").glob("*.safetensors")), checkpoint / f"rank{r}.safetensors")

    if workers <= 1 or tp_size == 1:
        for r in range(tp_size):
            merge(r)
        return
    with ThreadPoolExecutor(max_workers=min(workers, tp_size), thread_name_prefix="trtconv-merge") as pool:
        for f in [pool.submit(merge, r) for r in range(tp_size)]:
            f.result()


def _quant_format(layer) -> str | None:
    from modelopt.torch.export.quant_utils import get_quantization_format

    return get_quantization_format(layer)


def _merge_census(total: dict, one: dict, i: int) -> None:
    for kind, n in one["enabled"].items():
        total["enabled"][kind] = total["enabled"].get(kind, 0) + n
    total["enabled"] = dict(sorted(total["enabled"].items()))
    total["invalid_amax"] += [f"model.layers.{i}.{name}" for name in one["invalid_amax"]]
