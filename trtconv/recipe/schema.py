"""The recipe: one YAML file that says everything a build does.

The recipe is authoritative; CLI flags only add runtime concerns (paths, devices). Every section is
a strict pydantic model: unknown keys are errors (never warned and dropped), and every error names
the file, the key and what is allowed. ``trtconv recipe schema`` writes the JSON Schema from these
same models, so editors can complete and check recipes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic_core import PydanticUndefined
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, create_model, model_serializer, model_validator

from trtconv.recipe.base import Section
from trtconv.recipe.engine import EngineSection
from trtconv.core.errors import RecipeError
from trtconv.data.reference_models import REFERENCE_MODELS
from trtconv.engine.targets import ENGINE_TARGETS
from trtconv.gate.gates import GATES
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS, TASK_ACCURACY_DROP_PP

SCHEMA_VERSION = 1
# Default multiple-choice gate (kept under its old name; the value lives in trtconv.precisions).
DEFAULT_TASK_ACCURACY_DROP_PP = TASK_ACCURACY_DROP_PP
REFERENCE_MODEL_NAMES = tuple(REFERENCE_MODELS)  # the reference models trtconv trains (trtconv.data.reference_models)

# The allowed names are the registries' keys, so the JSON Schema lists exactly what trtconv offers.
PrecisionName = Literal[tuple(PRECISIONS)]
AUTO_PRECISION = "auto"  # the per-layer or per-GEMM search (trtconv.stages.search); not a row of the precisions table
# What takes one format in precision auto's search (quantization.search.granularity): name -> what the manifest says.
GRANULARITIES = {"layer": "decoder layer",
                 "gemm": "fused GEMM (q/k/v, o, gate/up, down) or mixture-of-experts block of a decoder layer"}
PrecisionOrAuto = Literal[(*PRECISIONS, AUTO_PRECISION)]
KVCacheName = Literal[tuple(KV_CACHE_FORMATS)]
ReferenceName = Literal[REFERENCE_MODEL_NAMES]


class Strict(Section):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(Strict):
    """Where the Hugging Face checkpoint comes from: exactly one of path, reference, hub_id."""

    path: str | None = Field(None, description="Local Hugging Face checkpoint folder (relative to the recipe file).")
    reference: ReferenceName | None = Field(
        None, description="A reference model trtconv trains and caches on first use (offline, seeded)."
    )
    hub_id: str | None = Field(None, description="Hugging Face Hub model id (needs network unless cached).")
    revision: str | None = Field(None, description="Pinned Hub revision (commit sha); required with hub_id.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the model is calibrated in on a GPU; on a CPU it computes in float32 (see docs/accuracy.md)."
    )
    trust_remote_code: bool = Field(False, description="Run the checkpoint's own Python code. Only if you trust it.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        given = [k for k in ("path", "reference", "hub_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of model.path (local folder), model.reference "
                f"({' | '.join(REFERENCE_MODEL_NAMES)}) or model.hub_id; got {given or 'none'}"
            )
        if self.hub_id is not None and not self.revision:
            raise ValueError("model.hub_id needs model.revision (a commit sha) so the build is reproducible")
        return self


class SearchSection(Strict):
    """`quantization.precision: auto`: which formats the search mixes, at which granularity, and its bounds."""

    candidates: list[PrecisionName] | None = Field(
        None, min_length=1,
        description="Formats a unit (search.granularity) may take (" + ", ".join(PRECISIONS) + "); null = every precision a CPU or "
        "GPU can calibrate (nvfp4, CUDA-only, must be named).")
    granularity: Literal[tuple(GRANULARITIES)] = Field(
        "gemm", description="What takes one format: gemm = one fused GEMM (q/k/v, o, gate/up, down) or one "
        "mixture-of-experts block; layer = a decoder layer (a quarter of gemm's sensitivity forwards; on SmolLM2-135M "
        "per GEMM shipped a lower KL at the same bits: docs/accuracy.md)")
    max_trials: PositiveInt = Field(8, description="Mixed candidates measured at most.")
    time_budget_s: float = Field(3600.0, gt=0, allow_inf_nan=False, description="Wall seconds of the whole search (calibrations, sensitivity, trials) after which no further trial starts.")


class QuantizationSection(Strict):
    precision: PrecisionOrAuto = Field(..., description="Weight/activation format: " + ", ".join(PRECISIONS)
                                       + ", or auto (the per-layer or per-GEMM mix with the fewest bits that passes the gates)")
    kv_cache: KVCacheName = Field("none", description="KV-cache format: " + ", ".join(KV_CACHE_FORMATS))
    exclude: list[str] = Field(
        default_factory=lambda: ["*lm_head*"],
        description="fnmatch patterns of module names left unquantized (ModelOpt quantizer names).",
    )
    awq_group_size: Literal[32, 64, 128] | None = Field(
        None,
        description="AWQ group size along the input dimension; null = the largest of 128, 64, 32 that divides every "
        "quantized layer (the output and the manifest say which).",
    )

    search: SearchSection | None = Field(None, description="precision auto only: the candidates and the search's bounds.")

    @model_validator(mode="after")
    def _search_with_auto(self) -> QuantizationSection:
        if self.search is not None and self.precision != AUTO_PRECISION:
            raise ValueError(f"quantization.search applies to precision auto only, not {self.precision}")
        if self.precision == AUTO_PRECISION and self.search is None:
            self.search = SearchSection()
        return self

    @model_serializer(mode="wrap")
    def _omit_no_search(self, handler):
        # Left out when absent so recipes written before `auto` keep their bytes, digests and cache keys.
        data = handler(self)
        if data.get("search") is None:
            data.pop("search", None)
        return data

    @property
    def quantizes(self) -> bool:
        """Whether ModelOpt calibrates anything: the weights/activations or the KV cache."""
        return self.precision != "none" or self.kv_cache != "none"

    @property
    def is_auto(self) -> bool:
        return self.precision == AUTO_PRECISION

    @property
    def precisions_used(self) -> list[str]:
        """The precisions-table rows a build may write: the precision, or auto's candidates."""
        if not self.is_auto:
            return [self.precision]
        return list(self.search.candidates if self.search and self.search.candidates else
                    [p.name for p in PRECISIONS.values() if not p.needs_cuda])

    @property
    def plan_precision(self) -> str:
        """The row that sizes plans: the precision, or for auto the candidate with the most stored bits
        (the most the search may choose: memory and disk plans stay upper bounds)."""
        if not self.is_auto:
            return self.precision
        return max(self.precisions_used, key=lambda n: PRECISIONS[n].linear_weight_bytes or 2.0)

    @property
    def gate_precision(self) -> str:
        """The precisions-table row whose facts stand for this section: itself, or for auto the candidate
        on the highest rung of the accuracy ladder below 16 bits (its gates are auto's default gates)."""
        if not self.is_auto:
            return self.precision
        names = self.precisions_used
        quantized = [n for n in names if PRECISIONS[n].modelopt_preset is not None] or list(names)
        return max(quantized, key=lambda n: PRECISIONS[n].ladder_rung)


class CalibrationSection(Strict):
    data: str | None = Field(
        None,
        description="Calibration text: a .jsonl (field 'text'), .txt or folder; null = the built-in calibration pack.",
    )
    num_samples: PositiveInt = Field(64, description="Number of calibration sequences of seq_len tokens.")
    seq_len: PositiveInt = Field(256, description="Tokens per calibration sequence.")
    batch_size: PositiveInt = Field(8, description="Sequences per calibration forward pass (every shipped recipe uses 8).")
    seed: int = Field(1234, description="Seed that picks and orders the calibration documents.")
    streaming: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Calibrate, export and evaluate one decoder layer at a time (memory: about one layer). "
        "auto = only when the whole model does not fit the GPU (see `trtconv plan`); the checkpoint is the same either way.",
    )

    @model_serializer(mode="wrap")
    def _omit_default_streaming(self, handler):
        # Left out at its default so recipes written before the option keep their bytes and digest.
        data = handler(self)
        if data.get("streaming") == "auto":
            data.pop("streaming")
        return data


class ExportSection(Strict):
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="dtype of unquantized tensors in the export.")
    tp_size: PositiveInt = Field(1, description="Tensor-parallel ranks of the exported checkpoint (= the engine's).")
    pp_size: PositiveInt = Field(1, description="Pipeline-parallel stages of the exported checkpoint.")
    tensorrt_llm_checkpoint: bool = Field(True, description="Write the TensorRT-LLM checkpoint (checkpoint/).")
    hf_checkpoint: bool = Field(False, description="Also write ModelOpt's unified HF checkpoint (hf_checkpoint/).")

    @model_validator(mode="after")
    def _something_ships(self) -> ExportSection:
        if not (self.tensorrt_llm_checkpoint or self.hf_checkpoint):
            raise ValueError("export.tensorrt_llm_checkpoint and export.hf_checkpoint are both false: nothing would be "
                             "exported; set at least one to true")
        return self


def _gates_section() -> type[Strict]:
    """One optional threshold per row of trtconv.gate.gates.GATES, in table order."""
    fields: dict[str, Any] = {
        gate.key: (float | None, Field(None, ge=0, le=gate.max_threshold, description=gate.description)) for gate in GATES.values()
    }
    return create_model(
        "GatesSection",
        __base__=Strict,
        __doc__="Thresholds; null takes the precision's shipped default (see docs/accuracy.md).",
        __module__=__name__,
        **fields,
    )


GatesSection = _gates_section()


class EvaluateSection(Strict):
    enabled: bool = Field(True, description="Run the accuracy gate.")
    data: str | None = Field(None, description="Held-out text; null = the built-in evaluation pack.")
    # The shipped recipes' values (tests/unit/test_ux_issue23.py checks they agree): `calibrate`, which
    # takes these defaults, then evaluates a checkpoint exactly as `build default` does.
    num_samples: PositiveInt = Field(96, description="Number of evaluation documents (one per row).")
    seq_len: PositiveInt = Field(256, description="Tokens per evaluation sequence.")
    batch_size: PositiveInt = Field(8, description="Sequences per forward pass.")
    seed: int = Field(0, description="Seed that picks the evaluation documents and the bootstrap resamples.")
    multiple_choice: str | None = Field(
        None,
        description="Optional local multiple-choice task (.jsonl: id, question, choices, answer) scored on both models.",
    )
    allow_inconclusive: bool = Field(
        False, description="Let a gate whose confidence interval straddles its threshold pass (default: it fails)."
    )
    gates: GatesSection = Field(default_factory=GatesSection)
    sensitivity: bool = Field(
        True,
        description="When a gate fails, measure each decoder layer's share of the damage (ModelOpt, a few rows) and "
        "suggest a quantization.exclude list and other precisions (docs/accuracy.md).",
    )


class Recipe(Strict):
    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Recipe format version.")
    name: str = Field(..., min_length=1, description="A short name for this build.")
    description: str = Field("", description="What this recipe is for.")
    model: ModelSection
    quantization: QuantizationSection
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    export: ExportSection = Field(default_factory=ExportSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    @model_validator(mode="after")
    def _auto_exports_mixed(self) -> Recipe:
        if self.quantization.is_auto and (self.export.tensorrt_llm_checkpoint or not self.export.hf_checkpoint):
            raise ValueError(
                "quantization.precision auto writes a mixed-precision checkpoint, which trtconv exports as the "
                "unified HF checkpoint only (the legacy TensorRT-LLM checkpoint writer takes one format per model): set "
                "export.tensorrt_llm_checkpoint: false and export.hf_checkpoint: true")
        return self

    @model_validator(mode="after")
    def _engine_needs_its_export(self) -> Recipe:
        target = ENGINE_TARGETS.get(self.engine.target)
        if target is not None and not getattr(self.export, target.source_export):
            raise ValueError(f"engine.target {target.name} {target.source_why}: set export.{target.source_export}: true")
        return self

    def resolved(self) -> Recipe:
        """A copy with every default made explicit (gate thresholds from the precision's defaults)."""
        data = self.model_dump(mode="json")
        if self.quantization.is_auto and not data["quantization"]["search"].get("candidates"):
            from trtconv.stages.search import default_candidates

            data["quantization"]["search"]["candidates"] = default_candidates(self.model)
        gates = data["evaluate"]["gates"]
        defaults = PRECISIONS[self.quantization.gate_precision].default_gates
        has_task = bool(data["evaluate"]["multiple_choice"])
        for gate in GATES.values():
            if gates[gate.key] is None and (gate.source == "documents" or has_task):
                gates[gate.key] = defaults[gate.key]
        return Recipe.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading, overrides and friendly errors


def _describe_error(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    etype = err["type"]
    if etype == "extra_forbidden":
        parent, key = err["loc"][:-1], err["loc"][-1]
        allowed = allowed_keys(parent)
        where = ".".join(map(str, parent)) or "the top level"
        return f"{source}: unknown key {key!r} in {where}; allowed keys: {', '.join(allowed)}"
    if etype == "missing":
        return f"{source}: missing required key {loc!r}"
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {loc}: {msg}{shown}"


def allowed_keys(path: tuple | list) -> list[str]:
    """The keys allowed at a (possibly nested) section of the recipe."""
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def validate_recipe_dict(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections; got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(e, source) for e in exc.errors()]
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(lines)) from None


class DuplicateKey(ValueError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line}); YAML would keep only "
                         "the last one silently: remove one of them")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error, not last-wins."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise DuplicateKey(key, first[key], line)
                    first[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """yaml.safe_load semantics (no Python objects), duplicate keys refused."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """'calibration.num_samples=256' -> (['calibration', 'num_samples'], 256); the value is YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. calibration.num_samples=256")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: the key is empty")
    try:
        value = safe_load_unique(raw) if raw.strip() else None
    except DuplicateKey as exc:
        raise RecipeError(f"--set {text!r}: {exc}") from None
    except yaml.YAMLError as exc:
        problem = (getattr(exc, "problem", None) or str(exc).splitlines()[0]).replace("'<stream end>'", "the end of the value")
        raise RecipeError(f"--set {text!r}: the value {raw!r} is not valid YAML ({problem}); {key_help(parts)}") from None
    return parts, value


def _type_words(annotation: Any, metadata: list | tuple = ()) -> str:
    """A field's type in words: 'a positive integer', 'one of: fp8, none', 'a list of strings', ..."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        words = [_type_words(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list{' of strings' if args == (str,) else ''} (a YAML flow list, e.g. ['a', 'b'])"
    if annotation is int and any(getattr(m, "gt", None) == 0 for m in metadata):
        return "a positive integer"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation, str(annotation))


def key_help(parts: list[str]) -> str:
    """What a recipe key takes, e.g. 'calibration.num_samples takes a positive integer (default 64)'."""
    model: Any = Recipe
    for part in parts[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or parts[-1] not in model.model_fields:
        return "write KEY.PATH=VALUE with a YAML value, e.g. calibration.num_samples=256 (quote a string with YAML punctuation)"
    field = model.model_fields[parts[-1]]
    default = field.get_default(call_default_factory=True)
    shown = "" if default is PydanticUndefined else f" (default {json.dumps(default)})"
    return f"{'.'.join(parts)} takes {_type_words(field.annotation, field.metadata)}{shown}"


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for depth, part in enumerate(parts[:-1]):
            allowed = allowed_keys(parts[:depth])
            if allowed and part not in allowed:
                where = ".".join(parts[:depth]) or "the top level"
                raise RecipeError(f"--set {text!r}: unknown key {part!r} in {where}; allowed keys: {', '.join(allowed)}")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        allowed = allowed_keys(parts[:-1])
        if allowed and parts[-1] not in allowed:
            where = ".".join(parts[:-1]) or "the top level"
            raise RecipeError(f"--set {text!r}: unknown key {parts[-1]!r} in {where}; allowed keys: {', '.join(allowed)}")
        node[parts[-1]] = value
    return data


def builtin_recipes_dir() -> Path:
    """The shipped recipes (top-level recipes/ in a checkout, package data `trtconv.shipped_recipes` when installed)."""
    from importlib import resources

    try:
        return Path(str(resources.files("trtconv.shipped_recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


def builtin_recipe_names() -> list[str]:
    d = builtin_recipes_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def locate_recipe(ref: str) -> Path:
    """A recipe argument is a file path, or the name of a shipped recipe (`.yaml` may be omitted)."""
    path = Path(ref)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    candidate = builtin_recipes_dir() / f"{name}.yaml"
    if str(path) == path.name and candidate.is_file():
        return candidate
    names = builtin_recipe_names()
    raise RecipeError(
        f"recipe {ref!r} not found: no such file, and not a shipped recipe name "
        f"(shipped: {', '.join(names) or 'none'}; see `trtconv recipe list`)"
    )


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths in a recipe file are relative to that file, so a recipe works from any current folder."""
    for section, key in (("model", "path"), ("calibration", "data"), ("evaluate", "data"), ("evaluate", "multiple_choice")):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else (base / p).resolve())
    return data


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read, override and validate a recipe; relative paths become absolute. Returns (recipe, file)."""
    path = locate_recipe(str(ref))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    try:
        data = safe_load_unique(text)
    except DuplicateKey as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; it needs at least name, model and quantization")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
        data = _resolve_relative_paths(data, path.resolve().parent)
    return validate_recipe_dict(data, str(path)), path


def recipe_from_dict(data: dict, overrides: list[str] | None = None, source: str = "<flags>") -> Recipe:
    data = apply_overrides(data, overrides or [])
    data = _resolve_relative_paths(data, Path.cwd())
    return validate_recipe_dict(data, source)


# Below this many tokens per sequence, calibration sees too little context for representative
# activation ranges (attention and KV-cache scales especially).
MIN_CALIBRATION_SEQ_LEN = 32


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Valid but probably not what was meant: said before any work, never silently accepted."""
    warnings = []
    seq_len = recipe.calibration.seq_len
    if seq_len < MIN_CALIBRATION_SEQ_LEN and recipe.quantization.precision != "none":
        warnings.append(
            f"calibration.seq_len {seq_len} is below {MIN_CALIBRATION_SEQ_LEN}: {recipe.calibration.num_samples} sequences of "
            f"{seq_len} tokens are too little context for representative activation ranges; use 128 or more (default 256)"
        )
    return warnings


def json_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "trtconv recipe"
    return schema
