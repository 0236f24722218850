"""The registries agree with each other, with the recipe schema and with ModelOpt.

Each product fact (a precision, a gate, an architecture, a quantization format, an engine target)
has one row in one table; everything else derives from the tables. These tests catch a row added
to one table but not to the ones that depend on it.
"""

from __future__ import annotations

import typing

import pytest

from trtconv.gate.gates import GATES
from trtconv.precisions import KV_CACHE_FORMATS, OTHER_CHECKPOINT_ALGOS_MIN_SM, PRECISIONS, QUANT_ALGO_MIN_SM
from trtconv.recipe.schema import EvaluateSection, GatesSection, QuantizationSection, Recipe


def _literal_values(annotation) -> tuple:
    args = typing.get_args(annotation)
    return tuple(a for arg in args for a in (_literal_values(arg) if typing.get_args(arg) else (arg,)) if a is not type(None))


# -- precisions and gates ---------------------------------------------------------------------------


def test_recipe_literals_are_the_registry_keys():
    from trtconv.data.reference_models import REFERENCE_MODELS
    from trtconv.recipe.schema import ModelSection

    # `auto` is the per-layer search over the table's rows (trtconv.stages.search), not a row of its own
    assert _literal_values(QuantizationSection.model_fields["precision"].annotation) == (*PRECISIONS, "auto")
    from trtconv.recipe.schema import SearchSection

    assert _literal_values(SearchSection.model_fields["candidates"].annotation) == tuple(PRECISIONS)
    assert _literal_values(QuantizationSection.model_fields["kv_cache"].annotation) == tuple(KV_CACHE_FORMATS)
    assert _literal_values(ModelSection.model_fields["reference"].annotation) == tuple(REFERENCE_MODELS)


def test_every_gate_has_a_default_in_every_precision():
    for precision in PRECISIONS.values():
        assert set(precision.default_gates) == set(GATES), precision.name


def test_recipe_gate_fields_are_the_gate_table():
    assert list(GatesSection.model_fields) == list(GATES)
    assert EvaluateSection.model_fields["gates"].annotation is GatesSection
    for key, gate in GATES.items():
        field = GatesSection.model_fields[key]
        assert field.description == gate.description
        bounds = {type(m).__name__: m for m in field.metadata}
        assert bounds["Ge"].ge == 0
        assert ("Le" in bounds) == (gate.max_threshold is not None)


def test_every_gate_judges_a_known_metric():
    from trtconv.gate.stats import METRICS

    task_metrics = {"accuracy_baseline", "accuracy_candidate", "accuracy_difference_pp", "accuracy_drop_pp"}  # gate.tasks.task_summary
    for gate in GATES.values():
        assert gate.comparator in ("<=", ">=")
        known = METRICS if gate.source == "documents" else task_metrics
        assert gate.metric in known, gate.key


def test_resolved_recipe_takes_every_default_from_the_precision_row():
    for name, precision in PRECISIONS.items():
        data = {"name": "t", "model": {"reference": "llama-ref"}, "quantization": {"precision": name}}
        plain = Recipe.model_validate(data).resolved().evaluate.gates
        with_task = Recipe.model_validate({**data, "evaluate": {"multiple_choice": "/x.jsonl"}}).resolved().evaluate.gates
        for key, gate in GATES.items():
            assert getattr(with_task, key) == precision.default_gates[key]
            assert getattr(plain, key) == (precision.default_gates[key] if gate.source == "documents" else None)


def test_gpu_needs_are_written_once():
    for precision in PRECISIONS.values():
        if precision.quant_algo is not None:
            assert QUANT_ALGO_MIN_SM.get(precision.quant_algo) == precision.min_sm, precision.name
    for kv in KV_CACHE_FORMATS.values():
        if kv.kv_cache_quant_algo is not None:
            assert QUANT_ALGO_MIN_SM.get(kv.kv_cache_quant_algo) == kv.min_sm, kv.name
    # the extra table only names algorithms no precision row makes
    assert not set(OTHER_CHECKPOINT_ALGOS_MIN_SM) & {p.quant_algo for p in PRECISIONS.values()}


def test_group_size_precisions_are_awq():
    for precision in PRECISIONS.values():
        assert precision.uses_group_size == ("AWQ" in (precision.quant_algo or "")), precision.name


def test_every_precision_has_every_fact():
    """Bytes per weight and the advice's ladder are row facts: a row without them cannot be made, and
    each is sane (issue 23: the memory plan's own bytes table lacked nvfp4, so `plan` crashed)."""
    import dataclasses

    from trtconv.gate.sensitivity import higher_precisions
    from trtconv.precisions import Precision, linear_bytes

    required = [f.name for f in dataclasses.fields(Precision)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert {"linear_weight_bytes", "ladder_rung"} <= set(required)
    rungs = [p.ladder_rung for p in PRECISIONS.values()]
    assert len(set(rungs)) == len(rungs), "one precision per rung"
    for precision in PRECISIONS.values():
        quantizes = precision.quant_algo is not None
        assert (precision.linear_weight_bytes is not None) == quantizes, precision.name
        assert 0 < linear_bytes(precision.name, 2) <= 2, precision.name
        assert precision.name not in higher_precisions(precision.name)
        assert ("none" in higher_precisions(precision.name)) == (precision.name != "none"), precision.name
    assert PRECISIONS["none"].ladder_rung == max(rungs)
    assert higher_precisions("nvfp4")[0] == "int4_awq"


def test_no_module_restates_the_precision_table():
    """A table keyed by precision names anywhere but trtconv/precisions.py is a second copy that a new
    precision can miss (memory_plan.LINEAR_BYTES and gate/sensitivity.PRECISION_LADDER were)."""
    import ast
    from pathlib import Path

    names = set(PRECISIONS) - {"none"}
    root = Path(__file__).resolve().parents[2] / "trtconv"
    copies = []
    for path in root.rglob("*.py"):
        if path.name == "precisions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            found = {e.value for e in elts or [] if isinstance(e, ast.Constant) and e.value in names}
            if len(found) >= 3:
                copies.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not copies, copies


@pytest.mark.slow  # imports ModelOpt (seconds)
def test_modelopt_presets_exist():
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES

    for precision in PRECISIONS.values():
        assert precision.modelopt_preset is None or precision.modelopt_preset in QUANT_CFG_CHOICES, precision.name
    for kv in KV_CACHE_FORMATS.values():
        assert kv.modelopt_preset is None or kv.modelopt_preset in KV_QUANT_CFG_CHOICES, kv.name


# -- architectures ----------------------------------------------------------------------------------


def test_architecture_names_are_unique():
    from trtconv.architectures import ARCHITECTURES, HF_NAMES, TRTLLM_NAMES

    assert len(set(TRTLLM_NAMES)) == len(TRTLLM_NAMES) and len(set(HF_NAMES)) == len(HF_NAMES)
    legacy = [a.trtllm_name for a in ARCHITECTURES.values() if a.no_trtllm_checkpoint is None]
    assert list(TRTLLM_NAMES) == legacy  # a family refused on the legacy path has no TensorRT-LLM name to read
    assert len({a.family for a in ARCHITECTURES.values()}) == len(ARCHITECTURES)


def test_architecture_rows_are_consistent():
    from trtconv.architectures import ARCHITECTURES, ROPE_KINDS

    for arch in ARCHITECTURES.values():
        assert set(arch.rope_kinds) <= set(ROPE_KINDS), arch.hf_name
        keys = [k.key for k in arch.trtllm_config_keys]
        assert len(keys) == len(set(keys)), arch.hf_name
        stated_bias = {k.key: k.value for k in arch.trtllm_config_keys}.get("attn_bias")
        assert stated_bias in (None, arch.qkv_bias), arch.hf_name  # a fixed attn_bias must match the row


def test_every_architecture_has_a_tiny_factory():
    from transformers import AutoModelForCausalLM

    from tests.factories import TINY_ARCHS, tiny_config
    from trtconv.architectures import ARCHITECTURES

    assert set(TINY_ARCHS) == {a.family for a in ARCHITECTURES.values()}
    for arch in ARCHITECTURES.values():
        model = AutoModelForCausalLM.from_config(tiny_config(arch.family, num_hidden_layers=1))
        assert type(model).__name__ == arch.hf_name


# -- quantization formats ---------------------------------------------------------------------------


def test_every_precision_has_a_quant_format():
    from trtconv.checkpoints.quant import QUANT_FORMATS

    for precision in PRECISIONS.values():
        assert precision.quant_algo in QUANT_FORMATS, precision.name
        assert QUANT_FORMATS[precision.quant_algo].uses_groups == precision.uses_group_size, precision.name


def test_quant_format_rows_are_complete():
    from trtconv.checkpoints.quant import ACTIVATION_ROUND_TRIPS, QUANT_FORMATS, SUPPORTED_QUANT_ALGOS

    assert SUPPORTED_QUANT_ALGOS[0] is None and set(SUPPORTED_QUANT_ALGOS) == set(QUANT_FORMATS)
    for algo, fmt in QUANT_FORMATS.items():
        assert "weight" in fmt.trtllm_tensors, algo
        assert fmt.activation in (None, *ACTIVATION_ROUND_TRIPS), algo
        needs_input_scale = fmt.activation is not None
        assert ("activation_scaling_factor" in fmt.trtllm_tensors) == needs_input_scale, algo
        assert ("input_scale" in fmt.hf_scales) == needs_input_scale, algo
        if algo is not None:
            assert fmt.dequantize is not None and fmt.hf_weight_dtypes and "weight_scale" in fmt.hf_scales, algo


def test_kv_cache_formats_the_readers_accept_are_the_recipes():
    from trtconv.checkpoints.trtllm_format import SUPPORTED_KV_CACHE_QUANT_ALGOS

    assert set(SUPPORTED_KV_CACHE_QUANT_ALGOS) == {k.kv_cache_quant_algo for k in KV_CACHE_FORMATS.values()}


# -- engine targets ---------------------------------------------------------------------------------

# The test double that stands in for each target's TensorRT-LLM entry point (tests/doubles).
TARGET_DOUBLES = {
    "tensorrt": ("bin/trtllm-build", "tensorrt_llm/commands/build.py", "tensorrt_llm/_tensorrt_engine/__init__.py"),
    "pytorch": ("tensorrt_llm/_double_llm.py", "tensorrt_llm/llmapi.py"),
}


def test_recipe_engine_section_is_the_target_table():
    from pydantic import BaseModel

    from trtconv.engine.record import EngineRecord
    from trtconv.engine.targets import ENGINE_TARGETS, NO_ENGINE
    from trtconv.recipe.engine import EngineSection
    from trtconv.recipe.schema import ExportSection

    assert _literal_values(EngineSection.model_fields["target"].annotation) == (NO_ENGINE, *ENGINE_TARGETS)
    assert _literal_values(EngineRecord.model_fields["target"].annotation) == tuple(ENGINE_TARGETS)
    for name, target in ENGINE_TARGETS.items():
        assert issubclass(target.options_model, BaseModel)
        assert EngineSection.model_fields[name].annotation is target.options_model
        assert ExportSection.model_fields[target.source_export].annotation is bool
        assert target.max_trtllm is None or target.max_trtllm >= target.min_trtllm


def test_every_engine_target_has_a_double():
    from pathlib import Path

    from trtconv.engine.targets import ENGINE_TARGETS

    doubles = Path(__file__).resolve().parents[1] / "doubles"
    assert set(TARGET_DOUBLES) == set(ENGINE_TARGETS)
    for name, files in TARGET_DOUBLES.items():
        for file in files:
            assert (doubles / file).is_file(), f"{name}: {file}"


def test_a_target_refuses_a_recipe_without_its_export():
    from trtconv.core.errors import RecipeError
    from trtconv.engine.targets import ENGINE_TARGETS
    from trtconv.recipe.schema import validate_recipe_dict

    for name, target in ENGINE_TARGETS.items():
        data = {"name": "t", "model": {"reference": "llama-ref"}, "quantization": {"precision": "none"},
                "engine": {"target": name}, "export": {"tensorrt_llm_checkpoint": True, "hf_checkpoint": True, target.source_export: False}}
        with pytest.raises(RecipeError, match=f"set export.{target.source_export}: true"):
            validate_recipe_dict(data, "r.yaml")


# -- precisions that need CUDA ----------------------------------------------------------------------


def test_cuda_only_precisions_are_refused_on_cpu_before_any_work():
    from trtconv.core.environment import DeviceInfo
    from trtconv.core.errors import UserError
    from trtconv.core.ui import Reporter
    from trtconv.engine.plan import preflight

    cuda_only = [p.name for p in PRECISIONS.values() if p.needs_cuda]
    assert cuda_only == ["nvfp4"]
    cpu = DeviceInfo(kind="cpu", name="cpu", count=1)
    hf_cfg = {"num_attention_heads": 4, "num_key_value_heads": 2}
    for name in cuda_only:
        recipe = Recipe.model_validate({"name": "t", "model": {"reference": "llama-ref"}, "quantization": {"precision": name}}).resolved()
        with pytest.raises(UserError, match=rf"precision '{name}' needs a CUDA GPU.*amax must be a CUDA tensor.*fp8"):
            preflight(recipe, hf_cfg, cpu, Reporter())


def test_nvfp4_on_a_hopper_gpu_gates_but_builds_no_engine():
    """Calibration and the gate run on any CUDA GPU; only an engine build needs SM >= 10.0."""
    from trtconv.core.environment import DeviceInfo
    from trtconv.core.errors import UserError
    from trtconv.core.ui import Reporter
    from trtconv.engine.plan import preflight

    h200 = DeviceInfo(kind="cuda", name="NVIDIA H200", count=1, sm="9.0")
    hf_cfg = {"num_attention_heads": 4, "num_key_value_heads": 2}
    base = {"name": "t", "model": {"reference": "llama-ref"}, "quantization": {"precision": "nvfp4"}}
    preflight(Recipe.model_validate(base).resolved(), hf_cfg, h200, Reporter())  # warns, does not raise
    with_engine = {**base, "engine": {"target": "tensorrt"}, "export": {"tensorrt_llm_checkpoint": True}}
    with pytest.raises(UserError, match="SM >= 10.0"):
        preflight(Recipe.model_validate(with_engine).resolved(), hf_cfg, h200, Reporter())


def test_sliding_window_rows_convert_it_and_the_others_refuse_it():
    """A row with sliding_window=True takes its factory's window; any other row refuses one, naming sliding_window."""
    from tests.factories import tiny_config
    from trtconv.architectures import ARCHITECTURES, check_attention_window
    from trtconv.core.errors import ModelError

    assert [a.hf_name for a in ARCHITECTURES.values() if a.sliding_window] == ["MistralForCausalLM", "Phi3ForCausalLM"]
    for arch in ARCHITECTURES.values():
        cfg = {"sliding_window": 16, "use_sliding_window": True, "num_hidden_layers": 2}
        if arch.per_layer_windows:  # config.json's layer_types carry them; no one window to pass on
            assert check_attention_window(cfg, arch.hf_name, "config.json", ModelError) is None
        elif arch.sliding_window:
            windowed = tiny_config(arch.family, sliding_window=16).to_dict()
            assert check_attention_window(windowed, arch.hf_name, "config.json", ModelError) == 16
        else:
            with pytest.raises(ModelError, match=rf"sliding_window 16 with {arch.hf_name}: .*allowed"):
                check_attention_window(cfg, arch.hf_name, "config.json", ModelError)
        assert check_attention_window({"sliding_window": None}, arch.hf_name, "config.json", ModelError) is None


def test_every_engine_target_has_a_backend_row():
    """The data table (recipe choices) and the behaviour table (what runs) name the same targets."""
    from trtconv.engine.backends import BACKENDS
    from trtconv.engine.targets import ENGINE_TARGETS

    assert list(BACKENDS) == list(ENGINE_TARGETS)
    assert all(b.name == name for name, b in BACKENDS.items())
