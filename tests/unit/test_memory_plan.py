"""`trtconv plan` and the memory check `build` runs first: arithmetic from config.json alone (fast)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256,
              "max_position_embeddings": 8192, "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}


def _recipe(tmp_path: Path, config: dict, precision: str, **export) -> Path:
    model = tmp_path / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "plan", "model": {"path": str(model)}, "quantization": {"precision": precision},
                                  "export": {"dtype": "float16", **export}}))
    return recipe


def _plan(cli, *args):
    res = cli("plan", *args, "--json")
    return res.exit_code, json.loads(res.stdout)


def test_70b_fp16_needs_two_80gb_gpus(cli, tmp_path):
    from trtconv.memory_plan import EXIT_DOES_NOT_FIT

    recipe = _recipe(tmp_path, LLAMA3_70B, "none")
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb")
    assert code == EXIT_DOES_NOT_FIT and not plan["fits"]
    assert 70.0e9 < plan["params"] < 71.0e9
    assert plan["kv_bytes_per_token"] == 80 * 8 * 128 * 2 * 2  # layers x kv heads x head size x fp16 x (K, V)
    assert any("export.tp_size: 2" in a for a in plan["advice"]), plan["advice"]
    assert plan["streamed"]  # the whole model does not fit one GPU: calibration streams (auto)
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb", "--gpus", "2", "--set", "export.tp_size=2")
    assert code == 0 and plan["fits"], plan["advice"]


def test_70b_fp8_fits_one_h200_not_one_h100(cli, tmp_path):
    recipe = _recipe(tmp_path, LLAMA3_70B, "fp8")
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb")
    assert code == 0 and plan["fits"]
    assert 65 < plan["export_bytes"] / 2**30 < 70  # one byte per linear weight + fp16 embeddings
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb")
    assert code == 0 and plan["fits"]  # ~68 GiB of FP8 weights also fit 80 GB: the seed's point is FP16 vs FP8 on one GPU


def test_streaming_never_on_a_model_larger_than_the_gpu_advises_streaming(cli, tmp_path):
    recipe = _recipe(tmp_path, LLAMA3_70B, "fp8")
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb", "--set", "calibration.streaming=never")
    assert code != 0 and any("calibration.streaming: auto" in a for a in plan["advice"])
    # On an H200 the bf16 model (131 GiB) fits for calibration; evaluation, which in memory would
    # add the checkpoint, streams on its own, so `never` (for calibration) fits.
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb", "--set", "calibration.streaming=never")
    assert code == 0 and not plan["streamed"] and plan["evaluate_streamed"] and plan["evaluation_path"] == "streamed"


LLAMA3_8B = {**LLAMA3_70B, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32}


def _build_plan(tmp_path: Path, device, config: dict = LLAMA3_8B, cap_gib: float | None = None, streaming: str = "auto", **model):
    from trtconv.memory_plan import plan_for_build
    from trtconv.recipe.schema import recipe_from_dict

    recipe = recipe_from_dict({"name": "plan", "model": {"path": str(tmp_path), "dtype": "bfloat16", **model},
                               "quantization": {"precision": "fp8"}, "calibration": {"streaming": streaming}}).resolved()
    return plan_for_build(recipe, config, device, cap_gib)


H200 = {"kind": "cuda", "name": "NVIDIA H200", "sm": "9.0", "count": 1, "memory_gib": 139.8}


@pytest.fixture(autouse=True)
def h200_host(monkeypatch):
    """A GPU build's plan also checks this machine's available host memory: pinned at the H200 host's
    128 GiB, so what the tests assert does not depend on the machine running them."""
    monkeypatch.setattr("trtconv.memory_plan.host_available_bytes", lambda: 128 * 2**30)
    _free_disk(monkeypatch, 2**50)


def _free_disk(monkeypatch, free: int, same_filesystem: bool = True) -> None:
    """The disk rows read shutil.disk_usage where -o and the cache are: pinned, like the host's memory."""
    from trtconv.memory_plan import Disk

    monkeypatch.setattr("trtconv.memory_plan.disk_here",
                        lambda out, cache: Disk(str(out), free, str(cache), free, same_filesystem))


def test_a_host_that_cannot_hold_the_export_streams_calibration(tmp_path, monkeypatch):
    """ModelOpt's in-memory export holds a whole rank in host memory (9.6 GiB measured for 8B fp8): a
    GPU host with less available streams calibration (one layer at a time), and says why;
    calibration.streaming: never keeps the in-memory path."""
    from trtconv.core.environment import DeviceInfo
    from trtconv.memory_plan import calibration_reason

    monkeypatch.setattr("trtconv.memory_plan.host_available_bytes", lambda: 6 * 2**30)
    plan = _build_plan(tmp_path, DeviceInfo(**H200))
    host = next(c for c in plan.checks if c.stage == "calibrate (in memory)" and c.where == "host")
    assert 8 * 2**30 < host.need_bytes < 10 * 2**30 and not host.fits
    assert plan.streamed and plan.evaluate_streamed
    assert "host memory" in calibration_reason(plan) and "6.0 GiB available" in calibration_reason(plan)
    streamed_host = next(c for c in plan.checks if c.stage == "calibrate (streamed)" and c.where == "host")
    assert streamed_host.fits
    never = _build_plan(tmp_path, DeviceInfo(**H200), streaming="never")
    assert not never.streamed


def test_8b_on_a_gpu_calibrates_in_memory_and_evaluates_layer_by_layer(tmp_path):
    """In memory, evaluation (bf16 original + the checkpoint) would set the peak: it streams; calibration does not."""
    from trtconv.core.environment import DeviceInfo

    plan = _build_plan(tmp_path, DeviceInfo(**H200))
    by = {c.stage: c for c in plan.checks if c.where == "gpu"}
    assert by["evaluate (in memory)"].need_bytes > by["calibrate (in memory)"].need_bytes
    assert not plan.streamed and plan.evaluate_streamed and plan.fits
    assert by["evaluate (streamed)"].need_bytes < by["calibrate (in memory)"].need_bytes  # evaluation no longer sets the peak
    assert plan.relevant_stages() >= {"calibrate (in memory)", "evaluate (streamed)"}
    assert not plan.relevant_stages() & {"calibrate (streamed)", "evaluate (in memory)"}


def test_streamed_evaluation_parks_the_vocabulary_matrices_only_where_they_would_not_fit(tmp_path):
    """Parking costs seconds (moving 3 GB off the GPU and back for 8B): on an uncapped H200 the 8B
    model's vocabulary matrices stay; under a cap that they would break (70B shapes, 16 GiB) they wait
    on the host, and the plan's figure is then the parked one."""
    from trtconv.core.environment import DeviceInfo

    uncapped = _build_plan(tmp_path, DeviceInfo(**H200))
    assert uncapped.evaluate_streamed and not uncapped.evaluate_parks
    seventy = {**LLAMA3_70B, "num_hidden_layers": 8}
    capped = _build_plan(tmp_path, DeviceInfo(**H200), config=seventy, cap_gib=16)
    unparked = _build_plan(tmp_path, DeviceInfo(**H200), config=seventy)
    assert capped.evaluate_streamed and capped.evaluate_parks and not unparked.evaluate_parks
    need = {p: next(c.need_bytes for c in plan.checks if c.stage == "evaluate (streamed)" and c.where == "gpu")
            for p, plan in (("capped", capped), ("unparked", unparked))}
    assert need["capped"] <= 16 * 2**30 < need["unparked"]
    from trtconv.memory_plan import evaluation_reason

    assert "vocabulary matrices wait on the host" in evaluation_reason(capped)
    assert "vocabulary matrices" not in evaluation_reason(uncapped)


def test_8b_on_a_cpu_keeps_both_in_memory(tmp_path):
    """On a CPU evaluation follows calibration, as before (the default recipe's CPU artifact is unchanged)."""
    from trtconv.core.environment import DeviceInfo

    plan = _build_plan(tmp_path, DeviceInfo(kind="cpu", name="cpu"), cap_gib=200)
    assert not plan.streamed and not plan.evaluate_streamed and plan.evaluation_path == "in memory"


def test_remote_code_models_evaluate_in_memory_on_a_gpu(tmp_path):
    """The streamed evaluator builds the original from transformers' own classes, never a model's code."""
    from trtconv.core.environment import DeviceInfo

    plan = _build_plan(tmp_path, DeviceInfo(**H200), trust_remote_code=True)
    assert not plan.streamed and not plan.evaluate_streamed


def test_plan_prints_the_evaluation_path(cli, tmp_path):
    recipe = _recipe(tmp_path, LLAMA3_8B, "fp8")
    res = cli("plan", recipe, "--gpu", "h200-141gb")
    assert res.exit_code == 0, res.stderr
    assert "calibration path: in memory" in res.stdout
    assert "evaluation path: streamed (on a GPU always: in memory it would need" in res.stdout
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb", "--set", "evaluate.enabled=false")
    assert code == 0 and plan["evaluation_path"] == "off"


def test_unknown_gpu_names_the_catalogue(cli, tmp_path):
    res = cli("plan", _recipe(tmp_path, LLAMA3_70B, "fp8"), "--gpu", "h100")
    assert res.exit_code == 2 and "h200-141gb" in res.stderr and "h100" in res.stderr


def _sparse_model(folder: Path, layers: int = 1) -> Path:
    """An 8B-shaped checkpoint (one layer) whose safetensors file is sparse: real header, no data written."""
    from tests.factories import make_tokenizer

    cfg = {**LLAMA3_70B, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": layers, "vocab_size": 128256}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    make_tokenizer(folder)
    h, i, v, kv = 4096, 14336, 128256, 8 * 128
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                       p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i]})
    header, off = {}, 0
    for name in sorted(shapes):
        size = 2
        for d in shapes[name]:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [off, off + size]}
        off += size
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return folder


@pytest.mark.integration
def test_cap_smaller_than_one_layer_is_refused_before_any_work(cli, tmp_path):
    model = _sparse_model(tmp_path / "m8b")
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", tmp_path / "out", "--device", "cpu",
              "--max-gpu-memory", "0.25")
    assert res.exit_code == 2, res.stdout + res.stderr
    assert "--max-gpu-memory 0.25 GiB" in res.stderr and "one decoder layer is 0.41 GiB" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_index_naming_a_missing_shard_is_named(cli, tmp_path, tiny_llama):
    import shutil

    model = tmp_path / "sharded"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(model / "model-00001-of-00002.safetensors", "pt") as s:
        names = list(s.keys())
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 2
    assert "names shard model-00002-of-00002.safetensors" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.integration
def test_streaming_always_with_pipeline_parallel_is_refused_before_work(cli, tmp_path, tiny_llama):
    res = cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", tmp_path / "out", "--device", "cpu",
              "--set", "calibration.streaming=always", "--set", "export.pp_size=2")
    assert res.exit_code == 2 and "export.pp_size 2" in res.stderr and "calibration.streaming: never" in res.stderr
    assert not (tmp_path / "out").exists()


# -- every precision and every shipped recipe plans (issue 23: `plan llama-ref-nvfp4` was a KeyError) ---------


def test_plan_works_for_every_precision(cli, tmp_path):
    from trtconv.precisions import PRECISIONS

    sizes = {}
    for name in PRECISIONS:
        code, plan = _plan(cli, _recipe(tmp_path / name, LLAMA3_8B, name), "--gpu", "b200-180gb")
        assert code == 0 and plan["fits"], (name, plan["advice"], plan["refusals"])
        sizes[name] = plan["export_bytes"]
    assert sizes["nvfp4"] < sizes["fp8"] < sizes["none"]  # 4.5 bits < 8 bits < 16 bits per linear weight


def test_the_builds_gpu_preflight_plans_every_precision(tmp_path):
    """build's memory plan on a (faked) CUDA device reads the same per-precision bytes: nvfp4 crashed it too."""
    from trtconv.core.environment import DeviceInfo
    from trtconv.core.ui import Reporter
    from trtconv.engine.plan import preflight
    from trtconv.memory_plan import plan_for_build
    from trtconv.pipeline import BuildOptions, memory_plan
    from trtconv.precisions import PRECISIONS
    from trtconv.recipe.schema import recipe_from_dict

    model = _sparse_model(tmp_path / "m8b")
    config = json.loads((model / "config.json").read_text())
    recipes = {name: recipe_from_dict({"name": "p", "model": {"path": str(model)}, "quantization": {"precision": name}}).resolved()
               for name in PRECISIONS}
    for name, recipe in recipes.items():
        preflight(recipe, config, DeviceInfo(**H200), Reporter())
        assert plan_for_build(recipe, config, DeviceInfo(**H200), None).fits, name
    for name, recipe in recipes.items():  # as the load stage calls it: with the -o and cache disks
        plan = memory_plan(recipe, config, DeviceInfo(**H200), BuildOptions(out=tmp_path / "out"), model, None, Reporter())
        assert plan.export_bytes > 0, name


def _reference_folder(tmp_path: Path, name: str) -> Path:
    """A reference model's config.json from its spec, without training it (seconds, not minutes)."""
    from trtconv.data.reference_models import get_spec

    spec = get_spec(name)
    folder = tmp_path / "refs" / name
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "vocab_size")
    config = {"architectures": [spec.architecture], "model_type": spec.model_type, "tie_word_embeddings": False,
              **{k: getattr(spec, k) for k in keys}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_plan_works_for_every_shipped_recipe(cli, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setattr("trtconv.data.reference_models.ensure_reference_model",
                        lambda name, progress=None, **_: _reference_folder(tmp_path, name))
    recipes = sorted((repo / "recipes").glob("*.yaml"))
    assert any("nvfp4" in r.name for r in recipes)
    for recipe in recipes:
        code, plan = _plan(cli, recipe, "--gpu", "b200-180gb")
        assert code == 0 and plan["fits"], (recipe.name, plan.get("error"), plan.get("advice"), plan.get("refusals"))


# -- plan never says "fits" for what build refuses (issue 23 item 4) -----------------------------------------


def test_fp8_on_an_a100_does_not_fit(cli, tmp_path):
    """An A100 (SM 8.0) has no FP8 tensor cores: serving cannot run there, and build refuses an engine for it."""
    recipe = _recipe(tmp_path, LLAMA3_8B, "fp8")
    code, plan = _plan(cli, recipe, "--gpu", "a100-80gb")
    assert code == 4 and not plan["fits"]
    sm = next(c for c in plan["checks"] if c["stage"] == "serve (GPU SM)")
    assert (sm["need_bytes"], sm["have_bytes"], sm["fits"]) == (89, 80, False)
    assert any("needs SM 8.9" in a and "int8_sq" in a and "h100-80gb" in a for a in plan["advice"]), plan["advice"]
    code, plan = _plan(cli, recipe, "--gpu", "a100-80gb", "--set", "engine.target=tensorrt",
                       "--set", "export.tensorrt_llm_checkpoint=true")
    assert code == 4 and any("SM >= 8.9" in r for r in plan["refusals"]), plan["refusals"]
    assert _plan(cli, recipe, "--gpu", "a100-80gb", "--set", "quantization.precision=int8_sq")[0] == 0


def test_tp_size_that_does_not_divide_the_kv_heads_is_bad_input(cli, tmp_path):
    res = cli("plan", _recipe(tmp_path, LLAMA3_8B, "fp8", tp_size=3), "--gpu", "h100-80gb", "--gpus", "4")
    assert res.exit_code == 2, res.stdout
    assert "export.tp_size = 3 does not divide the model's 8 KV heads; allowed tp sizes: 1, 2, 4, 8" in res.stderr


@pytest.mark.parametrize("key, value", [("hidden_size", -4096), ("num_attention_heads", 0), ("vocab_size", 1.5),
                                        ("num_key_value_heads", -8), ("intermediate_size", True)])
def test_dimensions_that_are_not_positive_integers_are_bad_input(cli, tmp_path, key, value):
    res = cli("plan", _recipe(tmp_path, {**LLAMA3_8B, key: value}, "fp8"), "--gpu", "h100-80gb")
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stdout
    assert f"config.json: key '{key}' is {value!r}; allowed: a positive integer" in res.stderr


def _refused_architecture() -> str:
    """An architecture the table has no row for (the table grows: pick one it lacks)."""
    from trtconv.architectures import ARCHITECTURES

    return next(a for a in ("Gemma3ForCausalLM", "Phi3ForCausalLM", "FalconForCausalLM", "NoSuchForCausalLM")
                if a not in ARCHITECTURES)


def test_an_architecture_build_refuses_is_refused_by_plan_and_doctor(cli, tmp_path):
    arch = _refused_architecture()
    recipe = _recipe(tmp_path, {**LLAMA3_8B, "architectures": [arch], "model_type": arch.lower()}, "fp8")
    res = cli("plan", recipe, "--gpu", "h100-80gb")
    assert res.exit_code == 2 and f"architecture ['{arch}'] is not supported" in res.stderr, res.stdout
    from trtconv.cli.doctor import run_doctor

    ok, report = run_doctor(str(recipe))
    assert not ok and any(c["status"] == "fail" and "is not supported" in c["detail"] for c in report["checks"])


def test_a_family_asked_for_but_not_converted_is_refused_with_its_reason(cli, tmp_path):
    """architectures.NOT_CONVERTED: plan (and build, the same load check) names what was measured, not only the list."""
    from trtconv.architectures import NOT_CONVERTED

    arch, why = next(iter(NOT_CONVERTED.items()))
    recipe = _recipe(tmp_path, {**LLAMA3_8B, "architectures": [arch], "model_type": arch.lower()}, "fp8")
    res = cli("plan", recipe, "--gpu", "h100-80gb")
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stdout
    assert f"architecture ['{arch}'] is not supported ({why}); supported: LlamaForCausalLM" in " ".join(res.stderr.split())


def test_plan_refuses_with_the_load_stages_message(cli, tmp_path):
    """One function (stages.load.check_config): plan's message is the one build gives, word for word."""
    from trtconv.core.errors import ModelError
    from trtconv.stages.load import check_config

    arch = _refused_architecture()
    config = {**LLAMA3_8B, "architectures": [arch]}
    recipe = _recipe(tmp_path, config, "fp8")
    with pytest.raises(ModelError) as refused:
        check_config(config, tmp_path / "model")
    assert str(refused.value) in cli("plan", recipe, "--gpu", "h100-80gb").stderr.replace("\n", " ")


def test_the_disk_rows_read_the_free_space(cli, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, LLAMA3_8B, "fp8")
    _free_disk(monkeypatch, 2**30)
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb")
    disk = [c for c in plan["checks"] if c["where"] == "disk"]
    assert code == 4 and [c["fits"] for c in disk] == [False] and disk[0]["have_bytes"] == 2**30
    _free_disk(monkeypatch, 2**30, same_filesystem=False)  # the cache's copy is a second row, on its own disk
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb")
    assert code == 4 and {c["stage"] for c in plan["checks"] if c["where"] == "disk"} == {"export (artifact)", "export (stage cache)"}
    _free_disk(monkeypatch, 100 * 2**30)
    assert _plan(cli, recipe, "--gpu", "h200-141gb")[0] == 0


def test_build_refuses_a_short_disk_before_any_work(tmp_path):
    from trtconv.core.environment import DeviceInfo
    from trtconv.core.errors import UserError
    from trtconv.memory_plan import Disk

    disk = Disk(str(tmp_path), 2**30, str(tmp_path), 2**30, True)
    with pytest.raises(UserError, match=r"export: the export needs [\d.]+ GiB of disk .* 1\.0 GiB free; free space"):
        _build_plan_on_disk(tmp_path, DeviceInfo(**H200), disk)


def _build_plan_on_disk(tmp_path: Path, device, disk):
    from trtconv.memory_plan import plan_for_build
    from trtconv.recipe.schema import recipe_from_dict

    recipe = recipe_from_dict({"name": "plan", "model": {"path": str(tmp_path)}, "quantization": {"precision": "fp8"}}).resolved()
    return plan_for_build(recipe, LLAMA3_8B, device, None, disk=disk)


def test_disk_here_measures_the_nearest_existing_folders(tmp_path, monkeypatch):
    import shutil

    monkeypatch.undo()  # the autouse pin of disk_here
    from trtconv.memory_plan import disk_here

    disk = disk_here(tmp_path / "not" / "yet" / "out", tmp_path / "cache-not-yet")
    assert disk.out == str(tmp_path) and disk.cache == str(tmp_path) and disk.same_filesystem
    assert abs(disk.out_free - shutil.disk_usage(tmp_path).free) < 2**30


def test_plan_and_build_agree_on_a_cpu_cap(cli, tmp_path, monkeypatch):
    """Without --gpu, plan sizes the run as build does on this machine: on a CPU the cap is the budget,
    no CUDA context (they differed about 20x on the reference model: 0.62 against 0.03 GiB)."""
    from trtconv.core.environment import DeviceInfo
    from trtconv.core.errors import UserError
    from trtconv.memory_plan import plan_for_build
    from trtconv.recipe.schema import load_recipe

    cpu = DeviceInfo(kind="cpu", name="cpu", count=2)
    monkeypatch.setattr("trtconv.core.environment.detect_device", lambda prefer="auto", memo=None: cpu)
    config = {**LLAMA3_8B, "num_hidden_layers": 2}
    recipe = _recipe(tmp_path, config, "fp8")
    resolved = load_recipe(str(recipe))[0].resolved()
    for cap, fits in (("40", True), ("3", False)):
        code, plan = _plan(cli, recipe, "--max-gpu-memory", cap)
        assert (code, plan["fits"]) == ((0, True) if fits else (4, False)), plan["advice"]
        assert plan["serve_gpu"] == "h100-80gb" and plan["gpu"] == "cpu (--max-gpu-memory cap)"
        if not fits:
            with pytest.raises(UserError, match=f"--max-gpu-memory {cap} GiB"):
                plan_for_build(resolved, config, cpu, float(cap))
            continue
        built = plan_for_build(resolved, config, cpu, float(cap))
        stages = {(c.stage, c.where): c.need_bytes for c in built.checks if c.stage.startswith(("calibrate", "evaluate"))}
        assert {(c["stage"], c["where"]): c["need_bytes"] for c in plan["checks"] if (c["stage"], c["where"]) in stages} == stages
        assert (plan["streamed"], plan["evaluate_streamed"]) == (built.streamed, built.evaluate_streamed)


def test_a_refusal_tells_the_cap_from_the_need(tmp_path):
    """'--max-gpu-memory 0.03 GiB is less than ... 0.03 GiB; one layer 0.00 GiB' (issue 23 item 10)."""
    import re

    from trtconv.core.environment import DeviceInfo
    from trtconv.core.errors import UserError
    from trtconv.memory_plan import GIB, plan_for_build
    from trtconv.recipe.schema import recipe_from_dict

    tiny = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "vocab_size": 2048}
    cpu = DeviceInfo(kind="cpu", name="cpu", count=2)
    recipe = recipe_from_dict({"name": "t", "model": {"path": str(tmp_path)}, "quantization": {"precision": "fp8"},
                               "calibration": {"streaming": "always"}}).resolved()
    need = next(c.need_bytes for c in plan_for_build(recipe, tiny, cpu, 1.0).checks if c.stage == "calibrate (streamed)")
    cap = round((need - 2**20) / GIB, 6)  # a MiB short: the same at two decimals
    with pytest.raises(UserError) as refused:
        plan_for_build(recipe, tiny, cpu, cap)
    message = str(refused.value)
    have, needs = re.search(r"GiB \(([\d.]+ GiB)\) is less than .* needs, ([\d.]+ GiB)", message).groups()
    assert have != needs and float(have.split()[0]) < float(needs.split()[0]), message
    assert "0.00 GiB" not in message and re.search(r"one decoder layer is [\d.]+ MiB", message), message


@pytest.mark.integration
def test_build_refuses_a_negative_dimension_before_any_work(cli, tmp_path, tiny_llama):
    import shutil

    model = tmp_path / "negative"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": -config["hidden_size"]}))
    res = cli("calibrate", "--model", model, "--precision", "fp8", "-o", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert f"key 'hidden_size' is {-config['hidden_size']}; allowed: a positive integer" in res.stderr
    assert not (tmp_path / "out").exists()


def test_doctor_refuses_what_build_refuses_for_a_reference_model(tmp_path):
    """doctor RECIPE runs the load stage's recipe-against-model check, also for a reference model it does not train."""
    from trtconv.cli.doctor import run_doctor

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "d", "model": {"reference": "llama-ref"}, "quantization": {"precision": "fp8"},
                                  "export": {"tp_size": 3}}))
    ok, report = run_doctor(str(recipe))
    assert not ok and any(c["status"] == "fail" and "export.tp_size = 3 does not divide the model's 2 KV heads" in c["detail"]
                          for c in report["checks"]), report["checks"]


QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
                 "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False}


@pytest.mark.parametrize("config,billions", [(QWEN3_30B_A3B, 30.53), (MIXTRAL_8X7B, 46.70)], ids=["qwen3-30b-a3b", "mixtral-8x7b"])
def test_moe_plan_counts_every_expert(cli, tmp_path, config, billions):
    """Every expert's bytes count (the published sizes: Qwen3-30B-A3B 30.5 B, Mixtral 8x7B 46.7 B parameters)."""
    recipe = _recipe(tmp_path, config, "fp8", tensorrt_llm_checkpoint=False, hf_checkpoint=True)
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb")
    assert code == 0, plan
    assert abs(plan["params"] / 1e9 - billions) < 0.05 * billions
    linear = plan["params"] - 2 * config["vocab_size"] * config["hidden_size"]  # about all of it is FP8 linears
    assert 0.9 * linear < plan["export_bytes"] < 1.1 * linear + 4 * config["vocab_size"] * config["hidden_size"]


def test_experts_count_under_the_key_transformers_saves(cli, tmp_path):
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts (the hub's config says num_experts): the plan
    read only num_experts, so a re-saved Qwen3-30B-A3B (shaped_model.py's, for the GPU runs) counted as 1.1 B dense
    parameters a layer short of its experts, and "fit in memory" under a 10 GiB cap."""
    import transformers

    saved = transformers.Qwen3MoeConfig(**{k: v for k, v in QWEN3_30B_A3B.items() if k not in ("architectures", "model_type")})
    resaved = {**saved.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}
    assert "num_experts" not in resaved and resaved["num_local_experts"] == 128
    plans = [_plan(cli, _recipe(tmp_path / name, cfg, "fp8", tensorrt_llm_checkpoint=False, hf_checkpoint=True), "--gpu", "h100-80gb")[1]
             for name, cfg in (("hub", QWEN3_30B_A3B), ("resaved", resaved))]
    assert plans[0]["params"] == plans[1]["params"] and abs(plans[1]["params"] / 1e9 - 30.53) < 1.5


def test_plan_streams_a_moe_family_on_one_gpu(cli, tmp_path):
    """Qwen3-30B-A3B (57 GiB in bf16) on one H100: calibration and the unified HF export fit in memory and evaluation
    streams layer by layer (on a GPU always); under a 40 GiB cap calibration streams too. Every expert's bytes are in
    the layer the streamed rows count."""
    recipe = _recipe(tmp_path, QWEN3_30B_A3B, "fp8", tensorrt_llm_checkpoint=False, hf_checkpoint=True)
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb")
    assert code == 0 and not plan["streamed"] and plan["evaluate_streamed"] and plan["fits"] and not plan["refusals"], plan
    code, capped = _plan(cli, recipe, "--gpu", "h100-80gb", "--max-gpu-memory", "40")
    assert code == 0 and capped["streamed"] and capped["evaluate_streamed"] and capped["fits"], capped
    experts = 48 * 128 * 3 * 2048 * 768 * 2  # bf16 expert weights of every layer
    assert 0.95 * experts < 48 * plan["layer_bytes"] < 1.1 * experts
    streamed = next(c for c in plan["checks"] if c["stage"] == "calibrate (streamed)" and c["where"] == "gpu")
    assert streamed["need_bytes"] > plan["layer_bytes"] * 1.25  # the layer, its exported copy and ModelOpt's temporaries


def test_what_the_streamed_path_cannot_do_is_one_refusal(cli, tmp_path):
    """pp_size 2 under a cap that streams: plan refuses it by name (exit 4), as build does (stages.streamed.check_supported,
    through memory_plan.streamed_refusals, the one function plan, doctor and build call)."""
    from trtconv.core.errors import UserError
    from trtconv.memory_plan import plan_for_gpu, plan_for_build
    from trtconv.recipe.schema import load_recipe

    recipe = _recipe(tmp_path, QWEN3_30B_A3B, "fp8", tensorrt_llm_checkpoint=False, hf_checkpoint=True, pp_size=2)
    code, plan = _plan(cli, recipe, "--gpu", "h100-80gb", "--max-gpu-memory", "40")
    assert plan["streamed"] and not plan["fits"], plan
    assert any("export.pp_size 2 is not supported by the layer-streamed path" in r for r in plan["refusals"]), plan
    r = load_recipe(str(recipe))[0].resolved()
    assert plan_for_gpu(r, QWEN3_30B_A3B, "h100-80gb", max_gpu_memory_gib=40).refusals == plan["refusals"]
    from trtconv.memory_plan import catalogue_device, resolve_gpu

    with pytest.raises(UserError, match="export.pp_size 2"):
        plan_for_build(r, QWEN3_30B_A3B, catalogue_device(resolve_gpu("h100-80gb")), 40)


def test_the_split_over_gpus_refuses_the_unified_checkpoint(tmp_path):
    """--gpus 2 with export.hf_checkpoint: the layer-streamed unified export runs on one device; the refusal is the
    streamed check's (plan, doctor and build)."""
    from trtconv.memory_plan import streamed_refusals
    from trtconv.recipe.schema import load_recipe

    r = load_recipe(str(_recipe(tmp_path, QWEN3_30B_A3B, "fp8", tensorrt_llm_checkpoint=False, hf_checkpoint=True)))[0].resolved()
    assert streamed_refusals(r, 1) == []
    assert "--gpus 2: the unified HF checkpoint" in streamed_refusals(r, 2)[0]


# DeepSeek-V3's config.json as the hub ships it (the keys the plan and transformers read; no head_dim: the plan must
# not take hidden / heads for its attention).
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
               "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
               "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "num_attention_heads": 128,
               "num_key_value_heads": 128, "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
               "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
               "max_position_embeddings": 163840, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


def test_deepseek_v3_plan_counts_latent_attention_shared_experts_and_dense_layers(cli, tmp_path):
    """DeepSeek-V3: 671,026,404,352 parameters, what transformers 5 builds from this config (measured on the meta
    device; the multi-token-prediction layer it does not load is not counted); the KV cache is one latent a token and
    layer ((kv_lora_rank + qk_rope_head_dim) x 2 bytes, 68.6 KiB over 61 layers), not k and v of 128 heads; the
    streamed layer is a MoE layer (every expert, the shared one); the advice does not offer the FP8 KV cache the
    family refuses."""
    recipe = _recipe(tmp_path, DEEPSEEK_V3, "fp8", tensorrt_llm_checkpoint=False, hf_checkpoint=True, tp_size=8)
    code, plan = _plan(cli, recipe, "--gpu", "h200-141gb")
    assert code in (0, 4), plan
    assert plan["params"] == 671_026_404_352
    assert plan["kv_bytes_per_token"] == 61 * (512 + 64) * 2
    moe_linears = 3 * 7168 * 2048 * (256 + 1)  # routed and shared experts
    attention = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168
    assert plan["layer_bytes"] == 2 * (moe_linears + attention + 2 * 7168 + 1536 + 512 + 256 * 7168)
    assert 0.97 * 671e9 < plan["export_bytes"] < 671e9 + 2 * 2 * 129280 * 7168  # one byte per linear weight + the outer
    assert not any("fp8 KV" in a or "kv_cache: fp8" in a for a in plan["advice"]), plan["advice"]


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"n_shared_experts": 2, "first_k_dense_replace": 0},
                                       {"first_k_dense_replace": 3}], ids=["tiny", "no-q-latent", "two-shared-no-dense", "all-dense"])
def test_deepseek_shape_counts_what_transformers_builds(overrides):
    """The plan's arithmetic equals the parameter count of the model transformers 5 builds (meta device), for the tiny
    factory's DeepSeek-V3 and its variants: no q latent (q_proj), two shared experts, no or only dense layers."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.factories import tiny_config
    from trtconv.memory_plan import Shape

    cfg = tiny_config("deepseek_v3", **overrides)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert Shape.from_config(json.loads(cfg.to_json_string())).params() == sum(p.numel() for p in model.parameters())


def test_deepseek_keys_left_out_are_planned_as_transformers_fills_them():
    """A DeepSeek-V3 config.json without the latent widths, the shared experts or the dense-layer count builds with
    transformers' defaults (kv_lora_rank 512, q_lora_rank 1536, one shared expert, three dense layers); the plan counts
    the same model, where it crashed (KeyError) or counted no q latent, no shared expert and no dense layer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.factories import tiny_config
    from trtconv.memory_plan import Shape

    cfg = json.loads(tiny_config("deepseek_v3").to_json_string())
    left_out = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_shared_experts",
                "first_k_dense_replace", "qk_head_dim", "head_dim")  # the last two: derived ones transformers saves
    for key in left_out:
        cfg.pop(key)
    cfg.update(architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=5)  # 3 dense (the default) and 2 MoE layers
    built = AutoConfig.for_model(**cfg)
    assert built.kv_lora_rank == 512 and built.first_k_dense_replace == 3  # transformers' defaults did fill them
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(built)
    assert Shape.from_config(cfg).params() == sum(p.numel() for p in model.parameters())
