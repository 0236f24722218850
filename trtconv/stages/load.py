"""Stage 1, load: resolve the Hugging Face checkpoint, check it, hash it, load model + tokenizer.

Everything that can be wrong with a checkpoint folder is found here, before any calibration time is
spent: missing folder, no config.json, an architecture the pipeline cannot export, a truncated
safetensors file, pickle-only weights, a sharded index naming a shard that is not there, any
tensor that is missing, unexpected or of the wrong shape, sizes in config.json no model can have,
and weights that are not floating point (checkpoints.hf_checks; a NaN or inf is found as the
weights are read, in hf_model and hf_layers). transformers initialises a missing tensor
at random without a word, so a damaged checkpoint would calibrate, export and even pass a loose gate;
the tensor check compares the safetensors headers (no tensor data is read) with the parameters of
the architecture built from config.json on the meta device (no memory), so it costs seconds even
at 70B.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from trtconv.core.errors import ModelError
from trtconv.architectures import HF_NAMES, NOT_CONVERTED, check_attention_window
from trtconv.artifact.manifest import FileRecord, InputRecord, hash_tree
from trtconv.core.errors import DataError, UserError
from trtconv.checkpoints.hf_checks import ALLOWED_WEIGHT_DTYPES, check_dtypes
from trtconv.checkpoints.hf_model import TOKENIZER_FILES, VOCABULARY_FILES, read_hf_config
from trtconv.recipe.schema import ModelSection, Recipe

NAME = "load"
# Not cached: it is what the cache keys are made of (the checkpoint's file hashes).
CACHE_KEY_COVERS: tuple[str, ...] = ()

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


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub cannot be reached (httpx in huggingface_hub 1.x, requests before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """Every failure here is an input/environment problem (exit 2), said in one line with what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    where = f"model.hub_id {repo_id}@{revision}"
    local_copy = (f"pre-download it where the Hub is reachable (hf download {repo_id} --revision {revision}) and set "
                  "HF_HUB_OFFLINE=1, or point model.path at a local folder")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except GatedRepoError:
        raise ModelError(f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{where}: no such repository on {constants.ENDPOINT} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}: the repository has no revision {revision!r}; give a commit sha it has") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelError(f"{where} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {local_copy}") from None
        raise ModelError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch {where}, and it is not "
                         f"in the local cache; check the network/proxy (HTTPS_PROXY, HF_ENDPOINT) or {local_copy}") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise ModelError(f"{where}: the Hub at {constants.ENDPOINT} answered HTTP {status}; retry later or {local_copy}") from None
    except _network_errors() as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ModelError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch {where} ({reason}); check "
                         f"the network/proxy (HTTPS_PROXY, HF_ENDPOINT) or {local_copy}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: cannot fetch from the Hub: {exc}") from None


def check_architecture(cfg: dict, model_dir: Path) -> str:
    archs = cfg.get("architectures") or []
    if not archs:  # the model class is named there; model_type alone does not say which head it has
        from trtconv.architectures import ARCHITECTURES

        model_type = cfg.get("model_type")
        likely = [a.hf_name for a in ARCHITECTURES.values() if a.family == model_type]
        raise ModelError(
            f"{model_dir / 'config.json'}: the key 'architectures' is missing or empty"
            + (f" (model_type is {model_type!r})" if model_type else "")
            + "; it names the model class, one of: " + ", ".join(HF_NAMES)
            + (f" (e.g. \"architectures\": [\"{likely[0]}\"])" if likely else "")
        )
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelError(f"{model_dir / 'config.json'}: the key 'architectures' is {archs!r}; allowed: a list of model class "
                         f"names, one of: {', '.join(HF_NAMES)}")
    supported = [a for a in archs if a in HF_NAMES]
    if not supported:
        why = next((f" ({NOT_CONVERTED[a]})" for a in archs if a in NOT_CONVERTED), "")
        raise ModelError(
            f"{model_dir / 'config.json'}: architecture {archs or cfg.get('model_type')!r} is not supported{why}; "
            f"supported: {', '.join(HF_NAMES)}"
        )
    return supported[0]


def check_safetensors_file(path: Path) -> dict:
    """Header sanity + size: a truncated or corrupt file fails here, naming the file. Returns the header."""
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
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ModelError(f"{path}: corrupt safetensors file ({exc})") from None
    if 8 + header_len + end != size:
        raise ModelError(
            f"{path}: truncated or corrupt safetensors file: the header describes {8 + header_len + end} bytes, "
            f"the file has {size}"
        )
    return header


INDEX_NAME = "model.safetensors.index.json"


def _index_shards(model_dir: Path) -> list[Path] | None:
    """The shards a sharded checkpoint's index names (None without an index); a missing shard is named."""
    from trtconv.checkpoints.hf_layers import read_index

    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    return sorted(set(read_index(index).values()))


def check_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers would load: the index's shards, else every *.safetensors file."""
    weights = _index_shards(model_dir)
    if weights is None:
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


# ---------------------------------------------------------------------------------------------
# Tensor names and shapes: the checkpoint's headers against the architecture built from config.json


def checkpoint_tensors(weights: list[Path]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, file name, safetensors dtype) from the safetensors headers alone."""
    found: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for path in weights:
        for name, info in check_safetensors_file(path).items():
            if name != "__metadata__":
                found[name] = (tuple(info["shape"]), path.name, str(info.get("dtype")))
    return found


@dataclass
class ExpectedTensors:
    shapes: dict[str, tuple[int, ...]]  # every tensor of the state dict
    may_be_absent: set[str]  # tied to another (lm_head.weight with tie_word_embeddings)
    may_be_present: set[str]  # non-persistent buffers (rotary inv_freq), rebuilt from config
    ignore_missing: list[str]  # the architecture's own regexes (transformers' _keys_to_ignore_on_load_*)
    ignore_unexpected: list[str]
    prefix: str  # base_model_prefix ("model")


def expected_tensors(model_dir: Path, trust_remote_code: bool) -> ExpectedTensors:
    """What the architecture of config.json holds, built on the meta device (shapes, no storage)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, _config_validation_error()) as exc:
        raise ModelError(f"{model_dir / 'config.json'}: cannot build the architecture it describes: {exc}") from None
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = getattr(model, "_tied_weights_keys", None) or {}
    optional = set(tied) if getattr(text_config, "tie_word_embeddings", False) else set()
    # Non-persistent buffers (rotary inv_freq) are rebuilt from config; older checkpoints carry them.
    tolerated = {name for name, _ in model.named_buffers()} - set(state)
    return ExpectedTensors(
        shapes=state, may_be_absent=optional, may_be_present=tolerated,
        ignore_missing=list(getattr(model, "_keys_to_ignore_on_load_missing", None) or []),
        ignore_unexpected=list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
        prefix=getattr(model, "base_model_prefix", "") or "",
    )


def _config_validation_error() -> type[Exception]:
    """What transformers 5's strict configs raise on values they refuse (huggingface_hub's dataclasses)."""
    try:
        from huggingface_hub.errors import StrictDataclassError

        return StrictDataclassError
    except ImportError:
        return ValueError


def _matching(names: set[str], patterns: list[str]) -> set[str]:
    return {n for n in names if any(re.search(p, n) for p in patterns)}


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _listed(items: list[str], limit: int = 12) -> str:
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


_EXPERT_FILE = re.compile(r"^(?P<layer>.+)\.(?P<block>[^.]+)\.experts\.(?P<e>\d+)\.(?P<leaf>[^.]+)\.weight$")


def fold_experts(found: dict[str, tuple[tuple[int, ...], str, str]], model_dir: Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """A mixture-of-experts checkpoint keeps one tensor per expert (Mixtral: block_sparse_moe.experts.3.w1);
    transformers 5 loads them into fused 3-D parameters (mlp.experts.gate_up_proj [E, 2I, H], down_proj
    [E, H, I]). Fold the found names and shapes the same way (trtconv.architectures.Experts), so the
    tensor check compares like with like; a layer whose experts are incomplete stays unfolded and is named."""
    from trtconv.architectures import row_for_folder

    row = row_for_folder(model_dir)
    moe = row.experts if row is not None else None
    if moe is None:
        return found
    layers: dict[str, dict[tuple[int, str], tuple[str, tuple]]] = {}
    rest: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name, value in found.items():
        match = _EXPERT_FILE.match(name)
        if match and match["block"] == moe.file_block and match["leaf"] in moe.file_leaves:
            layers.setdefault(match["layer"], {})[(int(match["e"]), match["leaf"])] = (name, value)
        else:
            rest[name.replace(f".{moe.file_block}.", f".{moe.module_block}.")] = value
    for layer, tensors in layers.items():
        rest.update(_fused_experts(layer, tensors, moe))
    return rest


def _fused_experts(layer: str, tensors: dict, moe) -> dict[str, tuple[tuple[int, ...], str, str]]:
    count = 1 + max(e for e, _ in tensors)
    gate, up, down = moe.file_leaves
    complete = len(tensors) == 3 * count
    shapes = {leaf: {tensors[(e, leaf)][1][0] for e in range(count) if (e, leaf) in tensors} for leaf in moe.file_leaves}
    if not complete or any(len(s) != 1 for s in shapes.values()) or shapes[gate] != shapes[up]:
        return {name: value for name, value in tensors.values()}  # named as they are: unexpected / missing
    (inter, hidden), = shapes[gate]
    file = next(iter(tensors.values()))[1][1]
    # One dtype for the fused tensor: a refused one where any expert has it, so the dtype check still names it.
    dtypes = sorted({value[2] for _, value in tensors.values()}, key=lambda d: d in ALLOWED_WEIGHT_DTYPES)
    fused = f"{layer}.{moe.module_block}.experts"
    return {f"{fused}.gate_up_proj": ((count, 2 * inter, hidden), file, dtypes[0]),
            f"{fused}.down_proj": ((count, *next(iter(shapes[down]))), file, dtypes[0])}


def check_tensors(model_dir: Path, weights: list[Path], trust_remote_code: bool = False) -> None:
    """Stop on any missing, unexpected or mis-shaped tensor, naming each with expected vs found shapes,
    then on any weight that is not floating point (hf_checks.check_dtypes)."""
    found = fold_experts(checkpoint_tensors(weights), model_dir)
    want = expected_tensors(model_dir, trust_remote_code)
    expected, prefix = want.shapes, want.prefix
    # A checkpoint saved from the base model (LlamaModel) lacks the "model." prefix: transformers adds it.
    if prefix and found and not any(n.startswith(prefix + ".") for n in found):
        found = {f"{prefix}.{n}" if f"{prefix}.{n}" in expected else n: v for n, v in found.items()}
    absent = set(expected) - set(found)
    missing = sorted(absent - want.may_be_absent - _matching(absent, want.ignore_missing))
    extra = set(found) - set(expected)
    unexpected = sorted(extra - want.may_be_present - _matching(extra, want.ignore_unexpected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n][0])
    if not (missing or unexpected or wrong):
        check_dtypes(found, set(expected) & set(found), model_dir)
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: " + _listed([f"{n} (expected {_shape(expected[n])})" for n in missing]))
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape: " + _listed(
            [f"{n} (expected {_shape(expected[n])}, found {_shape(found[n][0])} in {found[n][1]})" for n in wrong]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: " + _listed(
            [f"{n} ({_shape(found[n][0])} in {found[n][1]})" for n in unexpected]))
    raise ModelError(
        f"{model_dir}: the weights do not match the architecture its config.json describes; "
        + "; ".join(problems)
        + ". transformers would fill missing tensors at random: re-export or re-download the checkpoint"
    )


def input_paths(model_dir: Path, weights: list[Path]) -> dict[str, list[Path]]:
    """The files that identify the model and the tokenizer, by role (only those that exist)."""
    # A shard's path relative to the folder (an index may name one in a subfolder; read_index refuses
    # any outside it), so every file the load reads is hashed and recorded under the name it is read by.
    model_files = ["config.json", "generation_config.json"] + [p.relative_to(model_dir).as_posix() for p in weights]
    model_files += [p.name for p in model_dir.glob("*.safetensors.index.json")]
    model_files += [p.name for p in model_dir.glob("*.py")]  # remote code (trust_remote_code): it is the model too
    # Every file a tokenizer may read, not only those the artifact copies: a changed vocab.txt or
    # *.tiktoken must change the cache key (keying on too much only costs a rebuild).
    tokenizer_files = list(TOKENIZER_FILES) + list(VOCABULARY_FILES) + ["chat_template.json"]
    tokenizer_files += [p.name for p in model_dir.glob("*.tiktoken")]
    roles = {"model": model_files, "tokenizer": tokenizer_files}
    return {role: [model_dir / n for n in sorted(set(names)) if (model_dir / n).is_file()] for role, names in roles.items()}


def start_hashing(model_dir: Path, weights: list[Path], remembered: bool = True):
    """Hash the checkpoint's files: at once from the hash table when unchanged since an earlier
    run, else on background threads (``.pending``) so the model can be loaded meanwhile.
    ``remembered=False`` (--no-cache) neither uses nor updates the table."""
    from trtconv.cache.hashes import BackgroundHashes, HashTable

    return BackgroundHashes([p for paths in input_paths(model_dir, weights).values() for p in paths],
                            HashTable(enabled=remembered))


def describe_inputs(model_dir: Path, weights: list[Path], hashing=None) -> list[InputRecord]:
    """The model's and tokenizer's files with sha256 and size (waits for ``hashing`` if given)."""
    hashes = (hashing or start_hashing(model_dir, weights)).result()
    return _input_records(model_dir, input_paths(model_dir, weights), hashes)


def _input_records(model_dir: Path, paths: dict[str, list[Path]], hashes: dict[Path, str]) -> list[InputRecord]:
    return [InputRecord(role=role, root=str(model_dir),
                        files=[FileRecord(path=p.relative_to(model_dir).as_posix(), sha256=hashes[p], size=p.stat().st_size)
                               for p in files])
            for role, files in paths.items()]


def remembered_inputs(section: ModelSection, progress=None) -> list[InputRecord] | None:
    """The model's and tokenizer's input records from the hash table alone (no file read in full),
    or None when any file is not in it or changed since: the whole-run cache's view of the inputs."""
    from trtconv.cache.hashes import HashTable

    model_dir = resolve_model_dir(section, progress=progress)
    check_architecture(read_hf_config(model_dir), model_dir)  # config.json first, as inspect_checkpoint does
    paths = input_paths(model_dir, check_weight_files(model_dir))
    table = HashTable()
    hashes = {p: table.lookup(p) for files in paths.values() for p in files}
    if None in hashes.values():
        return None
    return _input_records(model_dir, paths, hashes)


def all_inputs(model_inputs: list[InputRecord], recipe: Recipe, calib_packs: list, eval_packs: list) -> list[InputRecord]:
    """Every input the manifest records, in its order: model, tokenizer, calibration, evaluation and task data."""
    from trtconv.cache.hashes import HashTable

    table = HashTable()  # one read of the table for every data file, one save
    evaluated = recipe.evaluate.enabled
    task = Path(recipe.evaluate.multiple_choice) if evaluated and recipe.evaluate.multiple_choice else None
    records = (model_inputs + data_inputs("calibration_data", calib_packs, table)
               + (data_inputs("evaluation_data", eval_packs, table) if evaluated else [])
               + ([data_input("task_data", task, table)] if task else []))
    table.save()
    return records


def run(section: ModelSection, progress=None, remembered: bool = True):
    """The load stage: resolve, check and describe the checkpoint before any model is loaded (the
    model itself loads in checkpoints.hf_model). Returns (folder, hf config, architecture, weight
    files, hashing): the files' hashes start as soon as the weight files are known, so the tensor
    check (seconds: transformers import, the architecture on the meta device) runs under them."""
    started = []
    found = inspect_checkpoint(section, progress, lambda model_dir, weights: started.append(
        start_hashing(model_dir, weights, remembered=remembered)))
    return (*found, started[0])


def inspect_checkpoint(section: ModelSection, progress=None, weights_known=None) -> tuple[Path, dict, str, list[Path]]:
    """All checks that need no model load: (folder, hf config, architecture, weight files).
    ``weights_known(folder, weight files)`` is called before the (slowest) tensor check."""
    model_dir = resolve_model_dir(section, progress=progress)
    cfg = read_hf_config(model_dir)
    arch = check_config(cfg, model_dir)
    weights = check_weight_files(model_dir)
    if weights_known is not None:
        weights_known(model_dir, weights)
    check_tensors(model_dir, weights, section.trust_remote_code)
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


def check_config(cfg: dict, model_dir: Path) -> str:
    """Every check of config.json alone, before any weight is read: the architecture (the table's rows),
    its attention window, its dimensions. `trtconv plan` and `doctor` call this same function, so they
    never say "fits" for a model the build refuses. Returns the architecture."""
    from trtconv.memory_plan import check_dimensions

    arch = check_architecture(cfg, model_dir)
    check_attention_window(cfg, arch, model_dir / "config.json", ModelError)
    check_dimensions(cfg, model_dir / "config.json")
    return arch


def check_recipe_against_model(recipe: Recipe, hf_cfg: dict, model_dir: Path) -> None:
    """The recipe against the model's config.json: the family's exports, sequence lengths, the parallel
    split (build, plan, doctor)."""
    from trtconv.architectures import row_for_config

    row = row_for_config(hf_cfg)
    if row is not None:
        check_family(recipe, row.hf_name, model_dir)
    check_lengths(recipe, hf_cfg, model_dir)
    check_parallelism(recipe, hf_cfg)


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


def check_family(recipe: Recipe, arch: str, model_dir: Path) -> None:
    """The recipe's exports against what the family's row converts (trtconv.architectures), before any work."""
    from trtconv.architectures import ARCHITECTURES
    from trtconv.artifact.layout import CHECKPOINT_DIR
    from trtconv.engine.targets import ENGINE_TARGETS

    check_expert_precision(recipe, arch, model_dir)
    check_kv_cache(recipe, arch, model_dir)
    why = ARCHITECTURES[arch].no_trtllm_checkpoint
    target = ENGINE_TARGETS.get(recipe.engine.target)
    if why is None:
        return
    if recipe.export.tensorrt_llm_checkpoint or (target is not None and target.source_dir == CHECKPOINT_DIR):
        raise UserError(
            f"{model_dir / 'config.json'}: {arch}: export.tensorrt_llm_checkpoint (and engine target tensorrt) is not "
            f"available: {why}"
        )
    if not recipe.export.hf_checkpoint:
        raise UserError(f"{model_dir / 'config.json'}: {arch} ships as the unified HF checkpoint only; set "
                        "export.hf_checkpoint: true (and export.tensorrt_llm_checkpoint: false)")


def check_expert_precision(recipe: Recipe, arch: str, model_dir: Path) -> None:
    """A mixture-of-experts family converts only the precisions its row lists (trtconv.architectures.Experts)."""
    from trtconv.architectures import ARCHITECTURES

    experts = ARCHITECTURES[arch].experts
    outside = [p for p in recipe.quantization.precisions_used if p not in experts.precisions] if experts else []
    if not outside:
        return
    precision = f"auto with the candidate {outside[0]} (quantization.search.candidates)" if recipe.quantization.is_auto \
        else recipe.quantization.precision
    raise UserError(
        f"{model_dir / 'config.json'}: {arch} (mixture of experts) with quantization.precision {precision}: not converted "
        f"({experts.why_not}); allowed for {arch}: {', '.join(experts.precisions)}"
    )


def check_kv_cache(recipe: Recipe, arch: str, model_dir: Path) -> None:
    """A family whose row refuses a quantized KV cache (trtconv.architectures.Architecture.no_kv_cache_quant)."""
    from trtconv.architectures import ARCHITECTURES

    why, kv = ARCHITECTURES[arch].no_kv_cache_quant, recipe.quantization.kv_cache
    if why is not None and kv != "none":
        raise UserError(f"{model_dir / 'config.json'}: {arch} with quantization.kv_cache {kv}: not converted ({why}); "
                        f"allowed for {arch}: none")


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
    check_stage_exclusions(recipe, layers)


# The quantized linears of a decoder layer, as ModelOpt names their weight quantizers (what exclude matches).
_LAYER_QUANTIZERS = tuple(f"{m}.weight_quantizer" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def check_stage_exclusions(recipe: Recipe, layers: int | None) -> None:
    """With pp_size > 1 a TensorRT-LLM checkpoint holds one exclude_modules list, in stage-local layer
    numbers, for every stage (checkpoints.trtllm_format): every stage must exclude the same local layers.
    Refused here, before calibration, instead of at export (e.g. the failed gate's '*layers.0.*')."""
    import fnmatch

    pp = recipe.export.pp_size
    if pp == 1 or not layers or layers % pp or not recipe.quantization.exclude:
        return
    patterns = [p if p.endswith("*") else p + "*" for p in recipe.quantization.exclude]  # as calibrate applies them
    per = layers // pp

    def excluded(stage: int) -> set[tuple[int, str]]:
        return {(i, q) for i in range(per) for q in _LAYER_QUANTIZERS
                if any(fnmatch.fnmatch(f"model.layers.{stage * per + i}.{q}", p) for p in patterns)}

    first = excluded(0)
    other = next((s for s in range(1, pp) if excluded(s) != first), None)
    if other is not None:
        raise UserError(
            f"quantization.exclude {recipe.quantization.exclude} with export.pp_size {pp} excludes different layers on "
            f"pipeline stage 0 and stage {other}: a TensorRT-LLM checkpoint holds one exclude list, in stage-local "
            "layer numbers, for every stage; use export.pp_size 1, or exclude modules of every layer (e.g. '*o_proj*')"
        )


def data_input(role: str, path: Path, table=None) -> InputRecord:
    """A data file's or folder's record; a file's hash comes from ``table`` (a HashTable the caller
    saves), else from a table of its own, saved here."""
    if path.is_file():
        from trtconv.cache.hashes import HashTable

        own = table is None
        table = HashTable() if own else table
        files = [FileRecord(path=path.name, sha256=table.sha256(path), size=path.stat().st_size)]
        if own:
            table.save()
        return InputRecord(role=role, root=str(path.parent), files=files)
    return InputRecord(role=role, root=str(path), files=hash_tree(path, skip=set()))


def data_inputs(role: str, packs: list, table=None) -> list[InputRecord]:
    """One input record per pack, in the order the packs are read."""
    return [data_input(role, p.path, table) for p in packs]
