"""The memory plan: will this recipe fit this GPU, before any work, from config.json alone.

A 70B conversion that fails an hour in for lack of memory wastes the hour; the arithmetic that
predicts it takes a millisecond. This module turns a model's config.json and a recipe into byte
counts per stage (in-memory and layer-streamed), compares them with a GPU from an explicit
catalogue (or the detected GPU, or a `--max-gpu-memory` cap) and says what to change when
something does not fit. `trtconv plan` prints it; `build` refuses a run whose chosen path cannot fit.

`plan` and `build` must never disagree (issue 23: plan said "fits" for fp8 on an A100, a tp_size the
build refuses, a negative hidden_size, a full disk, and differed 20x from build under a CPU cap), so
both size a run with the same functions: conversion_memory (on a CPU the cap or the host's memory, no
CUDA context), plan_for_device, disk_checks over shutil.disk_usage; the per-precision bytes come from
the precisions table. The checks that are not arithmetic (config.json, the recipe against the model,
the device pre-flight) are the load stage's and engine.plan's own functions, which `plan` calls too.

Calibration and evaluation choose their paths separately. Evaluation streams when calibration does,
and on a GPU also when evaluating in memory (the original plus the checkpoint) would need more than
calibrating in memory: the streamed evaluator computes the same numbers, so evaluation need never
be the stage that sets a conversion's peak. On a CPU evaluation follows calibration, as it always has.

Every estimate is parameter arithmetic plus named allowances (the CUDA context, activation
workspaces); docs/performance.md ("Models larger than the GPU") compares them with measured peaks.
KV-cache bytes per token = layers x KV heads x head size x KV dtype bytes x 2 (K and V); for multi-head
latent attention (DeepSeek-V3) layers x (kv_lora_rank + qk_rope_head_dim) x KV dtype bytes (one latent).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trtconv.architectures import row_for_config
from trtconv.core.errors import UserError
from trtconv.precisions import PRECISIONS, linear_bytes, min_sm

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    description: str
    memory_gib: float  # total memory as the driver reports it (nvidia-smi / torch total_memory)
    sm: int


# The GPU catalogue: total memory as nvidia-smi reports it (MiB / 1024), not the marketing GB.
GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("a100-40gb", "NVIDIA A100 40GB", 40.0, 80),
        Gpu("a100-80gb", "NVIDIA A100 80GB", 80.0, 80),
        Gpu("a10g-24gb", "NVIDIA A10G", 22.5, 86),
        Gpu("l4-24gb", "NVIDIA L4", 22.5, 89),
        Gpu("l40s-48gb", "NVIDIA L40S", 45.0, 89),
        Gpu("rtx4090-24gb", "NVIDIA GeForce RTX 4090", 24.0, 89),
        Gpu("h100-80gb", "NVIDIA H100 80GB (SXM/PCIe)", 79.6, 90),
        Gpu("h100-94gb", "NVIDIA H100 NVL", 93.6, 90),
        Gpu("h200-141gb", "NVIDIA H200", 140.4, 90),
        Gpu("b200-180gb", "NVIDIA B200", 179.1, 100),
    )
}

# Allowances (bytes) that parameter arithmetic does not see.
CUDA_CONTEXT = int(0.6 * GIB)  # CUDA context + cuBLAS workspace of a torch process
PROCESS_RSS = int(0.8 * GIB)  # python + torch + transformers + ModelOpt imported (825 MiB measured, H200 host)
ENGINE_RUNTIME = int(1.0 * GIB)  # TensorRT-LLM runtime buffers beyond activations (~0.5-1 GiB)
STREAM_MARGIN = 1.25  # streamed calibration holds a layer plus ModelOpt's temporaries
# AWQ's search allocates per-linear trial copies whose fragmentation varies run to run: on the H200 the
# 70B-shaped int4_awq streamed run peaked at 14.2 GiB once and ran out of a 16 GiB cap (15.6 GiB in use,
# asking 0.44 GiB more) once, at the same settings (docs/performance.md). One more layer covers both.
AWQ_EXTRA_LAYERS = 1.0
# ModelOpt's TensorRT-LLM export holds copies of the embedding/lm_head on the device while it builds a
# rank (measured on the H200, docs/performance.md): two extra copies when exporting the one-layer shell,
# one extra (plus about two layers of temporaries) when exporting the whole model.
SHELL_EXPORT_OUTER_COPIES = 2
MODEL_EXPORT_OUTER_COPIES = 1
# The streamed unified HF export (stages/streamed_hf.py) quantizes the layer in place, module by module (for
# fused experts, every expert of the layer at once): one exported layer beside it at most; with the
# TensorRT-LLM export as well it exports a copy of the layer (export.export_hf's reason), one layer more.
HF_EXPORT_LAYER_COPIES = 1

# Bytes per quantized Linear weight element: the precision's row (trtconv.precisions.linear_bytes).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Exit code of `trtconv plan` when something does not fit (0 = everything fits, 2 = bad input).
EXIT_DOES_NOT_FIT = 4


class MemoryPlanError(UserError):
    """A run that cannot fit the memory it is given; the message says what to change."""

    exit_code = EXIT_DOES_NOT_FIT


# config.json keys the arithmetic (and the build) needs as positive integers; the optional ones only where given.
DIMENSION_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _class_default(cfg: dict, key: str):
    """A key config.json leaves out, as transformers' config class of its model_type fills it (DeepSeek-V3
    without kv_lora_rank still builds one of 512): what the model the build loads will have. Only for keys that
    have no other spelling (an expert count may be under another key: Experts.count_keys)."""
    return cfg[key] if key in cfg else getattr(_config_defaults(cfg.get("model_type")), key, None)


@functools.lru_cache(maxsize=None)
def _config_defaults(model_type):
    """transformers' default config of a model_type (None where it has none), built once per type."""
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type)
    except (ValueError, KeyError, TypeError):
        return None


def _expert_fields(cfg: dict) -> dict:
    """A mixture-of-experts family's expert count and width, under the keys its row names (0: dense), with its
    shared experts' width and its dense first layers where the row names those keys."""
    row = row_for_config(cfg)  # the load stage's rule: the first entry the table has
    moe = row.experts if row is not None else None
    count = next((cfg[k] for k in (moe.count_keys if moe is not None else ()) if cfg.get(k)), None)
    if count is None:
        return {}
    width = int(cfg.get(moe.intermediate_key) or cfg["intermediate_size"])
    shared = int(_class_default(cfg, moe.shared_key) or 0) if moe.shared_key else 0
    dense = int(_class_default(cfg, moe.dense_layers_key) or 0) if moe.dense_layers_key else 0
    return {"experts": int(count), "expert_intermediate": width, "active_experts": int(cfg.get("num_experts_per_tok") or 1),
            "shared_intermediate": shared * width, "dense_layers": min(dense, int(cfg["num_hidden_layers"]))}


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention's widths (DeepSeek-V2/V3 config keys): q through a q_lora_rank latent (or one
    q_proj where it is null), k/v through one kv_lora_rank latent plus a shared rope key of qk_rope_head_dim."""

    q_rank: int  # 0: no q latent (q_proj)
    kv_rank: int
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    v: int  # v_head_dim

    @classmethod
    def from_config(cls, cfg: dict) -> LatentAttention:
        """A key left out takes transformers' default (q_lora_rank too: only an explicit null means no q latent);
        one that is neither given nor defaulted is refused, named."""
        from trtconv.core.errors import ModelError

        widths = {k: _class_default(cfg, k) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        missing = [k for k, v in widths.items() if v is None and k != "q_lora_rank"]
        if missing:
            raise ModelError(f"config.json: {', '.join(missing)} missing; allowed: a positive integer (latent attention's widths)")
        return cls(q_rank=int(widths["q_lora_rank"] or 0), kv_rank=int(widths["kv_lora_rank"]), nope=int(widths["qk_nope_head_dim"]),
                   rope=int(widths["qk_rope_head_dim"]), v=int(widths["v_head_dim"]))

    def linear_params(self, hidden: int, heads: int) -> int:
        q_head = self.nope + self.rope
        q = hidden * self.q_rank + self.q_rank * heads * q_head if self.q_rank else hidden * heads * q_head
        kv = hidden * (self.kv_rank + self.rope) + self.kv_rank * heads * (self.nope + self.v)
        return q + kv + heads * self.v * hidden

    def norm_params(self) -> int:
        return self.q_rank + self.kv_rank  # q_a_layernorm, kv_a_layernorm

    def cache_width(self) -> int:
        """Values cached a token and layer: the latent and the rope key (one vector, not a K and a V)."""
        return self.kv_rank + self.rope


def _attention_fields(cfg: dict) -> dict:
    """Latent attention's widths, and whether the family converts a quantized KV cache (the advice offers fp8 KV)."""
    row = row_for_config(cfg)  # the load stage's rule: the first entry the table has
    if row is None:
        return {}
    return {"latent": LatentAttention.from_config(cfg) if row.latent_attention else None,
            "kv_quant": row.no_kv_cache_quant is None}


def check_dimensions(cfg: dict, source) -> None:
    """Refuse (ModelError, naming each key and value) a config.json whose dimensions no model can have
    (trtconv.checkpoints.hf_checks: a negative hidden_size made "-46.39 B parameters ... fits", issue 23)
    or that lacks one the plan's arithmetic needs. The load stage, plan and doctor run it."""
    from trtconv.checkpoints.hf_checks import check_config
    from trtconv.core.errors import ModelError

    check_config(cfg, source)
    missing = [k for k in DIMENSION_KEYS if cfg.get(k) is None]
    if missing:
        raise ModelError(f"{source}: {', '.join(missing)} missing; allowed: a positive integer (the model's dimensions)")


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs from config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    max_positions: int
    # Mixture of experts (trtconv.architectures.Experts names the config keys): every layer holds experts but the
    # dense first ones (DeepSeek-V3's first_k_dense_replace); a Qwen3-MoE with mlp_only_layers is over-counted a little.
    experts: int = 0  # 0: a dense model
    expert_intermediate: int = 0
    active_experts: int = 0  # experts per token (num_experts_per_tok)
    shared_intermediate: int = 0  # the shared experts' width together (DeepSeek-V3), beside each MoE layer's routed ones
    dense_layers: int = 0  # of a MoE family: the first layers with a dense MLP, intermediate wide
    latent: LatentAttention | None = None  # multi-head latent attention (trtconv.architectures: latent_attention)
    kv_quant: bool = True  # the family converts a quantized KV cache (trtconv.architectures: no_kv_cache_quant)

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> Shape:
        check_dimensions(cfg, source)
        heads = cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias")),
            max_positions=cfg.get("max_position_embeddings") or 4096, **_expert_fields(cfg), **_attention_fields(cfg),
        )

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    def attention_linear_params(self) -> int:
        if self.latent is not None:
            return self.latent.linear_params(self.hidden, self.heads)
        h, d = self.hidden, self.head_dim
        return h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h

    def _dense_layer_linear_params(self) -> int:
        return self.attention_linear_params() + 3 * self.hidden * self.intermediate

    def layer_linear_params(self) -> int:
        """The largest decoder layer's linears (what a layer-by-layer pass holds): a MoE layer's where there are any."""
        if not self.moe_layers:
            return self._dense_layer_linear_params()
        return self.attention_linear_params() + 3 * self.hidden * (self.experts * self.expert_intermediate + self.shared_intermediate)

    def linear_params(self) -> int:
        """Every decoder layer's linears: the MoE layers' and the dense ones'."""
        dense = self.layers - self.moe_layers
        return self.moe_layers * self.layer_linear_params() + dense * self._dense_layer_linear_params()

    def _router_params(self) -> int:
        return self.experts * self.hidden  # unquantized (ModelOpt excludes it); DeepSeek's bias buffer (E values) not counted

    def _norm_bias_params(self) -> int:
        latent = self.latent.norm_params() if self.latent is not None else 0
        return 2 * self.hidden + ((self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0) + latent

    def layer_other_params(self) -> int:
        """The largest decoder layer's norms, biases and router."""
        return self._norm_bias_params() + (self._router_params() if self.moe_layers else 0)

    def other_params(self) -> int:
        """Every decoder layer's norms, biases and routers (the dense layers of a MoE family have no router)."""
        return self.layers * self._norm_bias_params() + self.moe_layers * self._router_params()

    def mlp_width(self) -> int:
        """The MLP intermediate one token goes through: the dense width, or its experts' together (the wider)."""
        moe = self.active_experts * self.expert_intermediate + self.shared_intermediate
        if not self.experts:
            return self.intermediate
        return max(moe, self.intermediate) if self.dense_layers else moe

    def layer_params(self) -> int:
        return self.layer_linear_params() + self.layer_other_params()

    def outer_params(self) -> int:
        """Embeddings, final norm and (untied) lm_head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params() + self.outer_params()

    def kv_bytes_per_token(self, kv_dtype_bytes: int) -> int:
        if self.latent is not None:
            return self.layers * self.latent.cache_width() * kv_dtype_bytes
        return self.layers * self.kv_heads * self.head_dim * kv_dtype_bytes * 2


@dataclass
class Check:
    stage: str  # e.g. "calibrate (in memory)"
    where: str  # "gpu" | "host" | "disk"
    need_bytes: int
    have_bytes: int | None  # None: not checked (host/disk of another machine)
    note: str = ""
    unit: str = "bytes"  # what need/have count: "bytes", "gpus" (serve (GPUs)) or "sm" (serve (GPU SM), e.g. 89)

    @property
    def fits(self) -> bool:
        return self.have_bytes is None or self.need_bytes <= self.have_bytes

    def to_dict(self) -> dict:
        gib = self.unit == "bytes"
        return {**asdict(self), "need_gib": round(self.need_bytes / GIB, 2) if gib else None,
                "have_gib": None if self.have_bytes is None or not gib else round(self.have_bytes / GIB, 2), "fits": self.fits}

    def amounts(self) -> tuple[str, str]:
        """need and have in words: GiB with enough digits to tell a near miss from a fit, a GPU count, an SM."""
        if self.unit == "sm":
            return sm_text(self.need_bytes), "-" if self.have_bytes is None else sm_text(self.have_bytes)
        if self.unit == "gpus":
            return str(self.need_bytes), "-" if self.have_bytes is None else str(self.have_bytes)
        if self.have_bytes is None:
            return f"{self.need_bytes / GIB:.1f} GiB", "-"
        return size_pair(self.need_bytes, self.have_bytes)


def sm_text(sm: int) -> str:
    return f"SM {sm // 10}.{sm % 10}"


def size_pair(need: int, have: int) -> tuple[str, str]:
    """Two byte counts in GiB, with as many decimals as it takes (up to 6) for unequal counts to read
    unequal: "0.03 GiB is less than 0.03 GiB" was a refusal's message (issue 23)."""
    for digits in range(1 if min(need, have) >= GIB else 2, 7):
        a, b = f"{need / GIB:.{digits}f} GiB", f"{have / GIB:.{digits}f} GiB"
        if a != b or need == have:
            return a, b
    return f"{need} bytes", f"{have} bytes"


@dataclass
class MemoryPlan:
    gpu: str
    gpu_memory_bytes: int
    gpus: int
    params: int
    layer_bytes: int  # one decoder layer at the load dtype
    load_bytes: int  # the whole model at the load dtype
    export_bytes: int  # the exported checkpoint (all ranks)
    kv_bytes_per_token: int
    streaming: str  # "never" | "always" | "auto": what the recipe asks
    streamed: bool  # what the build will do: calibration (and export) layer by layer
    evaluate_streamed: bool = False  # evaluation layer by layer (see _choose_paths)
    evaluate_parks: bool = False  # streamed on a GPU: vocabulary matrices wait on the host during the layer loop
    max_seq_len: int = 0  # the serving limit the KV cache is sized for
    concurrent_full_sequences: int | None = None  # full-length sequences whose KV cache fits next to the weights
    checks: list[Check] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    on_gpu: bool = True  # the stages compute on a CUDA device (False: a CPU run, sized like build sizes it)
    serve_gpu: str = ""  # the GPU the serving rows are for (a catalogue entry; on a CPU plan not the conversion's device)
    # What build's pre-flight refuses on this device (engine.plan.preflight_warnings), and its warnings.
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    devices: int = 1  # devices the conversion is split over (build --gpus; trtconv.stages.devices)
    time_s: dict = field(default_factory=dict)  # predicted seconds of the layer-streamed path (predict_time)

    @property
    def fits(self) -> bool:
        return not self.refusals and all(c.fits for c in self.checks if c.stage in self.relevant_stages())

    def relevant_stages(self) -> set[str]:
        """The checks of the paths that will run (the other path's checks are shown, not applied)."""
        other = {f"{stage} ({'in memory' if streamed else 'streamed'})"
                 for stage, streamed in (("calibrate", self.streamed), ("evaluate", self.evaluate_streamed))}
        return {c.stage for c in self.checks if c.stage not in other}

    @property
    def evaluation_path(self) -> str:
        if not any(c.stage.startswith("evaluate") for c in self.checks):
            return "off"
        return "streamed" if self.evaluate_streamed else "in memory"

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "checks"}
        d["evaluation_path"] = self.evaluation_path
        d["checks"] = [c.to_dict() | {"applies": c.stage in self.relevant_stages()} for c in self.checks]
        d["fits"] = self.fits
        return d


def resolve_gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise UserError(f"--gpu {name!r} is not in the GPU catalogue; allowed: {', '.join(GPUS)}")
    return GPUS[name]


def _export_bytes(shape: Shape, precision: str, export_dtype_bytes: int) -> int:
    per = linear_bytes(precision, export_dtype_bytes)
    linear = shape.linear_params() * per
    other = (shape.other_params() + shape.outer_params()) * export_dtype_bytes
    return int(linear + other)


def _activation_bytes(shape: Shape, tokens: int, dtype_bytes: int) -> int:
    """One decoder layer's forward temporaries for `tokens` tokens (MLP dominates: gate, up, product)."""
    return tokens * (4 * shape.hidden + 3 * shape.mlp_width()) * dtype_bytes


@dataclass(frozen=True)
class Disk:
    """Free bytes where the artifact (-o) and the stage cache are written, and whether they share a
    filesystem: there the cache's entry is hard-linked (or reflinked) into the artifact, one copy of the
    bytes; across filesystems it is a second copy (trtconv.cache.store)."""

    out: str
    out_free: int
    cache: str
    cache_free: int
    same_filesystem: bool


def disk_here(out, cache) -> Disk:
    """shutil.disk_usage of the nearest existing folder of each location (they are created later)."""
    import shutil

    def nearest(path) -> Path:
        p = Path(path).expanduser().absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        return p

    o, c = nearest(Path(out).expanduser().absolute().parent), nearest(cache)
    return Disk(str(o), shutil.disk_usage(o).free, str(c), shutil.disk_usage(c).free, o.stat().st_dev == c.stat().st_dev)


def disk_checks(export_bytes: int, parts: bool, disk: Disk | None) -> list[Check]:
    """The export's disk rows: artifact (+ the streamed path's layer part files) and the stage cache's copy."""
    artifact = export_bytes * (2 if parts else 1)
    if disk is None:  # another machine: shown, not checked
        return [Check("export", "disk", artifact + export_bytes, None, "artifact + stage cache (+ layer parts)")]
    if disk.same_filesystem:
        return [Check("export", "disk", artifact, disk.out_free,
                      f"artifact (+ layer parts), the stage cache links the same files; free at {disk.out}")]
    return [Check("export (artifact)", "disk", artifact, disk.out_free, f"artifact (+ layer parts); free at {disk.out}"),
            Check("export (stage cache)", "disk", export_bytes, disk.cache_free, f"a copy (another filesystem); free at {disk.cache}")]


def _sm_check(plan: MemoryPlan, recipe, serve: Gpu) -> None:
    """Serving needs the precision's tensor cores (trtconv.precisions.min_sm): fp8 on an A100 (SM 8.0) cannot run."""
    q = recipe.quantization
    needs = [sm for sm in (min_sm(p, q.kv_cache) for p in q.precisions_used) if sm is not None]  # auto: every candidate
    need = max(needs) if needs else None
    if need is None:
        return
    what = q.precision if not q.is_auto else f"auto's candidate {max(q.precisions_used, key=lambda p: min_sm(p, q.kv_cache) or 0)}"
    plan.checks.append(Check("serve (GPU SM)", "gpu", need, serve.sm, f"{what} (KV cache {q.kv_cache}) tensor cores", "sm"))
    if serve.sm < need:
        runs = [p.name for p in PRECISIONS.values() if (p.min_sm or 0) <= serve.sm]
        gpus = [g.name for g in GPUS.values() if g.sm >= need]
        plan.advice.append(f"serving: quantization.precision {q.precision} with kv_cache {q.kv_cache} needs {sm_text(need)} or "
                           f"newer; {serve.name} is {sm_text(serve.sm)}: serve on {', '.join(gpus)}, or pick a precision "
                           f"it runs: {', '.join(runs)} (kv_cache none)")


def plan_memory(recipe, hf_cfg: dict, gpu_memory_bytes: int, gpu_name: str, gpus: int = 1,
                host_bytes: int | None = None, disk: Disk | None = None, context_bytes: int = CUDA_CONTEXT,
                on_gpu: bool = True, serve: Gpu | None = None, split: int = 1) -> MemoryPlan:
    """Every stage's peak GPU/host memory and disk, both paths of calibration and of evaluation, and
    the serving memory. `context_bytes`: the CUDA context allowance (0 when the "GPU" is a cap on a
    CPU run); `on_gpu`: whether the stages compute on a CUDA device (False: a CPU run); `serve`: the
    GPU serving is planned for (its memory and SM; None: the conversion's memory, SM not checked);
    `disk`: free space where the artifact and the stage cache go (None: not checked); `split`: the
    devices the conversion is split over (each GPU's row is per GPU; the split path is the streamed one)."""
    shape = Shape.from_config(hf_cfg)
    q, ex = recipe.quantization, recipe.export
    load_b = DTYPE_BYTES[recipe.model.dtype]
    streaming = getattr(recipe.calibration, "streaming", "never")
    plan = MemoryPlan(gpu=gpu_name, gpu_memory_bytes=gpu_memory_bytes, gpus=gpus, params=shape.params(),
                      layer_bytes=shape.layer_params() * load_b, load_bytes=shape.params() * load_b,
                      export_bytes=_export_bytes(shape, q.plan_precision, DTYPE_BYTES[ex.dtype]),
                      kv_bytes_per_token=shape.kv_bytes_per_token(1 if q.kv_cache == "fp8" else DTYPE_BYTES[ex.dtype]),
                      streaming=streaming, streamed=streaming == "always", serve_gpu=serve.name if serve else gpu_name,
                      on_gpu=on_gpu, devices=split)
    _calibration_checks(plan, shape, recipe, context_bytes, host_bytes)
    if recipe.evaluate.enabled:
        _evaluation_checks(plan, shape, recipe, context_bytes, on_gpu)
    if split > 1:
        _split_checks(plan, shape, recipe, on_gpu)
    plan.checks += disk_checks(plan.export_bytes, streaming != "never", disk)
    _serving_checks(plan, shape, recipe, int(serve.memory_gib * GIB) if serve else gpu_memory_bytes, gpus)
    if serve is not None:
        _sm_check(plan, recipe, serve)
    _choose_paths(plan, recipe, on_gpu)
    if plan.streamed:
        plan.refusals += [r + _auto_fit(plan, recipe) for r in streamed_refusals(recipe, split)]
    _advise(plan, shape, recipe)
    if plan.streamed:
        plan.time_s = predict_time(shape, recipe, plan.export_bytes, split)
    return plan


def streamed_refusals(recipe, split: int = 1) -> list[str]:
    """What the layer-streamed path cannot do for this recipe (stages.streamed.check_supported): the one
    check `plan` shows as a refusal and `build` and `doctor` refuse (plan_for_build), whenever the plan streams."""
    from trtconv.stages.streamed import check_supported

    if recipe.quantization.is_auto:
        if split > 1:
            return [f"--gpus {split}: quantization.precision auto searches on one device, in memory; use --gpus 1"]
        return ["quantization.precision auto calibrates one model copy per candidate in memory (the original + a copy "
                "per candidate that rewrites its weights, AWQ and SmoothQuant, must fit the GPU; fp8 and 16-bit share the "
                "original's); the layer-streamed path (calibration.streaming, or a model larger than "
                "that) does not search: raise --max-gpu-memory, name fewer quantization.search.candidates, set "
                "calibration.streaming: never, or pick one precision"]
    try:
        check_supported(recipe, split)
    except UserError as exc:
        return [str(exc)]
    return []


def own_copies(q) -> list[str]:
    """precision auto's candidates that need their own copy of the weights (precisions.Precision.rewrites_weights)."""
    from trtconv.stages.search import candidates_of

    return [p for p in candidates_of(q) if PRECISIONS[p].rewrites_weights]


def _shared_text(q) -> str:
    from trtconv.stages.search import candidates_of

    shared = [p for p in candidates_of(q) if not PRECISIONS[p].rewrites_weights]
    return f"{', '.join(shared)} share the original's weights" if shared else "each rewrites its weights"


def _auto_fit(plan, recipe) -> str:
    """For precision auto refused for its copies: how many candidates this memory holds, and a list that fits
    (the cheapest, the most accurate quantized one, 16-bit: the ends of the search and its gates' format)."""
    q = recipe.quantization
    check = next((c for c in plan.checks if c.stage == "calibrate (in memory)" and c.where == "gpu"), None)
    if not q.is_auto or check is None or check.have_bytes is None or not plan.load_bytes:
        return ""
    from trtconv.stages.search import candidates_of

    names, own = candidates_of(q), own_copies(q)
    fixed = check.need_bytes - (1 + len(own)) * plan.load_bytes  # context and the batch / export copies
    fit = int((check.have_bytes - fixed) // plan.load_bytes) - 1  # own copies beside the original
    if fit >= len(own):
        return ""
    if fit < 0:
        return f" (the original alone, {size_text(plan.load_bytes)}, does not fit beside the batch in {size_text(check.have_bytes)})"
    priority = list(dict.fromkeys([p for p in (names[0], q.gate_precision) if p in own] + own))  # the cheapest, the gates' format
    keep = [p for p in names if p not in own or p in priority[:fit]]
    if len(keep) < 2:
        return f" ({len(names)} candidates need {size_text(check.need_bytes)}; not even two fit {size_text(check.have_bytes)})"
    return (f" ({len(own)} of the {len(names)} candidates rewrite their weights ({', '.join(own)}) and need a copy each: the "
            f"original + {len(own)} copies, {size_text(check.need_bytes)} of {size_text(check.have_bytes)}; {fit} fit, "
            f"e.g. quantization.search.candidates: [{', '.join(keep)}])")


def evaluation_streams_alone(recipe) -> bool:
    """Whether evaluation streams while calibration runs in memory (on a GPU): wherever it can, that is from
    transformers' own classes (not a model's remote code), for either checkpoint. For the unified HF checkpoint
    this replaced judging the two models one after the other (stages/evaluate.sequential_here, now the path for
    remote code): on a Qwen3-8B-shaped fp8 model on an H100 (run G2) that took 20.3 s at 17.0 GiB, above bare
    ModelOpt's whole conversion (15.6 GiB), most of it moving the original's logits (7.5 GB in bf16) to the host."""
    return not recipe.model.trust_remote_code


def _choose_paths(plan: MemoryPlan, recipe, on_gpu: bool) -> None:
    """calibration.streaming auto: stream calibration when an in-memory stage does not fit (on a GPU,
    where evaluation can stream on its own, calibration's own check decides), or when the host cannot
    hold the in-memory export's rank (checked where the host is known: a build's own machine). Evaluation streams with
    calibration, and on a GPU always (where it can): in memory it holds the original and the
    checkpoint together, more than calibration ever holds. Measured on an 8B model on an H200
    (docs/performance.md): streamed 16.7 s at 6.3 GiB, in memory 14.3 s at 27.9 GiB (an earlier run);
    the unified HF checkpoint judged one model after the other, 20.3 s at 17.0 GiB (run G2, H100)."""
    alone = on_gpu and evaluation_streams_alone(recipe)
    in_memory = {c.stage: c for c in plan.checks if c.where == "gpu" and "(in memory)" in c.stage}
    if plan.streaming == "auto":
        gpu_fits = all(c.fits for stage, c in in_memory.items() if not (alone and stage.startswith("evaluate")))
        # Only the layer-streamed path is split over several devices (trtconv.stages.devices).
        plan.streamed = plan.devices > 1 or not (gpu_fits and host_fits(plan, "calibrate (in memory)"))
    plan.evaluate_streamed = plan.streamed or (alone and "evaluate (in memory)" in in_memory)


def host_fits(plan: MemoryPlan, stage: str) -> bool:
    """Whether `stage`'s host-memory check fits (True where the host was not checked: another machine's plan)."""
    return all(c.fits for c in plan.checks if c.stage == stage and c.where == "host")


def _calibration_checks(plan: MemoryPlan, shape: Shape, recipe, context_bytes: int, host_bytes: int | None) -> None:
    q, cal, ex = recipe.quantization, recipe.calibration, recipe.export
    load_b = DTYPE_BYTES[recipe.model.dtype]
    gpu, layer_bytes, outer_bytes = plan.gpu_memory_bytes, plan.layer_bytes, shape.outer_params() * load_b
    batch_tokens = cal.batch_size * cal.seq_len
    # Cached hidden states: the layer's inputs and outputs, twice more for AWQ with an FP8 KV cache
    # (its search pass sees quantized-attention outputs, a second stream).
    streams = 2 if (q.kv_cache != "none" and any("awq" in p for p in q.precisions_used)) else 1
    act_cache = cal.num_samples * cal.seq_len * shape.hidden * load_b * 2 * streams
    fwd_layer = _activation_bytes(shape, batch_tokens, load_b)
    fwd = fwd_layer + batch_tokens * shape.vocab * load_b
    add = plan.checks.append
    # In memory: the whole model on the GPU (one batch, then ModelOpt's export copies); loaded via the host.
    export_extra = MODEL_EXPORT_OUTER_COPIES * outer_bytes + 2 * layer_bytes
    # precision auto calibrates a copy of the model per candidate beside the original; those whose calibration
    # leaves the weights alone share the original's (stages/search.py, SharedWeights).
    copies = 1 + len(own_copies(q)) if q.is_auto else 1
    add(Check("calibrate (in memory)", "gpu", context_bytes + copies * plan.load_bytes + max(fwd, export_extra), gpu,
              "whole model + one batch or the export's copies" if not q.is_auto else
              f"the original + {copies - 1} candidate copies (precision auto; {_shared_text(q)}) + one batch or the export's copies"))
    # Host: ModelOpt's export holds a whole rank in host memory (pack_linear_weights moves every packed
    # weight there; measured 9.6 GiB anonymous for the 8B fp8 rank on the H200). The load reads the
    # memory-mapped checkpoint straight to the GPU: page cache, which the kernel can reclaim.
    add(Check("calibrate (in memory)", "host", PROCESS_RSS + plan.export_bytes // (ex.tp_size * ex.pp_size),
              host_bytes, "a rank's export, held in host memory by ModelOpt"))
    # Streamed: embeddings/lm_head (and the shell export's copies of them), one layer with ModelOpt's
    # temporaries, the activation cache and one batch's forward.
    margin = STREAM_MARGIN + (AWQ_EXTRA_LAYERS if any("awq" in p for p in q.precisions_used) else 0.0)
    hf_export = (shape.layer_linear_params() * linear_bytes(q.plan_precision, DTYPE_BYTES[ex.dtype]) * HF_EXPORT_LAYER_COPIES
                 + (layer_bytes if ex.tensorrt_llm_checkpoint else 0)) if ex.hf_checkpoint else 0
    outer_copies = SHELL_EXPORT_OUTER_COPIES if ex.tensorrt_llm_checkpoint else 0  # the HF export copies no outer tensor
    stream_gpu = (context_bytes + (1 + outer_copies) * outer_bytes + int(layer_bytes * margin) + int(hf_export)
                  + act_cache + fwd_layer)
    add(Check("calibrate (streamed)", "gpu", stream_gpu, gpu, "embeddings/lm_head (+ export copies) + one layer + cache"))
    add(Check("calibrate (streamed)", "host", PROCESS_RSS + outer_bytes + 3 * layer_bytes, host_bytes,
              "the shell's export, a layer read/quantized/exported"))


def _evaluation_checks(plan: MemoryPlan, shape: Shape, recipe, context_bytes: int, on_gpu: bool) -> None:
    """What each evaluation path holds (stages/evaluate.py, stages/evaluate_streamed.py).

    The original is in `baseline_dtype`: the load dtype on a GPU, float32 on a CPU. The checkpoint is
    what trtconv's reference executor holds: on a GPU linear weights as stored (each dequantized to
    float32 when used) and the rest in float32; on a CPU everything in float32. In memory both are
    whole; streamed, two layers of each (the one computing and the next, being read) and every
    document's hidden states of both, with both models' embeddings/lm_head (on a GPU they wait on
    the host during the layer loop: then two layers, or the two lm_heads, whichever is larger).
    """
    ev, ex = recipe.evaluate, recipe.export
    base_b = DTYPE_BYTES[recipe.model.dtype] if on_gpu else 4
    linear_b = linear_bytes(recipe.quantization.plan_precision, DTYPE_BYTES[ex.dtype]) if on_gpu else 4
    cand_layer = int(shape.layer_linear_params() * linear_b) + shape.layer_other_params() * 4
    dequantized = 2 * shape.hidden * shape.intermediate * 4 if on_gpu else 0  # the widest linear, dequantized and cast
    tokens = ev.batch_size * ev.seq_len
    per_batch = 2 * tokens * shape.vocab * 4 + _activation_bytes(shape, tokens, 4)  # both models' logits + a layer's temporaries
    fixed = context_bytes + dequantized + per_batch
    gpu, outer = plan.gpu_memory_bytes, shape.outer_params()
    whole = shape.params() * base_b + int(shape.linear_params() * linear_b) + shape.other_params() * 4 + outer * 4
    plan.checks.append(Check("evaluate (in memory)", "gpu", fixed + whole, gpu,
                             f"original ({'load dtype' if on_gpu else 'float32'}) + checkpoint as the executor holds it"))
    hidden = ev.num_samples * ev.seq_len * shape.hidden * (base_b + 4)
    layers = 2 * (shape.layer_params() * base_b + cand_layer)
    # After the layers, the unified HF checkpoint's untied lm_head has a weight error: the original's head, moved
    # as stored, and the candidate's float32 copy beside both heads (the comparison runs in row blocks,
    # trtllm_reader._rel_error). Uncounted, an 8B run under a 10 GiB cap that this plan passed ran out of memory
    # there (run G3, H100). The TensorRT-LLM checkpoint's reader computes no head error, nor does a tied head.
    from trtconv.artifact.layout import HF_CHECKPOINT_DIR
    from trtconv.stages.evaluate import candidate_dir

    judged_hf = candidate_dir(recipe, Path(".")).name == HF_CHECKPOINT_DIR
    head_error = shape.vocab * shape.hidden * (base_b + 4) if judged_hf and not shape.tied else 0
    resident = fixed + outer * (base_b + 4) + layers + hidden + head_error
    if on_gpu and gpu is not None and resident > gpu:
        # Parked: one model's vocabulary matrices at a time, none during the layer loop, then both lm_heads.
        # Moving them costs seconds (8B: about 3 s on the H200), so only where they would not fit.
        # Phases: the layer loop (two layers of each, a dequantized linear, a batch's temporaries); the tail (both
        # lm_heads, with a batch's logits of both or the head's weight error); the start (the checkpoint's
        # vocabulary matrices, float32, while its first states are made).
        plan.evaluate_parks = True
        heads = shape.vocab * shape.hidden * (base_b + 4)
        loop = dequantized + per_batch + layers
        tail = heads + max(per_batch, head_error)
        candidate_outer = outer * 4
        plan.checks.append(Check("evaluate (streamed)", "gpu", context_bytes + hidden + max(loop, tail, candidate_outer), gpu,
                                 "two layers of each, or one model's vocabulary matrices (the others parked) + hidden states"))
    else:
        plan.checks.append(Check("evaluate (streamed)", "gpu", resident, gpu,
                                 "two layers of each + embeddings/lm_head + hidden states"))


def _split_checks(plan: MemoryPlan, shape: Shape, recipe, on_gpu: bool) -> None:
    """Per GPU of a split run (trtconv.stages.devices), replacing the streamed rows. The first device
    holds what one device holds (the shell, its layer, the activations handed in and out); the split
    adds, for AWQ, its second pass's outputs (kept for the next layer even where they equal the
    first's) and, in evaluation, the first hidden states (kept while the last device's come back)."""
    q, cal, ev = recipe.quantization, recipe.calibration, recipe.evaluate
    by = {c.stage: c for c in plan.checks if c.where == "gpu"}
    load_b = DTYPE_BYTES[recipe.model.dtype]
    extra = cal.num_samples * cal.seq_len * shape.hidden * load_b if "awq" in q.precision and q.kv_cache == "none" else 0
    for stage, add, note in (
            ("calibrate (streamed)", extra, "per GPU: the first holds the shell"),
            ("evaluate (streamed)", ev.num_samples * ev.seq_len * shape.hidden * ((DTYPE_BYTES[recipe.model.dtype] if on_gpu else 4) + 4),
             "per GPU: the first holds the vocabulary matrices and the first hidden states")):
        c = by.get(stage)
        if c is not None:
            c.need_bytes += add
            c.note = f"{c.note}; {note} ({plan.devices} devices)"


# Rates of the layer-streamed path, measured on one H200 with the Llama-3-70B shapes cut to 8 layers
# (docs/performance.md, "Models larger than the GPU"; one decoder layer 1.59 GiB in bf16, 64 x 256
# calibration rows): seconds per GiB of a bf16 layer, and of the exported checkpoint for the merge.
TIME_FIXED_CALIBRATE_S = 23.0  # the shell, layer 0's inputs, first-use costs
TIME_LAYER_S_PER_GIB = {"max": 1.65 / 1.59, "awq": 3.2 / 1.59}  # calibrate + export a layer
TIME_MERGE_S_PER_GIB = 20.4 / 9.2  # part files into rank files (disk-bound)
TIME_FIXED_EVALUATE_S = 9.4  # both models' vocabulary matrices and first hidden states
TIME_EVAL_LAYER_S_PER_GIB = 1.3 / 1.59


def predict_time(shape: Shape, recipe, export_bytes: int, devices: int = 1) -> dict:
    """Seconds of calibrate + export + evaluate, layer-streamed, on one device and on `devices`.

    Split (trtconv.stages.devices): the layers run as a pipeline, so the layer time divides by N,
    except what one device at a time does (AWQ's calibration: its excess over max calibration's
    per-layer time), plus filling the pipeline (N-1 layers' share of one batch); the rank files merge
    in parallel (min(N, tp) at once). Assumes the devices share no bottleneck (reading the memory-
    mapped checkpoint, the disk the parts go to): not measured, multi-GPU hosts were withheld."""
    cal, ev = recipe.calibration, recipe.evaluate
    layer_gib = shape.layer_params() * DTYPE_BYTES[recipe.model.dtype] / GIB
    awq = "awq" in recipe.quantization.precision
    t = layer_gib * TIME_LAYER_S_PER_GIB["awq" if awq else "max"]
    serial = layer_gib * (TIME_LAYER_S_PER_GIB["awq"] - TIME_LAYER_S_PER_GIB["max"]) if awq else 0.0
    batches = max(1, -(-cal.num_samples // cal.batch_size))
    merge = export_bytes / GIB * TIME_MERGE_S_PER_GIB
    t_eval = layer_gib * TIME_EVAL_LAYER_S_PER_GIB
    eval_batches = max(1, -(-ev.num_samples // ev.batch_size))

    def total(n: int) -> dict:
        fill = (n - 1) * t / batches
        calib = TIME_FIXED_CALIBRATE_S + shape.layers * max(serial, t / n) + fill + merge / min(n, recipe.export.tp_size)
        evaluate = (TIME_FIXED_EVALUATE_S + shape.layers * t_eval / n + (n - 1) * t_eval / eval_batches) if ev.enabled else 0.0
        return {"calibrate_export_s": round(calib, 1), "evaluate_s": round(evaluate, 1), "total_s": round(calib + evaluate, 1)}

    one = total(1)
    out = {"devices": 1, **one, "basis": "rates measured on one H200 (docs/performance.md), scaled by the layer's bytes"}
    if devices > 1:
        split = total(devices)
        out["split"] = {"devices": devices, **split, "speedup": round(one["total_s"] / split["total_s"], 2)}
    return out


def _serving_checks(plan: MemoryPlan, shape: Shape, recipe, gpu: int, gpus: int) -> None:
    ex, eng = recipe.export, recipe.engine
    ranks = ex.tp_size * ex.pp_size
    opts = eng.pytorch if eng.target == "pytorch" else eng.tensorrt
    max_seq = opts.max_seq_len or shape.max_positions
    kv_seq = plan.kv_bytes_per_token * max_seq // ranks
    workspace = _activation_bytes(shape, opts.max_num_tokens, 2) // ex.tp_size + opts.max_batch_size * shape.vocab * 4
    weights = plan.export_bytes // ranks
    need = CUDA_CONTEXT + ENGINE_RUNTIME + weights + workspace + kv_seq
    paged = eng.target == "pytorch" or eng.tensorrt.kv_cache_type == "paged"
    note = "weights + runtime + KV of one max_seq_len sequence (paged)"
    if not paged:  # a continuous KV cache is allocated for every sequence up front
        need += kv_seq * (opts.max_batch_size - 1)
        note = "weights + runtime + KV of max_batch_size sequences (continuous)"
    plan.checks.append(Check("serve (per GPU)", "gpu", need, gpu, note))
    if ranks > gpus:
        plan.checks.append(Check("serve (GPUs)", "gpu", ranks, gpus, f"tp_size x pp_size = {ranks} GPUs, {gpus} given", "gpus"))
    free = gpu - (need - kv_seq)
    plan.concurrent_full_sequences = max(0, free // kv_seq) if kv_seq else None
    plan.max_seq_len = max_seq


def _min_tp(plan: MemoryPlan, shape: Shape, recipe, gpu: int) -> int | None:
    """The smallest tensor-parallel size (a divisor of the KV heads) whose per-GPU serving memory fits."""
    for tp in (t for t in (1, 2, 4, 8, 16) if shape.kv_heads % t == 0):
        trial = recipe.model_copy(update={"export": recipe.export.model_copy(update={"tp_size": tp, "pp_size": 1})})
        probe = replace(plan, checks=[], advice=[])
        _serving_checks(probe, shape, trial, gpu, tp)
        if all(c.fits for c in probe.checks):
            return tp
    return None


def _advise(plan: MemoryPlan, shape: Shape, recipe) -> None:
    gpu_gib = plan.gpu_memory_bytes / GIB
    by = {(c.stage, c.where): c for c in plan.checks}
    in_mem = by[("calibrate (in memory)", "gpu")]
    streamed = by[("calibrate (streamed)", "gpu")]
    if not in_mem.fits:
        if streamed.fits and plan.streaming == "never":
            plan.advice.append(f"calibration: the model ({plan.load_bytes / GIB:.1f} GiB) does not fit {gpu_gib:.1f} GiB; "
                               "set calibration.streaming: auto (or always) to calibrate one layer at a time")
        elif not streamed.fits:
            plan.advice.append(f"calibration: even one layer + the activation cache ({streamed.need_bytes / GIB:.1f} GiB) "
                               f"does not fit {gpu_gib:.1f} GiB; lower calibration.num_samples or seq_len, or use a larger GPU")
    ev = by.get(("evaluate (in memory)", "gpu"))
    if ev is not None and not ev.fits and not plan.evaluate_streamed:
        plan.advice.append("evaluation: the original and the checkpoint do not fit together; set calibration.streaming: auto "
                           "to evaluate layer by layer")
    ev_streamed = by.get(("evaluate (streamed)", "gpu"))
    if ev_streamed is not None and not ev_streamed.fits:
        plan.advice.append(f"evaluation: even layer by layer it needs {ev_streamed.need_bytes / GIB:.1f} GiB (two layers of each "
                           "model, both models' embeddings/lm_head, every document's hidden states); lower evaluate.num_samples "
                           "or seq_len, or set evaluate.enabled: false here and run `trtconv check` on a larger GPU")
    serve = by[("serve (per GPU)", "gpu")]
    if not serve.fits:
        tp = _min_tp(plan, shape, recipe, plan.gpu_memory_bytes)
        if tp is not None and tp > recipe.export.tp_size:
            plan.advice.append(f"serving: {serve.need_bytes / GIB:.1f} GiB per GPU; set export.tp_size: {tp} "
                               f"(needs {tp} GPUs of {gpu_gib:.1f} GiB)")
        elif tp is None:
            plan.advice.append(f"serving: does not fit {gpu_gib:.1f} GiB GPUs at any tp size up to 16; use a smaller precision")
        if recipe.quantization.kv_cache == "none" and shape.kv_quant:
            plan.advice.append("serving: quantization.kv_cache: fp8 halves the KV cache")
        if recipe.quantization.precision in ("none",):
            plan.advice.append("serving: quantization.precision: fp8 halves the weights")
    conc = plan.concurrent_full_sequences
    eng = recipe.engine
    if serve.fits and conc is not None and eng.target != "none":
        opts = eng.pytorch if eng.target == "pytorch" else eng.tensorrt
        if conc < opts.max_batch_size:
            plan.advice.append(f"serving: only {conc} sequences of {plan.max_seq_len} tokens fit in the KV cache at once; "
                               f"max_batch_size {opts.max_batch_size} is reached only with shorter sequences "
                               f"(set engine.{eng.target}.max_batch_size: {max(1, conc)} to match"
                               f"{', or fp8 KV' if shape.kv_quant else ''})")
    gpus_check = by.get(("serve (GPUs)", "gpu"))
    if gpus_check is not None and not gpus_check.fits:
        plan.advice.append(f"serving: the export asks for {gpus_check.need_bytes} GPUs, --gpus is {gpus_check.have_bytes}")


def catalogue_device(gpu: Gpu, count: int = 1):
    """A catalogue GPU as the device a build would detect on it (trtconv.core.environment.DeviceInfo)."""
    from trtconv.core.environment import DeviceInfo

    return DeviceInfo(kind="cuda", name=gpu.name, sm=f"{gpu.sm // 10}.{gpu.sm % 10}", count=count, memory_gib=gpu.memory_gib)


def nearest_gpu(device) -> Gpu:
    """The catalogue entry nearest a detected GPU (by memory), else h100-80gb: where serving is planned."""
    if device.kind != "cuda" or device.memory_gib is None:
        return GPUS["h100-80gb"]
    return min(GPUS.values(), key=lambda g: (abs(g.memory_gib - device.memory_gib), g.name))


def conversion_memory(device, max_gpu_memory_gib: float | None) -> tuple[int, str]:
    """The memory the stages may use on `device` and its name: the GPU's (or the cap), or on a CPU the
    cap or the host's available memory. `plan` and `build` both size the run with this."""
    if device.kind == "cuda":
        total = int(device.memory_gib * GIB)
        return (total if max_gpu_memory_gib is None else min(total, int(max_gpu_memory_gib * GIB))), device.name
    if max_gpu_memory_gib is not None:
        return int(max_gpu_memory_gib * GIB), "cpu (--max-gpu-memory cap)"
    return host_available_bytes() or 2**62, "cpu"


def plan_for_device(recipe, hf_cfg: dict, device, max_gpu_memory_gib: float | None, *, host_bytes: int | None = None,
                    disk: Disk | None = None, serve: Gpu | None = None, gpus: int | None = None, split: int = 1) -> MemoryPlan:
    """The plan of a conversion on `device` exactly as `build` sizes it there (conversion_memory; on a
    CPU no CUDA context and float32 compute), with serving planned for `serve`."""
    on_gpu = device.kind == "cuda"
    mem, name = conversion_memory(device, max_gpu_memory_gib)
    return plan_memory(recipe, hf_cfg, mem, name, gpus=gpus or max(1, device.count if on_gpu else 1), host_bytes=host_bytes,
                       disk=disk, context_bytes=CUDA_CONTEXT if on_gpu else 0, on_gpu=on_gpu, serve=serve, split=split)


def plan_for_gpu(recipe, hf_cfg: dict, gpu: str = "h100-80gb", gpus: int = 1, max_gpu_memory_gib: float | None = None,
                 disk: Disk | None = None) -> MemoryPlan:
    """A conversion on a catalogue GPU (another machine: its host memory is not checked), served on it."""
    g = resolve_gpu(gpu)
    return plan_for_device(recipe, hf_cfg, catalogue_device(g, gpus), max_gpu_memory_gib, disk=disk, serve=g, gpus=gpus)


def model_config(section) -> tuple[dict, Path]:
    """config.json of the recipe's model and its folder, without loading (or downloading) any weights."""
    from trtconv.stages.load import read_hf_config, resolve_model_dir

    if section.hub_id is not None:
        from huggingface_hub import hf_hub_download

        try:
            folder = Path(hf_hub_download(section.hub_id, "config.json", revision=section.revision)).parent
        except Exception as exc:  # noqa: BLE001 - any Hub failure is the user's to fix, named
            raise UserError(f"model.hub_id {section.hub_id}@{section.revision}: cannot fetch config.json: {exc}") from None
    else:
        folder = resolve_model_dir(section)
    return read_hf_config(folder), folder


def describe(plan: MemoryPlan) -> list[str]:
    """Plain lines for a terminal or a refusal message."""
    path = "streamed" if plan.streamed else "in memory"
    lines = [(f"{plan.params / 1e9:.2f} B parameters; one layer {size_text(plan.layer_bytes)}, whole model "
              f"{size_text(plan.load_bytes)} at the load dtype; exported checkpoint {size_text(plan.export_bytes)}; "
              f"KV cache {plan.kv_bytes_per_token / 1024:.0f} KiB per token"),
             (f"{'GPU ' if plan.on_gpu else ''}{plan.gpu}: {size_text(plan.gpu_memory_bytes)} x {plan.gpus}; "
              f"calibration path: {path} (calibration.streaming: {plan.streaming})"),
             f"evaluation path: {plan.evaluation_path}{evaluation_reason(plan)}"]
    if plan.serve_gpu != plan.gpu:
        lines.append(f"serving planned on {plan.serve_gpu} (--gpu picks another)")
    lines += time_lines(plan)
    return lines


def time_lines(plan: MemoryPlan) -> list[str]:
    """The predicted time of the layer-streamed path (predict_time), one device and the split."""
    t = plan.time_s
    if not t:
        return []
    lines = [f"predicted time, layer-streamed on one GPU: calibrate + export {t['calibrate_export_s']:.0f} s, "
             f"evaluate {t['evaluate_s']:.0f} s ({t['basis']})"]
    if "split" in t:
        s = t["split"]
        lines.append(f"predicted time split over {s['devices']} GPUs (--gpus): calibrate + export {s['calibrate_export_s']:.0f} s, "
                     f"evaluate {s['evaluate_s']:.0f} s: {s['speedup']:.2f}x; per-GPU peak in the streamed rows "
                     "(not measured: multi-GPU hosts were withheld)")
    return lines


def calibration_reason(plan: MemoryPlan) -> str:
    """Why calibration streams: the recipe, the GPU, or the host (ModelOpt's in-memory export of a rank)."""
    if plan.streaming == "always":
        return "calibration.streaming: always"
    host = next((c for c in plan.checks if c.stage == "calibrate (in memory)" and c.where == "host"), None)
    gpu = next((c for c in plan.checks if c.stage == "calibrate (in memory)" and c.where == "gpu"), None)
    if gpu is not None and gpu.fits and host is not None and not host.fits:
        return (f"host memory: the in-memory export holds a rank of {host.need_bytes / GIB:.1f} GiB in host memory, "
                f"{host.have_bytes / GIB:.1f} GiB available; calibration.streaming: never keeps it in memory")
    return (f"calibration.streaming: auto; whole model {plan.load_bytes / GIB:.1f} GiB, one layer {plan.layer_bytes / GIB:.2f} GiB, "
            f"{plan.gpu_memory_bytes / GIB:.1f} GiB available")


def evaluation_reason(plan: MemoryPlan) -> str:
    by = {c.stage: c for c in plan.checks if c.where == "gpu"}
    ev = by.get("evaluate (in memory)")
    if ev is None:
        return " (evaluate.enabled: false)"
    parked = "; vocabulary matrices wait on the host during the layer loop" if plan.evaluate_parks else ""
    if plan.streamed:
        return f" (with calibration{parked})"
    if plan.evaluate_streamed:
        return f" (on a GPU always: in memory it would need {ev.need_bytes / GIB:.1f} GiB{parked})"
    return ""


def host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_for_build(recipe, hf_cfg: dict, device, max_gpu_memory_gib: float | None, layer_bytes: int | None = None,
                   disk: Disk | None = None, split: int = 1) -> MemoryPlan:
    """The plan `build` runs first: against the GPU in use (or the cap), or on CPU against the cap or
    the host's available memory. Refuses (UserError, exit 2) a run whose chosen paths (calibration's,
    evaluation's) cannot fit, or whose export does not fit the free disk."""
    on_gpu = device.kind == "cuda"
    # On a GPU the host is checked too (on a CPU the "GPU" figure already is the host's memory).
    plan = plan_for_device(recipe, hf_cfg, device, max_gpu_memory_gib, host_bytes=host_available_bytes() if on_gpu else None,
                           disk=disk, split=split)
    cap = f"--max-gpu-memory {max_gpu_memory_gib:g} GiB" if max_gpu_memory_gib is not None else plan.gpu
    if plan.refusals:  # the streamed path's (streamed_refusals): named before any work
        raise UserError(plan.refusals[0])
    _refuse_calibration(plan, recipe, cap, layer_bytes)
    _refuse_evaluation(plan, cap)
    _refuse_disk(plan)
    return plan


def size_text(n: int) -> str:
    """A size in GiB, or in MiB where GiB would print 0.00 (a tiny model's layer)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


def _refuse_calibration(plan: MemoryPlan, recipe, cap: str, layer_bytes: int | None) -> None:
    by = {c.stage: c for c in plan.checks if c.where == "gpu"}
    if not plan.streamed:
        _refuse_in_memory(by["calibrate (in memory)"], cap)
        return
    need = by["calibrate (streamed)"]
    if not need.fits:
        one_layer = layer_bytes if layer_bytes is not None else plan.layer_bytes
        need_text, have_text = size_pair(need.need_bytes, need.have_bytes)
        raise UserError(
            f"{cap} ({have_text}) is less than layer-streamed calibration needs, {need_text}: one decoder layer is "
            f"{size_text(one_layer)} ({recipe.model.dtype}), with the activation cache and workspace; "
            "raise the cap, or lower calibration.num_samples / seq_len / batch_size")


def _refuse_evaluation(plan: MemoryPlan, cap: str) -> None:
    by = {c.stage: c for c in plan.checks if c.where == "gpu"}
    if not plan.evaluate_streamed:
        if "evaluate (in memory)" in by:
            _refuse_in_memory(by["evaluate (in memory)"], cap)
        return
    ev = by.get("evaluate (streamed)")
    if ev is not None and not ev.fits:
        need_text, have_text = size_pair(ev.need_bytes, ev.have_bytes)
        raise UserError(
            f"{cap} ({have_text}) is less than layer-streamed evaluation needs ({need_text}: two layers of the "
            "original and of the checkpoint, both models' embeddings and lm_head, the hidden states of every document); "
            "raise the cap, lower evaluate.num_samples / seq_len, or set evaluate.enabled: false and run `trtconv check` elsewhere")


def _refuse_disk(plan: MemoryPlan) -> None:
    for c in plan.checks:
        if c.where == "disk" and not c.fits:
            need_text, have_text = size_pair(c.need_bytes, c.have_bytes)
            raise UserError(f"{c.stage}: the export needs {need_text} of disk ({c.note}), {have_text} free; free space, "
                            "or choose another -o / TRTCONV_CACHE")


def _refuse_in_memory(need: Check, cap: str) -> None:
    if not need.fits:
        need_text, have_text = size_pair(need.need_bytes, need.have_bytes)
        raise UserError(
            f"{need.stage.split()[0]} in memory needs {need_text} and {cap} has {have_text}; "
            "set calibration.streaming: auto (or always) to work one layer at a time (see `trtconv plan`)")
