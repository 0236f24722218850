"""`trtconv check OUT`: the accuracy gate again, on an artifact that already exists.

It re-reads everything from disk: the original model named in the manifest (whose files must still
hash to what the build recorded), the held-out data (same), and the artifact's checkpoint (format
validated first). So a checkpoint edited after the build, or a changed original, shows up here.
`--against OTHER` runs a second artifact on the same tokens against the same original.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtconv.artifact.writer import sha256_file
from trtconv.core.errors import ArtifactError
from trtconv.gate.stats import gates_passed
from trtconv.artifact.manifest import InputRecord, Manifest, read_manifest
from trtconv.pipeline import EvalOutcome, candidate_dir, evaluate_checkpoint, is_hf_checkpoint
from trtconv.recipe.schema import Recipe
from trtconv.core.ui import Reporter


@dataclass
class CheckResult:
    artifact: Path
    manifest: Manifest
    outcome: EvalOutcome
    passed: bool


def _input(manifest: Manifest, role: str, artifact: Path) -> InputRecord:
    for rec in manifest.inputs:
        if rec.role == role:
            return rec
    raise ArtifactError(f"{artifact / 'manifest.json'} records no {role} input; it cannot be checked again")


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


def check_artifact(artifact: Path, device: str, reporter: Reporter, against: Path | None = None):
    from transformers import AutoTokenizer

    from trtconv.data import samples
    from trtconv.core.environment import detect_device
    from trtconv.checkpoints.trtllm_format import validate_checkpoint

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    recipe = Recipe.model_validate(manifest.recipe)
    model_dir = _verified_path(_input(manifest, "model", artifact), artifact)
    eval_path = _verified_path(_input(manifest, "evaluation_data", artifact), artifact)
    torch_device = "cuda" if detect_device(device).kind == "cuda" else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(artifact / "tokenizer")
    tokens = samples.evaluation_rows(eval_path, tokenizer, recipe.evaluate.num_samples, recipe.evaluate.seq_len, recipe.evaluate.seed)

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
                                      artifact_root=target, engine_record=engine_record)
        passed = gates_passed(outcome.gates, recipe.evaluate.allow_inconclusive)
        results.append(CheckResult(target, manifest, outcome, passed))
    return results
