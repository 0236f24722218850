"""The pipeline: load -> calibrate -> export -> engine -> evaluate -> manifest, one exit code.

Each stage lives in its own module with one small entry point; this file only sequences them,
times them, and writes the artifact atomically. Everything that can be checked before the
expensive work (recipe, output folder, model folder, data, engine plan, precision on this device)
is checked first, so a mistake costs seconds, not an hour of calibration.
"""

from __future__ import annotations

import datetime as _dt
import errno
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


from trtconv import __version__
from trtconv.artifact.writer import ArtifactWriter
from trtconv.cache import runs
from trtconv.cache.store import StageCache, use_torch_extensions_cache
from trtconv.core.environment import detect_device, host_summary, numeric_environment, package_versions
from trtconv.core import interrupts
from trtconv.core.errors import ArtifactError, GateFailed, Interrupted, UserError
from trtconv.artifact.manifest import Manifest, StageRecord, artifact_digest, hash_tree, write_manifest
from trtconv.recipe.schema import Recipe
from trtconv.artifact.report import check_junit_path, preload_plotting, write_junit, write_report
from trtconv.core.ui import Reporter
from trtconv.stages import engine as engine_stage
from trtconv.stages import evaluate as evaluate_stage
from trtconv.stages.base import Laps, StageMeter
from trtconv.stages.devices import check_gpus, check_split
from trtconv.stages.load import all_inputs, check_recipe_against_model, data_packs
from trtconv.artifact.layout import CHECKPOINT_DIR, ENGINE_DIR, HF_CHECKPOINT_DIR, RECIPE_NAME


DEVICE_MEMO = "host-device.json"  # in the cache folder: core.environment.detect_device's memo


@dataclass
class BuildOptions:
    out: Path
    force: bool = False
    require_engine: bool = False
    device: str = "auto"  # auto | cpu | cuda
    command: list[str] = field(default_factory=list)
    junit: Path | None = None  # write each gate as a JUnit test case here
    no_cache: bool = False  # neither read nor write the stage cache
    repro_check: bool = False  # calibrate + export a second time and compare every tensor
    max_gpu_memory_gib: float | None = None  # cap on GPU memory (CUDA: enforced; CPU: drives the memory plan)
    gpus: int = 1  # devices of this host the layer-streamed path splits over (trtconv.stages.devices)


@dataclass
class BuildOutcome:
    manifest: Manifest
    path: Path  # where the artifact was written (OUT, or OUT.failed when a good one was kept)


# ---------------------------------------------------------------------------------------------
# Time and memory per stage


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (CI cancelling a job) cleans up exactly like Ctrl-C (recorded first: core.interrupts)."""
    try:
        previous = signal.signal(signal.SIGTERM, interrupts.on_signal)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Pre-flight: every cheap check before any expensive work


# ---------------------------------------------------------------------------------------------
# The run

_STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                   errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}


def storage_failure(exc: BaseException) -> str | None:
    """A full, read-only or forbidden disk, however the writing library reports it (an OSError, or
    safetensors' own error carrying "os error 28"), as a message; None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return exc.strerror or _STORAGE_ERRNOS[exc.errno]
    text = str(exc)
    for code, message in _STORAGE_ERRNOS.items():
        if f"os error {code})" in text or message in text:
            return message
    return None



def build(recipe: Recipe, opts: BuildOptions, reporter: Reporter) -> BuildOutcome:
    recipe = recipe.resolved()
    with sigterm_as_interrupt():
        try:
            return _build(recipe, opts, reporter)
        except KeyboardInterrupt:
            interrupts.acknowledge()  # the run ends here: its own messages must not be interrupted again
            raise Interrupted(f"interrupted; nothing was written to {opts.out} (the previous artifact, if any, is intact)") from None
        except (UserError, GateFailed):
            raise
        except Exception as exc:
            reason = storage_failure(exc)
            if reason is None:
                raise
            raise ArtifactError(
                f"cannot write {getattr(exc, 'filename', None) or opts.out}: {reason}; nothing was written to {opts.out} "
                "(the previous artifact, if any, is intact): free space or choose another -o / TRTCONV_CACHE"
            ) from None


def _build(recipe: Recipe, opts: BuildOptions, reporter: Reporter) -> BuildOutcome:
    from trtconv.checkpoints.hf_model import compute_dtype, import_model_class, load_hf_model, load_tokenizer, release_memory
    from trtconv.data import samples
    from trtconv.engine.plan import check_cuda_forward, preflight as check_engine
    from trtconv.precisions import PRECISIONS
    from trtconv.gate import stats as evaluate
    from trtconv.stages import export, load
    from trtconv.core.imports import start_modelopt_import
    from trtconv.core.ui import silence_library_progress_bars

    use_torch_extensions_cache()
    cache = None if opts.no_cache else StageCache()
    # Remembered per host (no torch import): most of an unchanged recipe's whole-run hit was importing torch.
    device = detect_device(opts.device, memo=cache.root / DEVICE_MEMO if cache is not None else None)
    torch_device = "cuda" if device.kind == "cuda" else "cpu"
    stages: list[StageRecord] = []
    writer = ArtifactWriter(opts.out, force=opts.force, note=reporter.info)
    writer.preflight()  # output folder problems first: they cost nothing to find
    if opts.junit:
        check_junit_path(opts.junit)  # written at the very end: a bad path must not cost the whole run
    engine_stage.check_required(recipe, opts.require_engine)
    devices = check_gpus(opts.gpus, device)  # a bad --gpus costs nothing
    for name in recipe.quantization.precisions_used:  # before a reference model trains (auto: every candidate)
        check_cuda_forward(PRECISIONS[name], device.kind)
    started = time.monotonic()
    run_key = whole_run_key(recipe, opts, device, reporter) if cache is not None and not opts.repro_check else None
    if run_key is not None:
        with writer:
            manifest = runs.restore(cache, run_key, writer.tmp, opts.command, started, reporter)
            if manifest is not None:
                return _finish(manifest, writer, opts, reporter)
    cap_gpu_memory(device, opts.max_gpu_memory_gib)  # imports torch: after the whole-run check, which needs none of it
    silence_library_progress_bars()  # imports transformers: likewise

    with StageMeter("load") as m:
        reporter.stage("load", "resolving the model")
        # Hashing starts inside: the checks below (and the tensor check) run meanwhile.
        model_dir, hf_cfg, arch, weights, hashing = load.run(recipe.model, progress=reporter.info, remembered=cache is not None)
        check_recipe_against_model(recipe, hf_cfg, model_dir)
        check_engine(recipe, hf_cfg, device, reporter)
        memory = memory_plan(recipe, hf_cfg, device, opts, model_dir, cache, reporter)
        check_split(devices.count, memory.streamed)
        calib_packs = data_packs(recipe.calibration.data, "calibration")
        eval_packs = data_packs(recipe.evaluate.data, "evaluation")
        tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
        # First-time hashes never hold the run up: without them no cache entry can be found anyway
        # (only one whose files were merely touched since, which is then rebuilt), so the expensive
        # unit starts at once and the keys are made when the hashes are in, before anything is stored.
        inputs = export_key = None
        if not hashing.pending:
            inputs, export_key = _keys(recipe, model_dir, weights, hashing, calib_packs, eval_packs, device)
        if recipe.quantization.quantizes and not (cache and export_key and export.is_cached(cache, export_key)):
            import_model_class(hf_cfg)  # first, on this thread: see hf_model.import_model_class
            start_modelopt_import()  # 6-8 s on a thread of its own, under the model load (trtconv.core.imports)
        preloaded = None
        if hashing.pending and not memory.streamed:
            # Files not hashed before (or changed): load the model while the thread hashes them,
            # rather than first hashing 16 GB and then reading it again. Wasted only on a cache hit
            # for files merely touched since.
            reporter.stage("load", "hashing the checkpoint (first time) while loading the model")
            preloaded = load_hf_model(model_dir, compute_dtype(recipe.model.dtype, torch_device), recipe.model.trust_remote_code,
                                       torch_device)
    stages.append(m.record(architecture=arch, model_dir=str(model_dir), model_loaded=preloaded is not None,
                           hashing="overlapped" if export_key is None else "remembered"))

    calib_tokens = samples.calibration_rows(
        calib_packs, tokenizer, recipe.calibration.num_samples, recipe.calibration.seq_len, recipe.calibration.seed
    )
    eval_tokens = None
    if recipe.evaluate.enabled:
        eval_tokens = samples.evaluation_rows(
            eval_packs, tokenizer, recipe.evaluate.num_samples, recipe.evaluate.seq_len, recipe.evaluate.seed
        )
        samples.check_disjoint(calib_tokens, eval_tokens)

    storing = None
    with writer:
        cached = export.restore_export(cache, export_key, writer.tmp, reporter) if cache and export_key else None
        if cached is not None:
            preloaded = None
            release_memory()
            exported = export.ExportResult.from_record(cached["export"], writer.tmp)
            calib_record = cached["calibration"]
            for rec in cached["stages"]:
                rec = StageRecord.model_validate(rec)
                reporter.stage(rec.name, f"reused from the cache (key {export_key[:12]}, saves {rec.wall_s:.1f} s)")
                stages.append(rec.model_copy(update={"status": "reused", "details": {**rec.details, "cache_key": export_key}}))
        else:
            model, preloaded = preloaded, None  # handed over: the unit drops the last reference when done
            exported, calib_record, unit_stages = run_calibrate_and_export(recipe, model_dir, arch, tokenizer, calib_tokens, writer.tmp,
                                                                           torch_device, reporter, model=model, streamed=memory.streamed,
                                                                           devices=devices)
            del model
            release_memory()  # the calibrated model goes before evaluation loads the original
            stages += unit_stages
            if export_key is None:
                inputs, export_key = _keys(recipe, model_dir, weights, hashing, calib_packs, eval_packs, device)
            if cache and time_bound(calib_record):
                reporter.warn("not cached: precision auto stopped on search.time_budget_s, so which trial was exported "
                              "depends on this host's speed and load (a rerun searches again)")
            elif cache:
                meta = {"export": exported.manifest_record(), "calibration": calib_record,
                        "stages": [r.model_dump(mode="json") for r in unit_stages]}
                storing = export.BackgroundStore(cache, export_key, writer.tmp, meta)  # overlaps evaluation
                writer.wait_on_exit(storing.wait)

        reproducibility = {}
        if opts.repro_check:
            reproducibility = repro_check(recipe, model_dir, arch, tokenizer, calib_tokens, writer, torch_device, reporter)

        engine_record, engine_meter = engine_stage.run(recipe, writer.tmp, opts.require_engine, reporter)
        stages.append(engine_meter)

        outcome_eval = None
        if eval_tokens is not None:
            preload_plotting()  # the report's plots, imported under the evaluation
            # A built engine may be the candidate: its files are part of what the statistics depend on.
            engine_files = hash_tree(writer.tmp / ENGINE_DIR) if engine_record.get("status") == "built" else []
            eval_key = evaluate_stage.evaluate_key(recipe, export_key, samples.packs_sha256(eval_packs), device,
                                          engine_files=[(f.path, f.sha256) for f in engine_files])
            outcome_eval, eval_meter = evaluate_stage.run(recipe, model_dir, eval_tokens, eval_key, cache, writer, torch_device,
                                                          reporter, engine_record=engine_record, streamed=memory.evaluate_streamed,
                                                          park=memory.evaluate_parks, devices=devices)
            stages.append(eval_meter)
        metrics = outcome_eval.summary if outcome_eval else {}
        gates = outcome_eval.gates if outcome_eval else []
        evaluation = outcome_eval.record if outcome_eval else {}

        passed = evaluate.gates_passed(gates, recipe.evaluate.allow_inconclusive)
        if not passed and recipe.evaluate.sensitivity and recipe.quantization.precision not in ("none", "auto"):
            with StageMeter("sensitivity") as m:
                evaluation = {**evaluation, "advice": advise(recipe, model_dir, writer.tmp, eval_tokens, metrics, torch_device, reporter,
                                                             streamed=memory.streamed or memory.evaluate_streamed,
                                                             export_cached=cached is not None)}
            stages.append(m.record())
        (writer.tmp / RECIPE_NAME).write_text(recipe.to_yaml(), encoding="utf-8")
        manifest = Manifest(
            trtconv_version=__version__,
            command=opts.command,
            created_utc=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            status="passed" if passed else "failed",
            status_reason="" if passed else "accuracy gate failed: " + ", ".join(g.metric for g in gates if g.verdict != "pass")
            + (search_note(calib_record["search"]) if calib_record.get("search") else ""),
            recipe=recipe.model_dump(mode="json"),
            recipe_sha256=recipe.sha256(),
            inputs=all_inputs(inputs, recipe, calib_packs, eval_packs),
            versions=package_versions(),
            device=device.to_dict(),
            host=host_summary(),
            environment=numeric_environment(),
            seeds={"calibration": recipe.calibration.seed, "evaluation": recipe.evaluate.seed},
            calibration={**calib_tokens.manifest_record(), **calib_record},
            evaluation=evaluation,
            export={**exported.manifest_record(), **({"reproducibility": reproducibility} if reproducibility else {})},
            engine=engine_record,
            stages=stages,
            metrics=metrics,
            gates=gates,
        )
        with StageMeter("finish") as m:  # report, the export's cache entry, the outputs' hashes, the whole-run entry
            laps = Laps()
            if outcome_eval is not None:
                write_report(writer.tmp, manifest, outcome_eval.weight_errors, outcome_eval.stats.token_kl)
            laps.lap("report")
            if storing is not None:
                storing.finish(reporter)  # its hashes are noted: the outputs below are not read again
            laps.lap("export_cache_wait")
            manifest.outputs = hash_tree(writer.tmp, reuse_noted=True)
            manifest.artifact_digest = artifact_digest(manifest.outputs)
            laps.lap("outputs_hashed")
            if cache is not None and not opts.repro_check and not time_bound(calib_record):  # the inputs' hashes are all known now
                key = runs.run_key(recipe, manifest.inputs, device, opts.require_engine, opts.max_gpu_memory_gib, opts.gpus)
                runs.store(cache, key, writer.tmp, manifest, reporter)
            laps.lap("run_cached")
        manifest.stages.append(m.record(seconds=laps.seconds))  # after the report and the run's cache entry: neither lists it
        return _finish(manifest, writer, opts, reporter)


def time_bound(calib_record: dict) -> bool:
    """precision auto stopped on its time budget: the exported trial depends on the host's speed and load,
    not only on the inputs, so neither cache keeps it (the same inputs must give the same bytes)."""
    return str((calib_record.get("search") or {}).get("stop_reason", "")).startswith("search.time_budget_s")


def search_note(record: dict) -> str:
    """precision auto's part of a failed build's status_reason (trtconv.stages.search)."""
    if not record["passed"]:
        return f"; precision auto: {record['stop_reason']}"
    rows = record.get("measured_on") or "its rows"
    stopped = f" (the search stopped early: {record['stop_reason']})" if record.get("stop_reason") else ""
    return (f"; precision auto: trial {record['chosen_trial']} passed the search's gates on {rows}, the shipped "
            f"files failed the evaluation's{stopped}")


def _finish(manifest: Manifest, writer: ArtifactWriter, opts: BuildOptions, reporter: Reporter) -> BuildOutcome:
    """Write the manifest, put the artifact in place (a failed one never over a good one), raise GateFailed if it failed."""
    if opts.junit:
        write_junit(opts.junit, manifest.gates, manifest.recipe["name"], manifest.recipe["evaluate"]["allow_inconclusive"])
    write_manifest(manifest, writer.tmp)
    passed = manifest.status == "passed"
    interrupts.check("commit")  # the last moment an interrupt leaves nothing behind
    with interrupts.deferred():  # a rename is never stopped half-way
        interrupts.point("renaming")
        path = writer.commit() if passed else writer.commit_failed()
    if interrupts.requested():
        interrupts.acknowledge()
        raise Interrupted(f"interrupted while {path} was put in place: the artifact there is complete")
    outcome = BuildOutcome(manifest=manifest, path=path)
    if not passed:
        raise GateFailed(outcome)
    return outcome


def whole_run_key(recipe: Recipe, opts: BuildOptions, device, reporter: Reporter) -> str | None:
    """The whole-run cache key (trtconv.cache.runs), when every input's hash is remembered; else None."""
    from trtconv.stages import load

    model_inputs = load.remembered_inputs(recipe.model, progress=reporter.info)
    if model_inputs is None:
        return None
    inputs = all_inputs(model_inputs, recipe, data_packs(recipe.calibration.data, "calibration"),
                        data_packs(recipe.evaluate.data, "evaluation"))
    return runs.run_key(recipe, inputs, device, opts.require_engine, opts.max_gpu_memory_gib, opts.gpus)


def _keys(recipe: Recipe, model_dir: Path, weights: list[Path], hashing, calib_packs, eval_packs, device) -> tuple[list, str]:
    """The model's input records (waiting for its hashes) and the export's cache key (precision auto: the
    evaluation packs too, whose unused documents its trials are measured on)."""
    from trtconv.data import samples
    from trtconv.stages import export, load

    inputs = load.describe_inputs(model_dir, weights, hashing)
    validation = None
    if recipe.quantization.is_auto:
        from trtconv.stages.search import validation_key

        validation = {"data_sha256": samples.packs_sha256(eval_packs), **validation_key(recipe)}
    return inputs, export.export_key(recipe, inputs, samples.packs_sha256(calib_packs), device, validation)


def cap_gpu_memory(device, cap_gib: float | None) -> None:
    """`--max-gpu-memory`: on CUDA a hard cap through torch's allocator; on CPU it only drives the plan."""
    if cap_gib is None or device.kind != "cuda":
        return
    import torch

    for idx in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(idx).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), idx)


def memory_plan(recipe: Recipe, hf_cfg: dict, device, opts: BuildOptions, model_dir: Path, cache, reporter: Reporter):
    """The memory plan `trtconv plan` prints, against this device and the free disk at -o and the
    stage cache: which calibration and evaluation paths run, or a refusal."""
    from trtconv.checkpoints.hf_layers import WeightIndex
    from trtconv.memory_plan import disk_here, plan_for_build

    layer_bytes = WeightIndex(model_dir).layer_bytes(0) if recipe.calibration.streaming != "never" else None
    disk = disk_here(opts.out, cache.root if cache is not None else opts.out)
    plan = plan_for_build(recipe, hf_cfg, device, opts.max_gpu_memory_gib, layer_bytes, disk, split=opts.gpus)
    if plan.streamed:  # what the streamed path cannot do was refused by plan_for_build (memory_plan.streamed_refusals)
        from trtconv.memory_plan import calibration_reason

        reporter.stage("load", f"memory plan: layer-streamed calibration ({calibration_reason(plan)})")
    elif plan.evaluate_streamed:
        from trtconv.memory_plan import evaluation_reason

        reporter.stage("load", f"memory plan: calibration in memory, evaluation layer-streamed{evaluation_reason(plan)}")
    return plan


def advise(recipe: Recipe, model_dir: Path, root: Path, eval_tokens, metrics: dict, device: str, reporter: Reporter,
           streamed: bool = False, export_cached: bool = False) -> dict:
    """A failed gate's way forward (trtconv.gate.sensitivity): the worst layers, a measured exclude list, other
    precisions; read from the checkpoint the gate judged in `root` (no second calibration), layer by layer
    where the memory plan streamed the build, and layer by layer again if holding the original runs out of memory."""
    from trtconv.checkpoints.hf_model import release_memory
    from trtconv.gate import sensitivity
    from trtconv.gate.layer_streams import can_stream
    from trtconv.stages.evaluate import candidate_dir

    measured_kl = max(m["mean_kl"]["value"] for m in [metrics, *(metrics.get("packs") or {}).values()])
    streamable = can_stream(recipe.model.trust_remote_code)
    streamed = streamed and streamable
    checkpoint = candidate_dir(recipe, root)
    reused = {"checkpoint": checkpoint.name, "export": "restored from the stage cache" if export_cached else "built by this run"}
    how = "layer by layer" if streamed else "the original in memory"
    reporter.stage("sensitivity", f"a gate failed: measuring which decoder layers cost the most accuracy ({checkpoint.name}/, {how})")
    release_memory()  # what evaluation dropped, before the original is read again
    try:
        try:
            result = sensitivity.run(model_dir, checkpoint, recipe, eval_tokens, measured_kl, device, reporter, streamed, reused)
        except Exception as exc:
            if streamed or not streamable or not _out_of_memory(exc):
                raise
            release_memory()
            reporter.warn("sensitivity: out of GPU memory with the original in memory; measuring layer by layer instead")
            result = sensitivity.run(model_dir, checkpoint, recipe, eval_tokens, measured_kl, device, reporter, True, reused)
        record = result.record()
    except (UserError, RuntimeError, ValueError, AttributeError, KeyError) as exc:
        # Advice is a help, not a stage that can lose the failed artifact and its numbers.
        reporter.warn(f"no layer advice: the sensitivity pass failed ({exc})")
        return {"error": str(exc)}
    finally:
        release_memory()
    for line in sensitivity.advice_lines(record, recipe.quantization.exclude, recipe.evaluate.gates.max_kl):
        reporter.stage("advice", line)
    return record


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_calibrate_and_export(recipe: Recipe, model_dir: Path, arch: str, tokenizer, calib_tokens, root: Path, device: str,
                             reporter: Reporter, model=None, streamed: bool = False, devices=None):
    """The expensive unit: load the model (unless the load stage already did), calibrate it,
    export it into root. Returns its records."""
    from trtconv.checkpoints.hf_model import compute_dtype, load_hf_model
    from trtconv.stages import calibrate, export

    if streamed:
        return run_streamed(recipe, model_dir, arch, tokenizer, calib_tokens, root, device, reporter, devices)
    if recipe.quantization.is_auto:  # the per-layer search calibrates every candidate (trtconv.stages.search)
        from trtconv.stages import search

        return search.run_unit(recipe, model_dir, arch, tokenizer, calib_tokens, root, device, reporter, model=model)
    stages = []
    with StageMeter("calibrate") as m:
        dtype = compute_dtype(recipe.model.dtype, device)
        if model is None:
            reporter.stage("calibrate", f"loading the model from {model_dir}")
            model = load_hf_model(model_dir, dtype, recipe.model.trust_remote_code, device)
        computes = dtype if dtype == recipe.model.dtype else f"computing in {dtype} on the {device}, exporting {recipe.export.dtype}"
        reporter.stage("calibrate", f"{arch} ({model.num_parameters() / 1e6:.1f} M parameters, {computes}) to "
                       f"{recipe.quantization.precision} (kv cache {recipe.quantization.kv_cache}), "
                       f"{len(calib_tokens.rows)} x {recipe.calibration.seq_len} tokens")
        group = calibrate.choose_group_size(model, recipe.quantization, recipe.export.tp_size)
        if group.note:
            reporter.stage("calibrate", group.note)
        quantization = recipe.quantization.model_copy(update={"awq_group_size": group.size})
        calib = calibrate.run(model, quantization, calib_tokens, recipe.calibration.batch_size, device, reporter)
    stages.append(
        m.record(status="ok" if calib.quant_config else "skipped", quantizers=calib.census, modelopt_output=calib.dependency_output,
                 compute_dtype=dtype, **({"experts": calib.experts} if calib.experts is not None else {}))
    )
    with StageMeter("export") as m:
        written = ([f"TensorRT-LLM checkpoint, tp={recipe.export.tp_size} pp={recipe.export.pp_size}"] if recipe.export.tensorrt_llm_checkpoint
                   else []) + (["unified HF checkpoint"] if recipe.export.hf_checkpoint else [])
        reporter.stage("export", " and ".join(written))
        exported = export.run(model, tokenizer, model.config, arch, recipe.export, quantization, root)
        for r in exported.repairs:
            reporter.stage("export", f"repaired config.json {r.key}: {r.before!r} -> {r.after!r}")
    stages.append(m.record(repairs=len(exported.repairs), seconds=exported.seconds))
    experts = {"experts": calib.experts} if calib.experts is not None else {}
    return exported, {"quant_config": calib.quant_config, "census": calib.census, "compute_dtype": dtype, **group.record(),
                      "path": "in_memory", **experts}, stages


def run_streamed(recipe: Recipe, model_dir: Path, arch: str, tokenizer, calib_tokens, root: Path, device: str, reporter: Reporter,
                 devices=None):
    """The same unit, one decoder layer at a time (calibrate and export interleave: one meter for both);
    with several `devices` the layers are split over them (trtconv.stages.devices)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trtconv.checkpoints.hf_model import compute_dtype
    from trtconv.stages import calibrate, streamed

    with StageMeter("calibrate") as m:
        # The AWQ group size is chosen from the layers' shapes, here of a model on the meta device.
        with torch.device("meta"):
            shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        group = calibrate.choose_group_size(shapes, recipe.quantization, recipe.export.tp_size)
        del shapes
        if group.note:
            reporter.stage("calibrate", group.note)
        chosen = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"awq_group_size": group.size})})
        exported, record, log = streamed.run(chosen, model_dir, arch, tokenizer, calib_tokens, root, device, reporter, devices)
    dtype = compute_dtype(recipe.model.dtype, device)
    split = {"devices": devices.record()} if devices is not None and devices.count > 1 else {}
    stage = m.record(status="ok", quantizers=record["census"], modelopt_output=log, path="streamed",
                     repairs=len(exported.repairs), compute_dtype=dtype, seconds=exported.seconds, **split)
    return exported, {**record, "compute_dtype": dtype, **group.record(), "path": "streamed"}, [stage]


def repro_check(recipe: Recipe, model_dir: Path, arch: str, tokenizer, calib_tokens, writer, device: str, reporter: Reporter) -> dict:
    """`--repro-check`: calibrate and export again from scratch; every tensor must match bit for bit."""
    import torch
    from safetensors import safe_open

    second = writer.tmp.parent / f"{writer.tmp.name}.repro"
    reporter.stage("repro-check", "calibrating and exporting a second time")
    try:
        run_calibrate_and_export(recipe, model_dir, arch, tokenizer, calib_tokens, second, device, reporter)
        differing, compared = [], 0
        # Both checkpoints the unit writes (an HF-only recipe, precision auto included, has only the second).
        firsts = [f for folder in (CHECKPOINT_DIR, HF_CHECKPOINT_DIR) for f in sorted((writer.tmp / folder).glob("*.safetensors"))]
        for first_file in firsts:
            other = second / first_file.relative_to(writer.tmp)
            if not other.is_file():
                differing.append({"file": str(first_file.relative_to(writer.tmp)), "tensor": "(file missing in the second run)",
                                  "max_abs_diff": float("inf")})
                continue
            with safe_open(first_file, "pt") as a, safe_open(other, "pt") as b:
                for name in a.keys():
                    compared += 1
                    x, y = a.get_tensor(name), b.get_tensor(name)
                    if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                        diff = (x.float() - y.float()).abs().max().item() if x.shape == y.shape else float("inf")
                        differing.append({"file": str(first_file.relative_to(writer.tmp)), "tensor": name, "max_abs_diff": diff})
        differing.sort(key=lambda d: -d["max_abs_diff"])
        if not compared and not differing:
            verdict = "nothing compared: the run wrote no checkpoint tensors"
        elif not differing:
            verdict = "identical"
        else:
            verdict = f"{len(differing)} of {compared} tensors differ (largest {differing[0]['max_abs_diff']:.3g} in {differing[0]['tensor']})"
        if differing or not compared:
            reporter.warn(f"repro-check: {verdict}")
        else:
            reporter.stage("repro-check", verdict)
        return {"tensors_compared": compared, "identical": bool(compared) and not differing, "differing": differing[:50]}
    finally:
        shutil.rmtree(second, ignore_errors=True)


