"""The TensorRT-LLM checkpoint contract (config.json + rank{N}.safetensors), as data plus a validator.

A TensorRT-LLM loader is strict: a missing tensor, a wrong dtype or a wrong shape fails the engine
build far from where the mistake was made. This module states what a checkpoint for the supported
architectures and precisions must hold, derived from its config.json alone, and checks the files
against that before anything else reads them.

The tensor tables were measured on what ModelOpt 0.47 ``export_tensorrt_llm_checkpoint`` writes
(tiny Llama/Qwen2, tp 1 and 2), not copied from documentation:

- linear weights are stored (out, in); column-parallel linears (qkv, fc, gate) are split on dim 0,
  row-parallel ones (dense, proj) on dim 1;
- the fused qkv holds, per rank, [q heads of that rank; k heads; v heads], so GQA kv heads are split
  across ranks as well;
- per-channel scales follow their weight's split (dim 0 of a column linear), per-tensor ones are
  replicated; prequant (smoothing) scales are per *input* channel, so only row linears split them;
- INT4 weights are two signed nibbles per int8 byte along the OUT dimension: shape (out/2, in);
- NVFP4 weights are two e2m1 codes per uint8 byte along the IN dimension: shape (out, in/2), with
  one FP8 e4m3 scale per 16 inputs (out, in/16) and 0-d float32 global and activation scales;
- a linear matched by ``quantization.exclude_modules`` (fnmatch on its module name, e.g.
  ``transformer.layers.0*`` for a recipe's ``*layers.0.*``; TensorRT-LLM matches the same way) is
  stored unquantized: the model dtype's weight, no scales. Its attention keeps the KV-cache scales
  (trtconv merges the KV-cache entries after the exclusions). With pp_size > 1 ModelOpt writes the
  last stage's exclusions under stage-local names into the one config.json, which TensorRT-LLM
  applies to every stage: a layer excluded on one stage only cannot be expressed (the validator
  says so);
- vocab_embedding is split on dim 0 (ModelOpt writes ``use_parallel_embedding: true``) and lm_head
  is zero-padded to a multiple of tp then split on dim 0. AWQ exports also pad the vocab to a
  multiple of 64 and write the padded ``vocab_size`` into config.json.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

from trtconv.architectures import TRTLLM_NAMES, WINDOW_CONFIG_PATH, by_trtllm_name
from trtconv.checkpoints.quant import NVFP4_BLOCK, QUANT_FORMATS, SUPPORTED_QUANT_ALGOS
from trtconv.core.errors import CheckpointError
from trtconv.core.jsonio import read_json_object

# --------------------------------------------------------------------------------------------
# Supported values
# --------------------------------------------------------------------------------------------

# Architectures: trtconv.architectures (TRTLLM_NAMES; each row's qkv_bias).

SUPPORTED_KV_CACHE_QUANT_ALGOS: tuple[str | None, ...] = (None, "FP8")

# config.json "dtype" -> safetensors dtype string of the unquantized tensors.
MODEL_DTYPES: dict[str, str] = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}

# Keys without which a loader cannot even size the model.
REQUIRED_CONFIG_KEYS: tuple[str, ...] = (
    "architecture",
    "dtype",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "mapping",
)

DEFAULT_AWQ_GROUP_SIZE = 128  # TensorRT-LLM QuantConfig default
MAX_PROBLEMS_LISTED = 40  # an error message listing thousands of tensors helps nobody


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a rank file must (or may) hold. ``dtype`` is a safetensors dtype string."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    required: bool = True


# The tensors of one linear per quant_algo: trtconv.checkpoints.quant (QuantFormat.trtllm_tensors).

# KV cache scales live on the attention module. TensorRT-LLM reads kv_cache_scaling_factor (the max
# of the k and v ones); ModelOpt also writes the separate k/v ones, which the loader merges.
KV_CACHE_TENSORS: dict[str, bool] = {  # suffix -> required
    "kv_cache_scaling_factor": True,
    "k_cache_scaling_factor": False,
    "v_cache_scaling_factor": False,
    "kv_cache_rcp_scaling_factor": False,
}

# The five linears of a decoder layer: name -> (parallel kind). Column: split out; row: split in.
LAYER_LINEARS: dict[str, str] = {
    "attention.qkv": "column",
    "attention.dense": "row",
    "mlp.fc": "column",  # from HF gate_proj (sic)
    "mlp.gate": "column",  # from HF up_proj (sic)
    "mlp.proj": "row",  # from HF down_proj
}


# --------------------------------------------------------------------------------------------
# Reading config.json
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the tensor tables need from config.json, with TensorRT-LLM's defaults applied."""

    architecture: str
    dtype: str  # safetensors dtype string of unquantized tensors
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    tp_size: int
    pp_size: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int
    qkv_bias: bool
    use_parallel_embedding: bool
    embedding_sharding_dim: int
    shares_embedding: bool
    exclude_modules: tuple[str, ...] = ()  # quantization.exclude_modules: stored unquantized

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp_size


def read_json_file(path: Path, needed_because: str) -> dict:
    """A checkpoint's JSON file as a dict; CheckpointError (naming the file) if missing or not JSON."""
    return read_json_object(path, "a checkpoint config", CheckpointError, missing=needed_because)


def read_config(ckpt_dir: Path) -> dict:
    """config.json as a dict; CheckpointError if it is missing or not JSON."""
    return read_json_file(Path(ckpt_dir) / "config.json", "a TensorRT-LLM checkpoint needs config.json next to rank{N}.safetensors")


def check_architecture(config: dict, where: str = "config.json") -> str:
    arch = config.get("architecture")
    if by_trtllm_name(arch) is None:
        raise CheckpointError(f"{where}: architecture {arch!r} is not supported; supported: {', '.join(TRTLLM_NAMES)}")
    return arch


def quantization_algos(config: dict, where: str = "config.json") -> tuple[str | None, str | None]:
    """(quant_algo, kv_cache_quant_algo), each checked against what trtconv can judge."""
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    kv_algo = quant.get("kv_cache_quant_algo")
    if algo not in SUPPORTED_QUANT_ALGOS:
        allowed = ", ".join("null" if a is None else a for a in SUPPORTED_QUANT_ALGOS)
        raise CheckpointError(f"{where}: quantization.quant_algo {algo!r} is not supported; allowed: {allowed}")
    if kv_algo not in SUPPORTED_KV_CACHE_QUANT_ALGOS:
        allowed = ", ".join("null" if a is None else a for a in SUPPORTED_KV_CACHE_QUANT_ALGOS)
        raise CheckpointError(
            f"{where}: quantization.kv_cache_quant_algo {kv_algo!r} is not supported; allowed: {allowed}"
        )
    return algo, kv_algo


def window_problems(config: dict) -> list[str]:
    """runtime_defaults.max_attention_window: positive ints, one window for all layers, and only
    on an architecture whose row converts sliding-window attention (trtconv.architectures)."""
    section, key = WINDOW_CONFIG_PATH
    defaults = config.get(section)
    if defaults is None or (isinstance(defaults, dict) and defaults.get(key) is None):
        return []
    name = f"key '{section}.{key}'"
    windows = defaults.get(key) if isinstance(defaults, dict) else defaults
    if not isinstance(windows, list) or not windows or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in windows):
        return [f"{name} is {windows!r}; allowed: a list of positive integers (tokens per layer, repeated) or null"]
    if len(set(windows)) > 1:
        return [f"{name} is {windows}: per-layer windows are not supported; allowed: one window for every layer"]
    row = by_trtllm_name(config.get("architecture"))
    if row is not None and not row.sliding_window:
        allowed = ", ".join(n for n in TRTLLM_NAMES if by_trtllm_name(n).sliding_window)
        return [f"{name} is {windows} on {row.trtllm_name}: sliding-window attention is converted only for {allowed}"]
    return []


def attention_window(config: dict) -> int | None:
    """The checkpoint's sliding attention window in tokens; None = full causal attention.

    Raises CheckpointError when the key is malformed (see window_problems)."""
    problems = window_problems(config)
    if problems:
        raise CheckpointError(f"config.json: {problems[0]}")
    section, key = WINDOW_CONFIG_PATH
    windows = (config.get(section) or {}).get(key)
    return windows[0] if windows else None


def config_problems(config: dict) -> list[str]:
    """Key-level problems a TensorRT-LLM loader would trip on (empty list: fine)."""
    problems = [f"key {k!r} is missing" for k in REQUIRED_CONFIG_KEYS if k not in config]
    if config.get("dtype") not in MODEL_DTYPES and "dtype" in config:
        problems.append(f"key 'dtype' is {config['dtype']!r}; expected one of {', '.join(MODEL_DTYPES)}")
    if "mapping" in config:
        m = config["mapping"]
        tp, pp = m.get("tp_size", 1), m.get("pp_size", 1)
        if m.get("world_size", tp * pp) != tp * pp:
            problems.append(f"mapping.world_size is {m.get('world_size')} but tp_size*pp_size is {tp}*{pp}={tp * pp}")
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers % pp:
            problems.append(f"num_hidden_layers {layers} is not divisible by mapping.pp_size {pp}")
    # TensorRT-LLM silently falls back to rotary_base 10000 when the key is absent: a Llama-3 model
    # (theta 500000) would build and run with the wrong positions. The ModelOpt exporter drops it
    # under transformers 5, so its absence is an error, not a default.
    if str(config.get("position_embedding_type", "rope_gpt_neox")).startswith("rope") and "rotary_base" not in config:
        problems.append(
            "key 'rotary_base' is missing (rope model): TensorRT-LLM would silently use 10000 instead of the "
            "model's rope_theta; the exporter drops it under transformers 5 and it must be written back"
        )
    problems += window_problems(config)
    quant = config.get("quantization") or {}
    if quant.get("quant_algo") == "NVFP4" and quant.get("group_size", NVFP4_BLOCK) != NVFP4_BLOCK:
        problems.append(f"quantization.group_size is {quant.get('group_size')!r}; NVFP4 blocks are {NVFP4_BLOCK} inputs")
    problems += lm_head_exclusion_problems(config)
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"key 'hidden_act' is {config.get('hidden_act')!r}; the supported architectures use 'silu'")
    return problems


def lm_head_exclusion_problems(config: dict) -> list[str]:
    """lm_head is stored in the model dtype (expected_tensors): TensorRT-LLM leaves it unquantized only when
    exclude_modules is absent (its default list names it) or matches it."""
    quant = config.get("quantization") or {}
    excluded = quant.get("exclude_modules")
    if not quant.get("quant_algo") or not isinstance(excluded, list):
        return []
    if any(isinstance(m, str) and fnmatch.fnmatchcase("lm_head", m) for m in excluded):
        return []
    why = f"TensorRT-LLM would build lm_head as {quant['quant_algo']}, but it is stored unquantized"
    return [f"quantization.exclude_modules {excluded} does not match 'lm_head': {why}"]


def model_shape(config: dict) -> ModelShape:
    """The sizes the tensor tables need. Raises CheckpointError on unsupported or missing values."""
    arch = check_architecture(config)
    algo, kv_algo = quantization_algos(config)
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"config.json: missing key(s) {', '.join(missing)}")
    if config["dtype"] not in MODEL_DTYPES:
        raise CheckpointError(f"config.json: dtype {config['dtype']!r}; expected one of {', '.join(MODEL_DTYPES)}")
    mapping = config["mapping"]
    heads = config["num_attention_heads"]
    quant = config.get("quantization") or {}
    return ModelShape(
        architecture=arch,
        dtype=MODEL_DTYPES[config["dtype"]],
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_size=config.get("head_size") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        tp_size=mapping.get("tp_size", 1),
        pp_size=mapping.get("pp_size", 1),
        quant_algo=algo,
        kv_cache_quant_algo=kv_algo,
        group_size=quant.get("group_size") or DEFAULT_AWQ_GROUP_SIZE,
        qkv_bias=by_trtllm_name(arch).qkv_bias or bool(config.get("attn_bias") or config.get("bias")),
        use_parallel_embedding=bool(config.get("use_parallel_embedding", False)),
        embedding_sharding_dim=config.get("embedding_sharding_dim", 0),
        shares_embedding=bool(config.get("share_embedding_table") or config.get("tie_word_embeddings")),
        exclude_modules=tuple(exclude_modules(config)),
    )


def exclude_modules(config: dict) -> list[str]:
    """quantization.exclude_modules: module name patterns (fnmatch) stored unquantized."""
    excluded = (config.get("quantization") or {}).get("exclude_modules") or []
    if not isinstance(excluded, list) or not all(isinstance(m, str) for m in excluded):
        raise CheckpointError(f"config.json: quantization.exclude_modules is {excluded!r}; allowed: a list of module name patterns")
    return excluded


def linear_quant_algo(shape: ModelShape, module: str) -> str | None:
    """The quant_algo one linear (e.g. 'transformer.layers.0.attention.qkv') is stored in: None when
    exclude_modules matches it, as TensorRT-LLM's loader decides (fnmatchcase on the module name)."""
    if any(fnmatch.fnmatchcase(module, pattern) for pattern in shape.exclude_modules):
        return None
    return shape.quant_algo


# --------------------------------------------------------------------------------------------
# Rank layout: which rank holds which part
# --------------------------------------------------------------------------------------------


def rank_coordinates(shape: ModelShape, rank: int) -> tuple[int, int]:
    """(tp_rank, pp_rank) of a global rank, as TensorRT-LLM's Mapping numbers them."""
    return rank % shape.tp_size, rank // shape.tp_size


def stage_layers(shape: ModelShape, pp_rank: int) -> range:
    """Global indices of the layers a pipeline stage holds (stored with stage-local indices)."""
    per_stage = shape.layers_per_stage
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def kv_heads_per_rank(shape: ModelShape) -> int:
    # With fewer kv heads than ranks TensorRT-LLM replicates them; at least one per rank.
    return max(shape.num_kv_heads // shape.tp_size, 1)


def qkv_rows_per_rank(shape: ModelShape) -> int:
    q_heads = shape.num_heads // shape.tp_size
    return (q_heads + 2 * kv_heads_per_rank(shape)) * shape.head_size


def padded_vocab_per_rank(shape: ModelShape) -> int:
    """lm_head rows per rank: vocab zero-padded to a multiple of tp, then split."""
    return math.ceil(shape.vocab_size / shape.tp_size)


def linear_local_dims(shape: ModelShape, linear: str) -> tuple[int, int]:
    """Rank-local (out, in) of a layer linear."""
    tp, hidden, inter = shape.tp_size, shape.hidden_size, shape.intermediate_size
    dims = {
        "attention.qkv": (qkv_rows_per_rank(shape), hidden),
        "attention.dense": (hidden, shape.num_heads * shape.head_size // tp),
        "mlp.fc": (inter // tp, hidden),
        "mlp.gate": (inter // tp, hidden),
        "mlp.proj": (hidden, inter // tp),
    }
    return dims[linear]


# --------------------------------------------------------------------------------------------
# Expected tensors
# --------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str, shape: ModelShape) -> str:
    return shape.dtype if dtype == "model" else dtype


def linear_specs(shape: ModelShape, prefix: str, linear: str) -> list[TensorSpec]:
    out, inp = linear_local_dims(shape, linear)
    table = QUANT_FORMATS[linear_quant_algo(shape, prefix)].trtllm_tensors
    specs = [
        TensorSpec(f"{prefix}.{suffix}", _resolve_dtype(dtype, shape), rule(out, inp, shape.group_size))
        for suffix, (dtype, rule) in table.items()
    ]
    if linear == "attention.qkv" and shape.qkv_bias:
        specs.append(TensorSpec(f"{prefix}.bias", shape.dtype, (out,)))
    return specs


def layer_specs(shape: ModelShape, local_index: int) -> list[TensorSpec]:
    prefix = f"transformer.layers.{local_index}"
    specs = [
        TensorSpec(f"{prefix}.input_layernorm.weight", shape.dtype, (shape.hidden_size,)),
        TensorSpec(f"{prefix}.post_layernorm.weight", shape.dtype, (shape.hidden_size,)),
    ]
    for linear in LAYER_LINEARS:
        specs += linear_specs(shape, f"{prefix}.{linear}", linear)
    if shape.kv_cache_quant_algo is not None:
        specs += [
            TensorSpec(f"{prefix}.attention.{suffix}", "F32", (1,), required)
            for suffix, required in KV_CACHE_TENSORS.items()
        ]
    return specs


def embedding_spec(shape: ModelShape) -> TensorSpec:
    rows, cols = shape.vocab_size, shape.hidden_size
    if shape.use_parallel_embedding and shape.embedding_sharding_dim == 0:
        rows = padded_vocab_per_rank(shape)
    elif shape.use_parallel_embedding:
        cols = shape.hidden_size // shape.tp_size
    return TensorSpec("transformer.vocab_embedding.weight", shape.dtype, (rows, cols))


def expected_tensors(config: dict, rank: int) -> dict[str, TensorSpec]:
    """Every tensor ``rank{rank}.safetensors`` must (or, with required=False, may) hold."""
    shape = model_shape(config)
    if not 0 <= rank < shape.world_size:
        raise CheckpointError(f"config.json: rank {rank} is outside mapping.world_size {shape.world_size}")
    _, pp_rank = rank_coordinates(shape, rank)
    specs: list[TensorSpec] = []
    if pp_rank == 0:
        specs.append(embedding_spec(shape))
    for local_index, _ in enumerate(stage_layers(shape, pp_rank)):
        specs += layer_specs(shape, local_index)
    if pp_rank == shape.pp_size - 1:
        specs.append(TensorSpec("transformer.ln_f.weight", shape.dtype, (shape.hidden_size,)))
        # A shared embedding table lets the loader reuse vocab_embedding for lm_head.
        lm_head_required = not (shape.shares_embedding and pp_rank == 0)
        specs.append(
            TensorSpec("lm_head.weight", shape.dtype, (padded_vocab_per_rank(shape), shape.hidden_size), lm_head_required)
        )
    return {s.name: s for s in specs}


# --------------------------------------------------------------------------------------------
# Validation of a checkpoint directory
# --------------------------------------------------------------------------------------------

# Files an exporter legitimately writes next to config.json and the rank files.
KNOWN_SIDE_FILES: frozenset[str] = frozenset({"config.json", "quant_cfg.json"})


@dataclass
class CheckpointReport:
    """What validate_checkpoint found in a checkpoint that passed."""

    directory: Path
    architecture: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp_size: int
    pp_size: int
    num_tensors: int
    tensors_per_rank: dict[int, int]
    bytes_per_rank: dict[int, int]
    extra_tensors: dict[int, list[str]] = field(default_factory=dict)
    extra_files: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_rank.values())


def rank_file_problems(ckpt_dir: Path, world_size: int) -> tuple[list[str], list[str]]:
    """(problems, extra files): one rank{N}.safetensors per rank, none beyond world_size."""
    problems = [
        f"{ckpt_dir / f'rank{r}.safetensors'}: missing (mapping.world_size is {world_size})"
        for r in range(world_size)
        if not (ckpt_dir / f"rank{r}.safetensors").is_file()
    ]
    extra: list[str] = []
    for path in sorted(ckpt_dir.iterdir()):
        if path.name.startswith("rank") and path.name.endswith(".safetensors"):
            index = path.name[len("rank") : -len(".safetensors")]
            if not index.isdigit() or int(index) >= world_size:
                problems.append(f"{path}: unexpected rank file (mapping.world_size is {world_size})")
        elif path.name not in KNOWN_SIDE_FILES:
            extra.append(path.name)
    return problems, extra


def read_rank_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a rank file's header, without reading tensor data.

    safe_open checks the header against the file size, so a truncated or corrupt file fails here.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "I32": 4, "I64": 8, "F64": 8}


def tensor_problems(path: Path, found: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, TensorSpec]) -> list[str]:
    """Missing required tensors and dtype/shape mismatches in one rank file."""
    problems = []
    for name, spec in expected.items():
        if name not in found:
            if spec.required:
                problems.append(f"{path.name}: tensor {name} missing (expected {spec.dtype} {list(spec.shape)})")
            continue
        dtype, shape = found[name]
        if dtype != spec.dtype:
            problems.append(f"{path.name}: tensor {name} has dtype {dtype}, expected {spec.dtype}")
        if shape != spec.shape:
            problems.append(f"{path.name}: tensor {name} has shape {list(shape)}, expected {list(spec.shape)}")
    return problems


def _raise_if_any(ckpt_dir: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_PROBLEMS_LISTED]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise CheckpointError(
        f"{ckpt_dir}: not a valid TensorRT-LLM checkpoint ({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + tail
    )


def validate_checkpoint(ckpt_dir: str | Path) -> CheckpointReport:
    """Check config.json and every rank file against the contract; raise CheckpointError listing
    all problems found (up to MAX_PROBLEMS_LISTED), or return a report."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    # Architecture and quant algo come first: without them no tensor table applies.
    check_architecture(config, where=str(ckpt_dir / "config.json"))
    quantization_algos(config, where=str(ckpt_dir / "config.json"))
    problems = [f"config.json: {p}" for p in config_problems(config)]
    try:
        shape = model_shape(config)
    except CheckpointError:
        _raise_if_any(ckpt_dir, problems)  # the config problems already name the missing keys
        raise
    file_problems, extra_files = rank_file_problems(ckpt_dir, shape.world_size)
    problems += file_problems
    report = CheckpointReport(
        directory=ckpt_dir,
        architecture=shape.architecture,
        dtype=config["dtype"],
        quant_algo=shape.quant_algo,
        kv_cache_quant_algo=shape.kv_cache_quant_algo,
        tp_size=shape.tp_size,
        pp_size=shape.pp_size,
        num_tensors=0,
        tensors_per_rank={},
        bytes_per_rank={},
        extra_files=extra_files,
    )
    for rank in range(shape.world_size):
        path = ckpt_dir / f"rank{rank}.safetensors"
        if not path.is_file():
            continue
        try:
            found = read_rank_header(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        expected = expected_tensors(config, rank)
        problems += tensor_problems(path, found, expected)
        extra = sorted(set(found) - set(expected))
        if extra:
            report.extra_tensors[rank] = extra
        report.tensors_per_rank[rank] = len(found)
        report.bytes_per_rank[rank] = sum(
            math.prod(s) * _DTYPE_BYTES.get(d, 0) for d, s in found.values()
        )
    report.num_tensors = sum(report.tensors_per_rank.values())
    _raise_if_any(ckpt_dir, problems + _pipeline_exclusion_note(shape, problems))
    return report


def _pipeline_exclusion_note(shape: ModelShape, problems: list[str]) -> list[str]:
    """Why a pp > 1 checkpoint's layer dtypes can disagree with its exclude_modules (module docstring)."""
    if shape.pp_size == 1 or not any(".layers." in p and "has dtype" in p for p in problems):
        return []
    note = (f"note: with mapping.pp_size {shape.pp_size}, config.json holds one exclude_modules list (stage-local layer "
            "names, ModelOpt writes the last stage's) that TensorRT-LLM applies to every stage: a quantization.exclude "
            "naming single decoder layers cannot be built; use export.pp_size 1 or exclude the same layers on every stage")
    return [note]
