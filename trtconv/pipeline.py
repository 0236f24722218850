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
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtconv import __version__
from trtconv.artifact.writer import ArtifactWriter, sha256_file
from trtconv.cache.store import StageCache
from trtconv.core.environment import detect_device, host_summary, numeric_environment, package_versions
from trtconv.core.errors import ArtifactError, DataError, GateFailed, Interrupted, UserError
from trtconv.artifact.manifest import FileRecord, InputRecord, Manifest, StageRecord, artifact_digest, hash_tree, write_manifest
from trtconv.precisions import KV_CACHE_FORMATS, PRECISIONS
from trtconv.recipe.schema import Recipe
from trtconv.artifact.report import write_junit, write_report
from trtconv.core.ui import Reporter, stage_phase


ENGINE_DIR = "engine"


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


@dataclass
class BuildOutcome:
    manifest: Manifest
    path: Path  # where the artifact was written (OUT, or OUT.failed when a good one was kept)


# ---------------------------------------------------------------------------------------------
# Time and memory per stage


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class StageMeter:
    """Wall time, peak resident memory (sampled every 50 ms) and peak CUDA memory of one stage."""

    def __init__(self, name: str):
        self.name = name
        self.peak_rss = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            rss = _rss_mib()
            if rss is not None:
                self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self) -> StageMeter:
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = _rss_mib() or 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._phase = stage_phase(self.name)  # spinner / CI heartbeat, and a closing line with the time
        self._phase.__enter__()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._phase.__exit__(*exc)
        self.wall_s = time.monotonic() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, _rss_mib() or 0.0)
        self.peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def record(self, status: str = "ok", **details) -> StageRecord:
        return StageRecord(
            name=self.name,
            status=status,
            wall_s=round(self.wall_s, 3),
            peak_rss_mib=round(self.peak_rss, 1),
            peak_gpu_mib=round(self.peak_gpu, 1) if self.peak_gpu is not None else None,
            details=details,
        )


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (CI cancelling a job) cleans up exactly like Ctrl-C."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Pre-flight: every cheap check before any expensive work


def data_path(section_data: str | None, builtin: str) -> Path:
    from trtconv.data.packs import builtin_pack

    if section_data is None:
        return builtin_pack(builtin)
    path = Path(section_data)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; give a .jsonl, .txt or a folder of them")
    return path


def check_lengths(recipe: Recipe, hf_cfg: dict, model_dir: Path) -> None:
    limit = hf_cfg.get("max_position_embeddings")
    if not limit:
        return
    for key, value in (("calibration.seq_len", recipe.calibration.seq_len), ("evaluate.seq_len", recipe.evaluate.seq_len)):
        if value > limit:
            raise UserError(
                f"{key} = {value} is above the model's max_position_embeddings = {limit} "
                f"({model_dir / 'config.json'}); use at most {limit}"
            )


def check_parallelism(recipe: Recipe, hf_cfg: dict) -> None:
    tp = recipe.export.tp_size
    kv_heads = hf_cfg.get("num_key_value_heads") or hf_cfg.get("num_attention_heads")
    if kv_heads and kv_heads % tp:
        raise UserError(
            f"export.tp_size = {tp} does not divide the model's {kv_heads} KV heads; allowed tp sizes: "
            + ", ".join(str(d) for d in range(1, kv_heads + 1) if kv_heads % d == 0)
        )
    layers = hf_cfg.get("num_hidden_layers")
    if layers and recipe.export.pp_size > layers:
        raise UserError(f"export.pp_size = {recipe.export.pp_size} exceeds the model's {layers} layers")


def check_engine(recipe: Recipe, hf_cfg: dict, device, reporter: Reporter) -> None:
    from trtconv.engine.plan import check_engine_plan, check_precision_on_device
    from trtconv.core.environment import package_version

    quant_algo = PRECISIONS[recipe.quantization.precision].quant_algo
    kv_algo = KV_CACHE_FORMATS[recipe.quantization.kv_cache].kv_cache_quant_algo
    warnings = []
    if device.kind == "cuda":
        warnings += check_precision_on_device(quant_algo, kv_algo, device)
    warnings += check_engine_plan(
        recipe.engine,
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_algo,
        tp_size=recipe.export.tp_size,
        pp_size=recipe.export.pp_size,
        num_kv_heads=hf_cfg.get("num_key_value_heads") or hf_cfg.get("num_attention_heads") or 1,
        device=device if device.kind == "cuda" else None,
        trtllm_version=package_version("tensorrt_llm"),
    )
    for w in warnings:
        reporter.warn(w)


def data_input(role: str, path: Path) -> InputRecord:
    if path.is_file():
        files = [FileRecord(path=path.name, sha256=sha256_file(path), size=path.stat().st_size)]
        return InputRecord(role=role, root=str(path.parent), files=files)
    return InputRecord(role=role, root=str(path), files=hash_tree(path, skip=set()))


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
    from trtconv.data import samples
    from trtconv.gate import stats as evaluate
    from trtconv.stages import export, load, reuse
    from trtconv.data.packs import pack_sha256
    from trtconv.core.ui import silence_library_progress_bars

    silence_library_progress_bars()
    device = detect_device(opts.device)
    torch_device = "cuda" if device.kind == "cuda" else "cpu"
    cache = None if opts.no_cache else StageCache()
    stages: list[StageRecord] = []
    writer = ArtifactWriter(opts.out, force=opts.force)
    writer.preflight()  # output folder problems first: they cost nothing to find

    with StageMeter("load") as m:
        reporter.stage("load", "resolving the model")
        model_dir, hf_cfg, arch, weights = load.inspect_checkpoint(recipe.model, progress=reporter.info)
        check_lengths(recipe, hf_cfg, model_dir)
        check_parallelism(recipe, hf_cfg)
        check_engine(recipe, hf_cfg, device, reporter)
        calib_path = data_path(recipe.calibration.data, "calib")
        eval_path = data_path(recipe.evaluate.data, "eval")
        reporter.stage("load", f"hashing {len(weights)} weight file(s), {sum(w.stat().st_size for w in weights) / 2**30:.2f} GiB")
        inputs = load.describe_inputs(model_dir, weights)
        tokenizer = load.load_tokenizer(model_dir, recipe.model.trust_remote_code)
        export_key = reuse.export_key(recipe, inputs, pack_sha256(calib_path), device)
    stages.append(m.record(architecture=arch, model_dir=str(model_dir)))

    calib_tokens = samples.calibration_rows(
        calib_path, tokenizer, recipe.calibration.num_samples, recipe.calibration.seq_len, recipe.calibration.seed
    )
    eval_tokens = None
    if recipe.evaluate.enabled:
        eval_tokens = samples.evaluation_rows(
            eval_path, tokenizer, recipe.evaluate.num_samples, recipe.evaluate.seq_len, recipe.evaluate.seed
        )
        samples.check_disjoint(calib_tokens, eval_tokens)

    with writer:
        cached = reuse.restore_export(cache, export_key, writer.tmp, reporter) if cache else None
        if cached is not None:
            exported = export.ExportResult.from_record(cached["export"], writer.tmp)
            calib_record = cached["calibration"]
            for rec in cached["stages"]:
                rec = StageRecord.model_validate(rec)
                reporter.stage(rec.name, f"reused from the cache (key {export_key[:12]}, saves {rec.wall_s:.1f} s)")
                stages.append(rec.model_copy(update={"status": "reused", "details": {**rec.details, "cache_key": export_key}}))
        else:
            exported, calib_record, unit_stages = run_calibrate_and_export(recipe, model_dir, arch, tokenizer, calib_tokens, writer.tmp,
                                                                           torch_device, reporter)
            stages += unit_stages
            if cache:
                meta = {"export": exported.manifest_record(), "calibration": calib_record,
                        "stages": [r.model_dump(mode="json") for r in unit_stages]}
                reuse.store_export(cache, export_key, writer.tmp, meta, reporter)

        reproducibility = {}
        if opts.repro_check:
            reproducibility = repro_check(recipe, model_dir, arch, tokenizer, calib_tokens, writer, torch_device, reporter)

        engine_record = run_engine_stage(recipe, exported, writer.tmp, opts, reporter, stages)

        outcome_eval = None
        if eval_tokens is not None:
            # A built engine may be the candidate: its files are part of what the statistics depend on.
            engine_files = hash_tree(writer.tmp / ENGINE_DIR) if engine_record.get("status") == "built" else []
            eval_key = reuse.evaluate_key(recipe, export_key, pack_sha256(eval_path), device,
                                          engine_files=[(f.path, f.sha256) for f in engine_files])
            outcome_eval = run_evaluate_stage(recipe, model_dir, exported, eval_tokens, eval_key, cache, writer, torch_device,
                                              reporter, stages, engine_record=engine_record)
        metrics = outcome_eval.summary if outcome_eval else {}
        gates = outcome_eval.gates if outcome_eval else []
        evaluation = outcome_eval.record if outcome_eval else {}

        passed = evaluate.gates_passed(gates, recipe.evaluate.allow_inconclusive)
        (writer.tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        manifest = Manifest(
            trtconv_version=__version__,
            command=opts.command,
            created_utc=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            status="passed" if passed else "failed",
            status_reason="" if passed else "accuracy gate failed: " + ", ".join(g.metric for g in gates if g.verdict != "pass"),
            recipe=recipe.model_dump(mode="json"),
            recipe_sha256=recipe.sha256(),
            inputs=inputs
            + [data_input("calibration_data", calib_path)]
            + ([data_input("evaluation_data", eval_path)] if eval_tokens is not None else [])
            + ([data_input("task_data", Path(recipe.evaluate.multiple_choice))] if eval_tokens is not None and recipe.evaluate.multiple_choice else []),
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
        if outcome_eval is not None:
            write_report(writer.tmp, manifest, outcome_eval.weight_errors, outcome_eval.stats.token_kl)
        if opts.junit:
            write_junit(opts.junit, gates, recipe.name, recipe.evaluate.allow_inconclusive)
        manifest.outputs = hash_tree(writer.tmp)
        manifest.artifact_digest = artifact_digest(manifest.outputs)
        write_manifest(manifest, writer.tmp)
        path = writer.commit() if passed else writer.commit_failed()
    outcome = BuildOutcome(manifest=manifest, path=path)
    if not passed:
        raise GateFailed(outcome)
    return outcome


def run_calibrate_and_export(recipe: Recipe, model_dir: Path, arch: str, tokenizer, calib_tokens, root: Path, device: str,
                             reporter: Reporter):
    """The expensive unit: load the model, calibrate it, export it into root. Returns its records."""
    from trtconv.stages import calibrate, export, load

    stages = []
    with StageMeter("calibrate") as m:
        reporter.stage("calibrate", f"loading the model from {model_dir}")
        model = load.load_hf_model(model_dir, recipe.model.dtype, recipe.model.trust_remote_code, device)
        reporter.stage("calibrate", f"{arch} ({model.num_parameters() / 1e6:.1f} M parameters, {recipe.model.dtype}) to "
                       f"{recipe.quantization.precision} (kv cache {recipe.quantization.kv_cache}), "
                       f"{len(calib_tokens.rows)} x {recipe.calibration.seq_len} tokens")
        calibrate.check_group_size(model, recipe.quantization, recipe.export.tp_size)
        calib = calibrate.run(model, recipe.quantization, calib_tokens, recipe.calibration.batch_size, device, reporter)
    stages.append(
        m.record(status="ok" if calib.quant_config else "skipped", quantizers=calib.census, modelopt_output=calib.dependency_output)
    )
    with StageMeter("export") as m:
        reporter.stage("export", f"TensorRT-LLM checkpoint, tp={recipe.export.tp_size} pp={recipe.export.pp_size}")
        exported = export.run(model, tokenizer, model.config, arch, recipe.export, recipe.quantization, root)
        for r in exported.repairs:
            reporter.stage("export", f"repaired config.json {r.key}: {r.before!r} -> {r.after!r}")
    stages.append(m.record(repairs=len(exported.repairs)))
    return exported, {"quant_config": calib.quant_config, "census": calib.census}, stages


def run_evaluate_stage(recipe: Recipe, model_dir: Path, exported, tokens, key: str, cache, writer, device: str,
                       reporter: Reporter, stages: list, engine_record: dict | None = None) -> EvalOutcome:
    from trtconv.gate import stats as evaluate
    from trtconv.stages import reuse

    scratch = writer.tmp.parent / f"{writer.tmp.name}.eval"
    try:
        cached = reuse.restore_evaluation(cache, key, scratch, reporter) if cache else None
        if cached is not None:
            stats, errors, meta = cached
            reporter.stage("evaluate", f"statistics reused from the cache (key {key[:12]}, saves {meta['wall_s']:.1f} s); gates recomputed")
            summary = evaluate.summarize(stats, recipe.evaluate.seed)
            stored = meta["record"].get("task_correct")
            task_correct = {k: np.asarray(v, dtype=bool) for k, v in stored.items()} if stored else None
            gates = evaluate.apply_gates(summary, recipe.evaluate) + task_gates(recipe, task_correct, summary)
            report_gates(gates, reporter)
            stages.append(StageRecord(name="evaluate", status="reused", wall_s=0.0, details={"cache_key": key, "candidate": meta["record"]["candidate"]}))
            return EvalOutcome(summary, gates, meta["record"], stats, errors)
        with StageMeter("evaluate") as m:
            outcome = evaluate_checkpoint(recipe, model_dir, candidate_dir(recipe, writer.tmp), tokens, device, reporter,
                                          artifact_root=writer.tmp, engine_record=engine_record)
        stages.append(m.record(candidate=outcome.record.get("candidate")))
        if cache:
            reuse.store_evaluation(cache, key, outcome.stats, outcome.weight_errors, {"record": outcome.record, "wall_s": m.wall_s},
                                   scratch, reporter)
        return outcome
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def repro_check(recipe: Recipe, model_dir: Path, arch: str, tokenizer, calib_tokens, writer, device: str, reporter: Reporter) -> dict:
    """`--repro-check`: calibrate and export again from scratch; every tensor must match bit for bit."""
    import torch
    from safetensors import safe_open

    second = writer.tmp.parent / f"{writer.tmp.name}.repro"
    reporter.stage("repro-check", "calibrating and exporting a second time")
    try:
        run_calibrate_and_export(recipe, model_dir, arch, tokenizer, calib_tokens, second, device, reporter)
        differing, compared = [], 0
        for first_file in sorted((writer.tmp / "checkpoint").glob("*.safetensors")):
            with safe_open(first_file, "pt") as a, safe_open(second / "checkpoint" / first_file.name, "pt") as b:
                for name in a.keys():
                    compared += 1
                    x, y = a.get_tensor(name), b.get_tensor(name)
                    if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                        diff = (x.float() - y.float()).abs().max().item() if x.shape == y.shape else float("inf")
                        differing.append({"file": first_file.name, "tensor": name, "max_abs_diff": diff})
        differing.sort(key=lambda d: -d["max_abs_diff"])
        verdict = "identical" if not differing else f"{len(differing)} of {compared} tensors differ (largest {differing[0]['max_abs_diff']:.3g} in {differing[0]['tensor']})"
        if differing:
            reporter.warn(f"repro-check: {verdict}")
        else:
            reporter.stage("repro-check", verdict)
        return {"tensors_compared": compared, "identical": not differing, "differing": differing[:50]}
    finally:
        shutil.rmtree(second, ignore_errors=True)


def report_gates(gates, reporter: Reporter) -> None:
    for g in gates:
        lo = g.ci_low if g.ci_low is not None else float("nan")
        hi = g.ci_high if g.ci_high is not None else float("nan")
        reporter.stage("evaluate", f"{g.metric}: {g.value:.5g} [{lo:.5g}, {hi:.5g}] {g.comparator} {g.threshold:g} -> {g.verdict}")


def run_engine_stage(recipe: Recipe, exported, root: Path, opts: BuildOptions, reporter: Reporter, stages: list) -> dict:
    if recipe.engine.target == "none":
        stages.append(StageRecord(name="engine", status="skipped", wall_s=0.0, details={"target": "none"}))
        return {"target": "none", "status": "skipped"}
    from trtconv.engine.targets import build_tensorrt_engine, prepare_pytorch_target

    with StageMeter("engine") as m:
        if recipe.engine.target == "tensorrt":
            reporter.stage("engine", "tensorrt: trtllm-build from the TensorRT-LLM checkpoint")
            record = build_tensorrt_engine(exported.checkpoint_dir, root / ENGINE_DIR, recipe.engine.tensorrt, require=opts.require_engine)
        else:
            reporter.stage("engine", "pytorch: LLM-API options for the unified HF checkpoint")
            record = prepare_pytorch_target(
                exported.hf_checkpoint_dir,
                root / ENGINE_DIR,
                recipe.engine.pytorch,
                tp_size=recipe.export.tp_size,
                pp_size=recipe.export.pp_size,
                require=opts.require_engine,
            )
    status = {"built": "ok", "not_built": "not_built", "failed": "failed"}[record.status]
    stages.append(m.record(status=status, target=record.target))
    reporter.stage("engine", f"{record.target}: {record.status}" + (f" ({record.reason})" if record.reason else ""))
    if record.status == "failed":
        raise UserError(f"engine build failed: {record.reason}")
    return record.model_dump(mode="json")


@dataclass
class EvalOutcome:
    summary: dict
    gates: list
    record: dict  # what the manifest's `evaluation` section holds
    stats: object  # evaluate.DocumentStats
    weight_errors: list


def evaluate_checkpoint(recipe: Recipe, model_dir: Path, checkpoint_dir: Path, tokens, device: str, reporter: Reporter,
                        weight_errors: bool = True, artifact_root: Path | None = None,
                        engine_record: dict | None = None) -> EvalOutcome:
    """The original model (fresh from disk, float32) against the artifact, gated.

    The candidate is the built engine through TensorRT-LLM's own API where that runs here (and the
    engine was built with context logits); otherwise the checkpoint on disk through trtconv's
    reference executor, with the reason recorded.
    """
    from trtconv.gate import stats as evaluate
    from trtconv.stages import load
    from trtconv.checkpoints.trtllm_reader import weight_quantization_errors

    baseline = load.load_hf_model(model_dir, "float32", recipe.model.trust_remote_code, device)
    vocab = baseline.config.vocab_size
    engine = None
    if engine_record and engine_record.get("status") == "built" and artifact_root is not None:
        from trtconv.engine.logits import engine_candidate

        engine = engine_candidate(artifact_root, engine_record, vocab, tokenizer_dir=artifact_root / "tokenizer",
                                  seq_len=recipe.evaluate.seq_len)
        if not engine.available:
            reporter.warn(f"evaluate: judging the checkpoint, not the engine: {engine.reason}")
    try:
        if engine is not None and engine.available:
            candidate, kind = engine.fn, engine.description
        else:
            candidate, kind = candidate_logits(checkpoint_dir, device, vocab=vocab)

        def baseline_logits(ids):
            return baseline(input_ids=ids, use_cache=False).logits

        n_batches = -(-len(tokens.rows) // recipe.evaluate.batch_size)
        with reporter.progress("evaluation batches", total=n_batches) as advance:
            stats = evaluate.per_document_stats(tokens, baseline_logits, candidate, recipe.evaluate.batch_size, device, advance)
        task_correct = score_task(recipe, model_dir, baseline_logits, candidate, device, reporter) if recipe.evaluate.multiple_choice else None
    finally:
        if engine is not None:
            engine.close()
    summary = evaluate.summarize(stats, recipe.evaluate.seed)
    gates = evaluate.apply_gates(summary, recipe.evaluate) + task_gates(recipe, task_correct, summary)
    # Per-layer weight errors are read from the TensorRT-LLM checkpoint layout only.
    errors = weight_quantization_errors(checkpoint_dir, baseline.cpu()) if weight_errors and not is_hf_checkpoint(checkpoint_dir) else []
    worst_layers = sorted(errors, key=lambda x: -x[1])[:5]
    record = {
        **tokens.manifest_record(),
        "candidate": kind,
        "baseline": "original HF checkpoint (transformers, float32)",
        "worst_documents": evaluate.worst_documents(stats, tokens.doc_ids),
        "worst_layers": [{"layer": n, "relative_weight_error": e} for n, e in worst_layers],
    }
    if engine is not None and not engine.available:
        record["engine_fallback_reason"] = engine.reason
    if task_correct is not None:
        record["task_correct"] = {k: v.astype(int).tolist() for k, v in task_correct.items()}
    report_gates(gates, reporter)
    return EvalOutcome(summary, gates, record, stats, errors)


def score_task(recipe: Recipe, model_dir: Path, baseline_logits, candidate, device: str, reporter: Reporter) -> dict:
    """Per-item correctness of both models on the recipe's multiple-choice file."""
    from trtconv.stages import load
    from trtconv.gate.tasks import read_multiple_choice, score_multiple_choice

    items = read_multiple_choice(recipe.evaluate.multiple_choice)
    tokenizer = load.load_tokenizer(model_dir, recipe.model.trust_remote_code)
    reporter.stage("evaluate", f"multiple-choice task: {len(items)} items from {recipe.evaluate.multiple_choice}")
    return {
        "baseline": score_multiple_choice(items, tokenizer, baseline_logits, device, recipe.evaluate.seq_len),
        "candidate": score_multiple_choice(items, tokenizer, candidate, device, recipe.evaluate.seq_len),
    }


def task_gates(recipe: Recipe, task_correct: dict | None, summary: dict) -> list:
    """The task's summary goes into `summary["task"]`; its gate, if a threshold is set."""
    if task_correct is None:
        return []
    from trtconv.gate.tasks import task_gate, task_summary

    summary["task"] = task_summary(task_correct["baseline"], task_correct["candidate"], recipe.evaluate.seed)
    threshold = recipe.evaluate.gates.max_task_accuracy_drop_pp
    if threshold is None:
        return []
    return [task_gate(summary["task"], threshold, recipe.evaluate.allow_inconclusive)]


def candidate_logits(checkpoint_dir: Path, device: str, vocab: int):
    """The artifact as a function input_ids -> logits, and a description of what it is.

    A folder with hf_quant_config.json or HF weights is ModelOpt's unified HF checkpoint (what the
    pytorch target serves); one with rank{N}.safetensors is the TensorRT-LLM checkpoint.
    """
    if is_hf_checkpoint(checkpoint_dir):
        from trtconv.checkpoints.hf_reader import load_hf_checkpoint_model

        model = load_hf_checkpoint_model(checkpoint_dir, device=device)
        description = "unified HF checkpoint via trtconv's reference executor (float32)"
    else:
        from trtconv.checkpoints.trtllm_reader import load_checkpoint_model

        model = load_checkpoint_model(checkpoint_dir, device=device)
        description = "TensorRT-LLM checkpoint via trtconv's reference executor (float32)"

    def logits(ids):
        # ModelOpt's AWQ export pads the vocabulary (embedding, lm_head and config vocab_size) to a
        # multiple of 64; the padded ids are never real tokens, so compare over the real vocabulary.
        return model.logits(ids)[..., :vocab]

    return logits, description


def is_hf_checkpoint(folder: Path) -> bool:
    return not (folder / "rank0.safetensors").is_file() and (folder / "config.json").is_file()


def candidate_dir(recipe: Recipe, root: Path) -> Path:
    """What ships is what the gate judges: the unified HF checkpoint when the pytorch target serves
    it (or it is the only export), else the TensorRT-LLM checkpoint the engine is built from."""
    if recipe.engine.target == "pytorch" or not recipe.export.tensorrt_llm_checkpoint:
        return root / "hf_checkpoint"
    return root / "checkpoint"

