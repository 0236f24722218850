"""Stage 1, load: resolve the Hugging Face checkpoint, check it, hash it, load model + tokenizer.

Everything that can be wrong with a checkpoint folder is found here, before any calibration time is
spent: missing folder, no config.json, an architecture the pipeline cannot export, a truncated
safetensors file, pickle-only weights.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from trtconv.core.errors import ModelError
from trtconv.artifact.manifest import hash_tree
from trtconv.artifact.writer import sha256_file
from trtconv.core.errors import DataError, UserError
from trtconv.artifact.manifest import FileRecord, InputRecord
from trtconv.precisions import SUPPORTED_ARCHITECTURES
from trtconv.recipe.schema import ModelSection, Recipe

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]


def resolve_model_dir(section: ModelSection, progress=None) -> Path:
    """The local folder holding the checkpoint (training/fetching it first where needed)."""
    if section.reference is not None:
        from trtconv.data.reference_models import ensure_reference_model

        return ensure_reference_model(section.reference, progress=progress)
    if section.hub_id is not None:
        return _download_from_hub(section.hub_id, section.revision)
    path = Path(section.path).expanduser()
    if not path.exists():
        raise ModelError(f"model.path {path} does not exist; give a local Hugging Face checkpoint folder")
    if not path.is_dir():
        raise ModelError(f"model.path {path} is a file; give the checkpoint folder that holds config.json")
    return path.resolve()


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model.hub_id {repo_id}@{revision} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
            "(or the Hub is unreachable); download it on a connected machine or point model.path at a local folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"model.hub_id {repo_id}@{revision}: cannot fetch from the Hub: {exc}") from None


def read_hf_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} has no config.json: not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg_path}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path}: expected a JSON object")
    return cfg


def check_architecture(cfg: dict, model_dir: Path) -> str:
    archs = cfg.get("architectures") or []
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelError(
            f"{model_dir / 'config.json'}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return supported[0]


def check_safetensors_file(path: Path) -> None:
    """Header sanity + size: a truncated or corrupt file fails here, naming the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: corrupt safetensors file ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ModelError(
            f"{path}: truncated or corrupt safetensors file: the header describes {8 + header_len + end} bytes, "
            f"the file has {size}"
        )


def check_weight_files(model_dir: Path) -> list[Path]:
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
        hint = (
            f" (found {', '.join(pickled)}: trtconv loads safetensors only, since pickle files can run code; "
            "convert them with `transformers` save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise ModelError(f"{model_dir} has no *.safetensors weight files{hint}")
    for p in weights:
        check_safetensors_file(p)
    return weights


def hash_files(root: Path, names: list[str]) -> list[FileRecord]:
    from trtconv.artifact.writer import sha256_file

    out = []
    for name in sorted(set(names)):
        p = root / name
        if p.is_file():
            out.append(FileRecord(path=name, sha256=sha256_file(p), size=p.stat().st_size))
    return out


def describe_inputs(model_dir: Path, weights: list[Path]) -> list[InputRecord]:
    model_files = ["config.json", "generation_config.json"] + [p.name for p in weights]
    model_files += [p.name for p in model_dir.glob("*.safetensors.index.json")]
    return [
        InputRecord(role="model", root=str(model_dir), files=hash_files(model_dir, model_files)),
        InputRecord(role="tokenizer", root=str(model_dir), files=hash_files(model_dir, list(TOKENIZER_FILES))),
    ]


def inspect_checkpoint(section: ModelSection, progress=None) -> tuple[Path, dict, str, list[Path]]:
    """All checks that need no model load: (folder, hf config, architecture, weight files)."""
    model_dir = resolve_model_dir(section, progress=progress)
    cfg = read_hf_config(model_dir)
    arch = check_architecture(cfg, model_dir)
    weights = check_weight_files(model_dir)
    return model_dir, cfg, arch, weights


# ---------------------------------------------------------------------------------------------
# Pre-flight: cheap checks of the recipe against the model, before any expensive work


def data_packs(section_data: str | None, role: str) -> list:
    """The packs a section reads: its own file or folder, or (null) the built-in mix for `role`
    ('calibration' | 'evaluation', see trtconv.data.packs.BUILTIN_MIXES)."""
    from trtconv.data.samples import Pack, builtin_packs

    if section_data is None:
        return builtin_packs(role)
    path = Path(section_data)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; give a .jsonl, .txt or a folder of them")
    return [Pack(path.stem, path)]


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


def data_input(role: str, path: Path) -> InputRecord:
    if path.is_file():
        files = [FileRecord(path=path.name, sha256=sha256_file(path), size=path.stat().st_size)]
        return InputRecord(role=role, root=str(path.parent), files=files)
    return InputRecord(role=role, root=str(path), files=hash_tree(path, skip=set()))


def data_inputs(role: str, packs: list) -> list[InputRecord]:
    """One input record per pack, in the order the packs are read."""
    return [data_input(role, p.path) for p in packs]
