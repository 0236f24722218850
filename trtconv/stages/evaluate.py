"""Stage 5, evaluate: the original model against the artifact that ships, on held-out text; gated.

The candidate is what ships: the built engine through TensorRT-LLM where that runs here, else the
exported checkpoint read back from disk by trtconv's reference executor (export is where bugs
live, so the gate judges files, not the in-memory model). `check_artifact` runs the same stage
again on an artifact that already exists (`trtconv check`), re-reading every input from disk.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtconv.artifact.layout import CHECKPOINT_DIR, HF_CHECKPOINT_DIR, TOKENIZER_DIR, is_hf_checkpoint
from trtconv.artifact.manifest import InputRecord, Manifest, StageRecord, read_manifest
from trtconv.artifact.writer import sha256_file
from trtconv.cache.store import StageCache, stage_key, versions_for_key
from trtconv.core.environment import DeviceInfo
from trtconv.core.errors import ArtifactError
from trtconv.core.ui import Reporter
from trtconv.data.packs import pack_sha256
from trtconv.gate.stats import STAT_FIELDS, gates_passed
from trtconv.recipe.schema import Recipe
from trtconv.stages.base import StageMeter, device_part, restore_entry

NAME = "evaluate"
# evaluate_key: what can change the per-document statistics (gates are always recomputed).
CACHE_KEY_COVERS: tuple[str, ...] = ("export key", "evaluate section without gates", "evaluation data sha256",
                                       "task data sha256", "versions", "device", "engine files")


@dataclass
class EvalOutcome:
    summary: dict
    gates: list
    record: dict  # what the manifest's `evaluation` section holds
    stats: object  # evaluate.DocumentStats
    weight_errors: list
    seconds: dict = field(default_factory=dict)  # where the time went (the streamed path's laps)


def evaluate_checkpoint(recipe: Recipe, model_dir: Path, checkpoint_dir: Path, tokens, device: str, reporter: Reporter,
                        weight_errors: bool = True, artifact_root: Path | None = None,
                        engine_record: dict | None = None, streamed: bool = False, park: bool = True,
                        devices=None) -> EvalOutcome:
    """The original model (fresh from disk; float32 on a CPU, see baseline_dtype) against the artifact, gated.

    The candidate is the built engine through TensorRT-LLM's own API where that runs here (and the
    engine was built with context logits); otherwise the checkpoint on disk through trtconv's
    reference executor, with the reason recorded. On a GPU its float32 matrix products use TF32
    (gpu_matmuls).
    """
    with gpu_matmuls(device):
        return _evaluate_checkpoint(recipe, model_dir, checkpoint_dir, tokens, device, reporter, weight_errors,
                                    artifact_root, engine_record, streamed, park, devices)


# What the reference executor's float32 matrix products run in on a GPU (gpu_matmuls); full float32 on a CPU.
GPU_FP32_MATMULS = "tf32"


@contextmanager
def gpu_matmuls(device: str):
    """On a GPU, float32 matrix products run in TF32 while evaluating; on a CPU nothing changes.

    The reference executor dequantizes the checkpoint to float32; full-float32 products run on the
    CUDA cores (16k tokens, 7 TFLOP a layer of an 8B model), TF32 on the tensor cores: on an H200 the
    8B evaluation's 32 layers went from 7.4-8.1 s to 5.7-7.2 s (docs/performance.md, run 5; the
    loop is now bound by reading the layers). TF32 rounds the products' inputs to 10 mantissa
    bits (float32 accumulation), finer than the bf16 (7 bits) the original computes in on a GPU
    (baseline_dtype) and far finer than any quantization judged, so the gate compares the same
    things. The setting is restored afterwards; the manifest's candidate line says which applied.
    """
    if device == "cpu":
        yield
        return
    import torch

    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision; earlier releases only the allow_tf32 flag (mixing the two is an error).
    name, value = ("fp32_precision", GPU_FP32_MATMULS) if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def executor_candidate(checkpoint: str, device: str) -> str:
    """The manifest's candidate line for a checkpoint judged by the reference executor, with its numerics."""
    numerics = "float32" if device == "cpu" else f"float32, {GPU_FP32_MATMULS.upper()} matrix products"
    return f"{checkpoint} via trtconv's reference executor ({numerics})"


def _evaluate_checkpoint(recipe: Recipe, model_dir: Path, checkpoint_dir: Path, tokens, device: str, reporter: Reporter,
                         weight_errors: bool, artifact_root: Path | None, engine_record: dict | None,
                         streamed: bool, park: bool, devices=None) -> EvalOutcome:
    from trtconv.checkpoints.hf_model import load_hf_model
    from trtconv.gate import stats as evaluate

    if streamed and not (engine_record and engine_record.get("status") == "built"):
        return evaluate_streamed(recipe, model_dir, checkpoint_dir, tokens, device, reporter, weight_errors, park, devices)
    dtype = baseline_dtype(device, recipe.model.dtype)
    engine_built = bool(engine_record and engine_record.get("status") == "built")
    if not engine_built and sequential_here(recipe, checkpoint_dir, tokens, device):
        return evaluate_sequential(recipe, model_dir, checkpoint_dir, tokens, device, reporter, weight_errors, dtype)
    baseline = load_hf_model(model_dir, dtype, recipe.model.trust_remote_code, device)
    vocab = baseline.config.vocab_size
    engine = None
    if engine_record and engine_record.get("status") == "built" and artifact_root is not None:
        from trtconv.engine.logits import engine_candidate

        engine = engine_candidate(artifact_root, engine_record, vocab, tokenizer_dir=artifact_root / TOKENIZER_DIR,
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
    summary = evaluate.summarize(stats, recipe.evaluate.seed, packs=tokens.extra.get("packs"))
    gates = evaluate.apply_gates(summary, recipe.evaluate) + task_gates(recipe, task_correct, summary)
    errors = weight_errors_of(checkpoint_dir, baseline, candidate) if weight_errors else []
    record = evaluation_record(tokens, stats, errors, kind, f"original HF checkpoint (transformers, {dtype})", "in_memory")
    if engine is not None and not engine.available:
        record["engine_fallback_reason"] = engine.reason
    if task_correct is not None:
        record["task_correct"] = {k: v.astype(int).tolist() for k, v in task_correct.items()}
    report_gates(gates, reporter)
    return EvalOutcome(summary, gates, record, stats, errors)


def baseline_logits_bytes(tokens, vocab: int, dtype: str) -> int:
    """Host memory the original's logits over every evaluation row take (evaluate_sequential): kept in the
    dtype the model computes them in (record_baseline)."""
    from trtconv.checkpoints.hf_model import torch_dtype

    per_value = torch_dtype(dtype).itemsize
    return len(tokens.rows) * max(len(r) for r in tokens.rows) * vocab * per_value if tokens.rows else 0


def sequential_here(recipe: Recipe, checkpoint_dir: Path, tokens, device: str) -> bool:
    """On a GPU, the unified HF checkpoint is judged after the original has run and left the GPU
    (evaluate_sequential), where the host can hold the original's logits (at most half of what is
    available): together they held both models (Qwen3-8B fp8 on an H100: 32.2 GiB against the 15.6 GiB
    bare ModelOpt's conversion needs). A multiple-choice task scores both models on other inputs: together."""
    from trtconv.checkpoints.hf_model import read_hf_config
    from trtconv.memory_plan import host_available_bytes

    if device == "cpu" or not is_hf_checkpoint(checkpoint_dir) or recipe.evaluate.multiple_choice:
        return False
    available = host_available_bytes()
    vocab = read_hf_config(checkpoint_dir)["vocab_size"]  # the export's vocabulary (>= the original's)
    need = baseline_logits_bytes(tokens, vocab, baseline_dtype(device, recipe.model.dtype))
    return available is None or need <= available // 2


@dataclass
class RecordedLogits:
    """The original's logits of each evaluation batch, in the order per_document_stats asks for them, on the host
    (in the model's own dtype: per_document_stats upcasts them on the device, the same numbers as in memory)."""

    batches: list
    device: str
    _next: int = 0

    def __call__(self, ids):
        out = self.batches[self._next]
        self._next += 1
        return out.to(self.device, non_blocking=True)


def record_baseline(recipe: Recipe, model_dir: Path, tokens, device: str, dtype: str, reporter: Reporter) -> RecordedLogits:
    """Run the original over every evaluation batch once, keep its logits on the host, and free it.

    The logits stay in the dtype the model computed them in (bf16 for a bf16 model: upcasting is exact, so
    per_document_stats gets the same numbers) and go to page-locked memory: an 8B model's 96 x 256 rows at
    Qwen3's 151936 vocabulary are 7.5 GB in bf16, which a pageable float32 copy moved at about 1 GB/s
    (14 s of a 67 s conversion on an H100)."""
    import torch

    from trtconv.checkpoints.hf_model import load_hf_model, release_memory

    baseline = load_hf_model(model_dir, dtype, recipe.model.trust_remote_code, device)
    rows, size = torch.tensor(tokens.rows, dtype=torch.long), recipe.evaluate.batch_size
    pinned = torch.device(device).type == "cuda"
    batches = []
    with torch.no_grad(), reporter.progress("original model batches", total=-(-len(rows) // size)) as advance:
        for start in range(0, len(rows), size):
            logits = baseline(input_ids=rows[start:start + size].to(device), use_cache=False).logits
            host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=pinned)
            batches.append(host.copy_(logits, non_blocking=pinned))
            advance(1)
    if pinned:
        torch.cuda.synchronize()  # every copy has landed before the model's memory goes
    del baseline
    release_memory()
    return RecordedLogits(batches, device)


def evaluate_sequential(recipe: Recipe, model_dir: Path, checkpoint_dir: Path, tokens, device: str, reporter: Reporter,
                        weight_errors: bool, dtype: str) -> EvalOutcome:
    """evaluate_checkpoint with one model on the GPU at a time: the original first (its logits kept on the
    host), then the candidate. The statistics are the same numbers; the GPU's peak is the larger model."""
    from trtconv.checkpoints.hf_executor import original_weights, shipped_weight_errors
    from trtconv.gate import stats as evaluate

    reporter.stage("evaluate", "one model at a time: the original's logits first (kept on the host), then the checkpoint")
    baseline = record_baseline(recipe, model_dir, tokens, device, dtype, reporter)
    vocab = baseline.batches[0].shape[-1] if baseline.batches else 0
    candidate, kind = candidate_logits(checkpoint_dir, device, vocab=vocab)
    with reporter.progress("evaluation batches", total=len(baseline.batches)) as advance:
        stats = evaluate.per_document_stats(tokens, baseline, candidate, recipe.evaluate.batch_size, device, advance)
    summary = evaluate.summarize(stats, recipe.evaluate.seed, packs=tokens.extra.get("packs"))
    gates = evaluate.apply_gates(summary, recipe.evaluate)
    errors = shipped_weight_errors(candidate.model, original_weights(model_dir)) if weight_errors else []
    record = evaluation_record(tokens, stats, errors, kind,
                               f"original HF checkpoint (transformers, {dtype}), its logits recorded first", "sequential")
    report_gates(gates, reporter)
    return EvalOutcome(summary, gates, record, stats, errors)


def evaluate_streamed(recipe: Recipe, model_dir: Path, checkpoint_dir: Path, tokens, device: str, reporter: Reporter,
                      weight_errors: bool = True, park: bool = True, devices=None) -> EvalOutcome:
    """evaluate_checkpoint with at most two decoder layers of each model in memory (stages/evaluate_streamed.py);
    several `devices` (trtconv.stages.devices) run its layers as a pipeline."""
    from trtconv.checkpoints.hf_model import read_hf_config, torch_dtype
    from trtconv.gate import stats as evaluate
    from trtconv.stages.evaluate_streamed import LayerStreamedPair, run_scorers

    dtype = baseline_dtype(device, recipe.model.dtype)  # as in memory: the same baseline numerics per layer
    pair = LayerStreamedPair(model_dir, checkpoint_dir, device, read_hf_config(model_dir)["vocab_size"], torch_dtype(dtype), park,
                             devices)

    def scorer(baseline_logits, candidate):
        stats = evaluate.per_document_stats(tokens, baseline_logits, candidate, recipe.evaluate.batch_size, device, lambda n=1: None)
        task = score_task(recipe, model_dir, baseline_logits, candidate, device, reporter) if recipe.evaluate.multiple_choice else None
        return stats, task

    split = f", layers split over {devices.describe()}" if devices is not None and devices.count > 1 else ""
    reporter.stage("evaluate", f"layer-streamed: the original and the checkpoint one layer at a time{split}")
    started = time.monotonic()
    stats, task_correct = run_scorers(pair, scorer, reporter, weight_errors)
    seconds = {**pair.seconds, "scoring": round(time.monotonic() - started - sum(pair.seconds.values()), 3)}
    summary = evaluate.summarize(stats, recipe.evaluate.seed, packs=tokens.extra.get("packs"))
    gates = evaluate.apply_gates(summary, recipe.evaluate) + task_gates(recipe, task_correct, summary)
    errors = pair.errors
    record = evaluation_record(tokens, stats, errors, candidate_description(checkpoint_dir, device),
                               f"original HF checkpoint (transformers, {dtype})", "streamed")
    if task_correct is not None:
        record["task_correct"] = {k: v.astype(int).tolist() for k, v in task_correct.items()}
    report_gates(gates, reporter)
    return EvalOutcome(summary, gates, record, stats, errors, seconds)


def evaluation_record(tokens, stats, errors: list, candidate: str, baseline: str, path: str) -> dict:
    """The manifest's `evaluation` section, whichever path computed the statistics (the keys in this order)."""
    from trtconv.gate import stats as evaluate

    return {
        **tokens.manifest_record(),
        "candidate": candidate,
        "baseline": baseline,
        "path": path,
        "worst_documents": evaluate.worst_documents(stats, tokens.doc_ids),
        "worst_layers": [{"layer": n, "relative_weight_error": e} for n, e in sorted(errors, key=lambda x: -x[1])[:5]],
    }


def baseline_dtype(device: str, model_dtype: str) -> str:
    """The original model is loaded once, straight onto the device: float32 on a CPU (as always),
    the recipe's model dtype on a GPU, where a float32 copy of an 8B model alone is 32 GB.
    (Which dtype evaluation computes in is issue 12's `compute dtype`; this keeps CPU unchanged.)"""
    return "float32" if device == "cpu" else model_dtype


def score_task(recipe: Recipe, model_dir: Path, baseline_logits, candidate, device: str, reporter: Reporter) -> dict:
    """Per-item correctness of both models on the recipe's multiple-choice file."""
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.gate.tasks import read_multiple_choice, score_multiple_choice

    items = read_multiple_choice(recipe.evaluate.multiple_choice)
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
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


def candidate_description(checkpoint_dir: Path, device: str) -> str:
    """The manifest's candidate line of a checkpoint judged by the executor (either evaluation path)."""
    if is_hf_checkpoint(checkpoint_dir):
        from trtconv.checkpoints.hf_reader import _read_json, check_hf_architecture

        config = checkpoint_dir / "config.json"
        arch = check_hf_architecture(_read_json(config), config)
        return executor_candidate(f"unified HF checkpoint ({arch} from transformers, shipped tensors)", device)
    return executor_candidate("TensorRT-LLM checkpoint", device)


def candidate_logits(checkpoint_dir: Path, device: str, vocab: int):
    """The artifact as a function input_ids -> logits, and a description of what it is.

    A folder with hf_quant_config.json or HF weights is ModelOpt's unified HF checkpoint (what the
    pytorch target serves); one with rank{N}.safetensors is the TensorRT-LLM checkpoint.
    """
    if is_hf_checkpoint(checkpoint_dir):
        # Every family's own transformers class, with the shipped numerics swapped in (checkpoints/hf_executor.py).
        from trtconv.checkpoints.hf_executor import load_shipped_model

        model = load_shipped_model(checkpoint_dir, device=device)
    else:
        from trtconv.checkpoints.trtllm_reader import load_checkpoint_model

        model = load_checkpoint_model(checkpoint_dir, device=device)
    description = candidate_description(checkpoint_dir, device)

    def logits(ids):
        # ModelOpt's AWQ export pads the vocabulary (embedding, lm_head and config vocab_size) to a
        # multiple of 64; the padded ids are never real tokens, so compare over the real vocabulary.
        return model.logits(ids)[..., :vocab]

    logits.model = model  # for the per-linear weight errors (weight_errors_of)
    return logits, description


def weight_errors_of(checkpoint_dir: Path, baseline, candidate) -> list[tuple[str, float]]:
    """Per-linear relative weight errors of the checkpoint the gate judged, against the original model."""
    from trtconv.checkpoints.trtllm_reader import weight_quantization_errors

    if not is_hf_checkpoint(checkpoint_dir):
        return weight_quantization_errors(checkpoint_dir, baseline)
    from trtconv.checkpoints.hf_executor import ShippedModel, shipped_weight_errors

    model = getattr(candidate, "model", None)
    return shipped_weight_errors(model, baseline) if isinstance(model, ShippedModel) else []




def candidate_dir(recipe: Recipe, root: Path) -> Path:
    """What ships is what the gate judges: the export the engine target starts from (its row's
    source_dir: the unified HF checkpoint for pytorch, the TensorRT-LLM checkpoint for tensorrt);
    without a target, the TensorRT-LLM checkpoint unless the HF one is the only export."""
    from trtconv.engine.targets import ENGINE_TARGETS

    target = ENGINE_TARGETS.get(recipe.engine.target)
    if target is not None:
        return root / target.source_dir
    return root / (CHECKPOINT_DIR if recipe.export.tensorrt_llm_checkpoint else HF_CHECKPOINT_DIR)



def report_gates(gates, reporter: Reporter) -> None:
    """One line of counts: each gate's own line is printed once, with the result (cli/render.py)."""
    counts: dict[str, list[str]] = {}
    for g in gates:
        counts.setdefault(g.verdict, []).append(g.metric)
    said = [f"{len(names)} {verdict}" + ("" if verdict == "pass" else f" ({', '.join(names)})") for verdict, names in counts.items()]
    reporter.stage("evaluate", f"{len(gates)} gates: " + ", ".join(said))


def run(recipe: Recipe, model_dir: Path, tokens, key: str, cache, writer, device: str, reporter: Reporter,
        engine_record: dict | None = None, streamed: bool = False, park: bool = True,
        devices=None) -> tuple[EvalOutcome, StageRecord]:
    """The evaluate stage, its statistics reused from the cache under `key` when there; gates always recomputed."""
    from trtconv.gate import stats as evaluate

    scratch = writer.tmp.parent / f"{writer.tmp.name}.eval"
    try:
        cached = restore_evaluation(cache, key, scratch, reporter) if cache else None
        if cached is not None:
            stats, errors, meta = cached
            reporter.stage("evaluate", f"statistics reused from the cache (key {key[:12]}, saves {meta['wall_s']:.1f} s); gates recomputed")
            summary = evaluate.summarize(stats, recipe.evaluate.seed, packs=meta["record"].get("packs"))
            stored = meta["record"].get("task_correct")
            task_correct = {k: np.asarray(v, dtype=bool) for k, v in stored.items()} if stored else None
            gates = evaluate.apply_gates(summary, recipe.evaluate) + task_gates(recipe, task_correct, summary)
            report_gates(gates, reporter)
            record = StageRecord(name="evaluate", status="reused", wall_s=0.0, details={"cache_key": key, "candidate": meta["record"]["candidate"]})
            return EvalOutcome(summary, gates, meta["record"], stats, errors), record
        with StageMeter("evaluate") as m:
            reporter.stage("evaluate", f"the original model against the artifact on {len(tokens.rows)} held-out documents "
                           f"(up to {recipe.evaluate.seq_len} tokens each)")
            outcome = evaluate_checkpoint(recipe, model_dir, candidate_dir(recipe, writer.tmp), tokens, device, reporter,
                                          artifact_root=writer.tmp, engine_record=engine_record, streamed=streamed, park=park,
                                          devices=devices)
        if cache:
            store_evaluation(cache, key, outcome.stats, outcome.weight_errors, {"record": outcome.record, "wall_s": m.wall_s},
                                   scratch, reporter)
        split = {"devices": devices.record()} if devices is not None and devices.count > 1 and streamed else {}
        return outcome, m.record(candidate=outcome.record.get("candidate"), **({"seconds": outcome.seconds} if outcome.seconds else {}),
                                 **split)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)




# ---------------------------------------------------------------------------------------------
# `trtconv check`: the stage again, on an artifact that exists


@dataclass
class CheckResult:
    artifact: Path
    manifest: Manifest
    outcome: EvalOutcome
    passed: bool


def _inputs(manifest: Manifest, role: str, artifact: Path) -> list[InputRecord]:
    found = [rec for rec in manifest.inputs if rec.role == role]
    if not found:
        raise ArtifactError(f"{artifact / 'manifest.json'} records no {role} input; it cannot be checked again")
    return found


def _input(manifest: Manifest, role: str, artifact: Path) -> InputRecord:
    return _inputs(manifest, role, artifact)[0]


def _verified_path(rec: InputRecord, artifact: Path) -> Path:
    """The input's location, after checking its files still hash to what the build recorded."""
    root = Path(rec.root)
    for f in rec.files:
        p = root / f.path
        if not p.is_file():
            raise ArtifactError(f"{rec.role} file {p} (used to build {artifact}) is missing; restore it to check the artifact")
        if sha256_file(p) != f.sha256:
            raise ArtifactError(f"{rec.role} file {p} changed since {artifact} was built (sha256 differs from the manifest)")
    if len(rec.files) == 1 and (root / rec.files[0].path).is_file() and rec.role.endswith("_data"):
        return root / rec.files[0].path
    return root


def _streamed_here(recipe: Recipe, model_dir: Path, device: DeviceInfo) -> tuple[bool, bool]:
    """The memory plan on this device: (layer by layer, parking the vocabulary matrices) where the build would (memory_plan)."""
    from trtconv.memory_plan import plan_for_build
    from trtconv.checkpoints.hf_model import read_hf_config

    plan = plan_for_build(recipe, read_hf_config(model_dir), device, None)
    return plan.evaluate_streamed, plan.evaluate_parks


def check_artifact(artifact: Path, device: str, reporter: Reporter, against: Path | None = None):
    from transformers import AutoTokenizer

    from trtconv.data import samples
    from trtconv.core.environment import detect_device
    from trtconv.checkpoints.trtllm_format import validate_checkpoint

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    recipe = Recipe.model_validate(manifest.recipe)
    model_dir = _verified_path(_input(manifest, "model", artifact), artifact)
    eval_paths = [_verified_path(rec, artifact) for rec in _inputs(manifest, "evaluation_data", artifact)]
    eval_packs = [samples.Pack(p.stem, p) for p in eval_paths]
    device_info = detect_device(device)
    torch_device = "cuda" if device_info.kind == "cuda" else "cpu"
    streamed, park = _streamed_here(recipe, model_dir, device_info)
    tokenizer = AutoTokenizer.from_pretrained(artifact / TOKENIZER_DIR)
    tokens = samples.evaluation_rows(eval_packs, tokenizer, recipe.evaluate.num_samples, recipe.evaluate.seq_len, recipe.evaluate.seed)

    results = []
    for target in [artifact] + ([Path(against)] if against else []):
        ckpt = candidate_dir(recipe, target)
        if not (ckpt / "config.json").is_file():
            raise ArtifactError(f"{target} has no checkpoint to check ({ckpt / 'config.json'} is missing)")
        if not is_hf_checkpoint(ckpt):
            validate_checkpoint(ckpt)
        reporter.stage("check", f"{ckpt} against the original {model_dir}")
        engine_record = read_manifest(target).engine if target != artifact else manifest.engine
        outcome = evaluate_checkpoint(recipe, model_dir, ckpt, tokens, torch_device, reporter,
                                      artifact_root=target, engine_record=engine_record, streamed=streamed, park=park)
        passed = gates_passed(outcome.gates, recipe.evaluate.allow_inconclusive)
        results.append(CheckResult(target, manifest, outcome, passed))
    return results


# ---------------------------------------------------------------------------------------------
# The stage cache: per-document statistics and weight errors, gates always recomputed

EVALUATE_STAGE = NAME  # the cache folder of this stage
STATS_FILE = "document_stats.safetensors"
_STAT_FIELDS = STAT_FIELDS  # every DocumentStats array, so a new statistic is cached without a change here


def evaluate_key(recipe: Recipe, upstream: str, eval_sha256: str, device: DeviceInfo, engine_files: list | None = None) -> str:
    section = recipe.evaluate.model_dump(mode="json")
    for not_an_input in ("gates", "allow_inconclusive", "enabled", "data", "multiple_choice", "sensitivity"):
        section.pop(not_an_input)
    task = recipe.evaluate.multiple_choice
    section["multiple_choice_sha256"] = pack_sha256(Path(task)) if task else None
    return stage_key(
        EVALUATE_STAGE,
        {"export_key": upstream, "evaluate": section, "evaluation_data_sha256": eval_sha256,
         "versions": versions_for_key(), "device": device_part(device), "engine_files": sorted(engine_files or [])},
    )


def store_evaluation(cache: StageCache, key: str, stats, weight_errors: list, meta: dict, scratch: Path, reporter) -> None:
    import torch
    from safetensors.torch import save_file

    from trtconv.cache.store import CacheError

    scratch.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.from_numpy(np.ascontiguousarray(getattr(stats, name))) for name in _STAT_FIELDS}, scratch / STATS_FILE)
    try:
        cache.put(EVALUATE_STAGE, key, scratch, {**meta, "weight_errors": weight_errors})
    except CacheError as exc:
        reporter.warn(f"not cached: {exc}")


def restore_evaluation(cache: StageCache, key: str, scratch: Path, reporter):
    """(DocumentStats, weight_errors, meta) from the cache, or None on a miss."""
    from safetensors.torch import load_file

    from trtconv.gate.stats import DocumentStats

    meta = restore_entry(cache, EVALUATE_STAGE, key, scratch, reporter)
    if meta is None:
        return None
    tensors = load_file(scratch / STATS_FILE)
    stats = DocumentStats(**{name: tensors[name].numpy() for name in _STAT_FIELDS})
    errors = [tuple(x) for x in meta.pop("weight_errors")]
    return stats, errors, meta


