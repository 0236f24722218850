"""Logits of the artifact as TensorRT-LLM runs it: the built engine, or the PyTorch-backend LLM.

`engine_candidate(...)` turns an artifact whose engine stage reported "built" into a function
`ids[B, T] -> logits[B, T, vocab]` computed by TensorRT-LLM itself, for the accuracy gate. Where
that cannot run here it says why, and the caller falls back to trtconv's reference executor on the
checkpoint (what the gate used before).

TensorRT-LLM API this is written against (1.0-1.2; looked up in NVIDIA/TensorRT-LLM sources and docs):
- Backends: `tensorrt_llm._tensorrt_engine.LLM` loads an engine folder (`model=<engine dir>`,
  `tokenizer=` separately: the engine folder has none); `tensorrt_llm.LLM` is the PyTorch backend
  on the unified HF checkpoint (PR #5312; trtllm-reference.md §1.1, §4.1).
- `LLM.generate(inputs, sampling_params=None, use_tqdm=True, ...)` (tensorrt_llm/llmapi/llm.py):
  a list of token-id lists is a batch of prompts (a list whose first item is an int is ONE prompt);
  returns one RequestOutput per prompt.
- `SamplingParams` (tensorrt_llm/sampling_params.py) is a `@dataclass(slots=True, kw_only=True)`
  with `max_tokens: int = 32` and `return_context_logits: bool = False` ("Controls if Result should
  contain the context logits"); the docs page features/additional-outputs describes it as the
  logits of every prompt token. `RequestOutput.context_logits` is an `Optional[torch.Tensor]`
  (tensorrt_llm/executor/result.py), [prompt_len, vocab] per request.
- The TensorRT backend returns context logits only from an engine built with
  `gather_context_logits` (BuildConfig field, `--gather_context_logits`; examples/run.py help:
  "the engine must be built with gather_context_logits or gather_all_token_logits").
- `KvCacheConfig.enable_block_reuse` defaults to True (tensorrt_llm/llmapi/llm_args.py). With
  prefix block reuse, a request sharing a prefix with an earlier one only gets logits for the
  recomputed suffix (ModelOpt's modelopt/deploy/llm/generate.py asserts
  `enable_kv_cache_reuse=False` before `return_context_logits`), so it is switched off here.
- PyTorch backend: ModelOpt's same wrapper enables context logits from TensorRT-LLM 1.1.0rc2
  (`_support_context_logits_and_stop_words`), so 1.0.x falls back.

The result object (`EngineLogits`) is always returned: `.fn` is None and `.reason` says why when
TensorRT-LLM cannot produce the logits here. Close it (or use `with`) to shut the LLM down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from trtconv.engine.plan import parse_version
from trtconv.engine.stamp import check_engine_compatible, read_engine_stamp
from trtconv.engine.pytorch import OPTIONS_FILE
from trtconv.engine.record import NOT_INSTALLED_REASON, TrtllmInstall, probe_tensorrt_llm
from trtconv.artifact.layout import ENGINE_DIR
from trtconv.engine.targets import ENGINE_TARGETS
from trtconv.core.environment import DeviceInfo, detect_device
from trtconv.core.errors import UserError
from trtconv.core.jsonio import read_json_object

PYTORCH_CONTEXT_LOGITS_MIN = (1, 1)  # ModelOpt: context logits on the PyTorch backend from 1.1.0rc2

LogitsFn = Callable[..., torch.Tensor]


@dataclass
class EngineLogits:
    """TensorRT-LLM's logits for an artifact, or why there are none here.

    fn(ids [B, T] long, lengths=None) -> float32 [B, T, vocab] on ids.device. `lengths` (real tokens
    per right-padded row) keeps padding out of the runtime; positions past a row's length are 0.
    Without lengths every row is sent whole, which is still correct for a causal model at the real
    positions, just wasted work.
    """

    fn: LogitsFn | None
    description: str
    reason: str | None = None
    _llm: Any = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.fn is not None

    def close(self) -> None:
        """Shut the LLM down (its executor / MPI workers hold GPU memory until then)."""
        llm, self._llm = self._llm, None
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def __enter__(self) -> "EngineLogits":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unavailable(reason: str) -> EngineLogits:
    return EngineLogits(fn=None, description="", reason=reason)


def engine_candidate(
    artifact_root: Path,
    engine_record: dict[str, Any],
    vocab: int,
    *,
    tokenizer_dir: Path,
    seq_len: int | None = None,
    device: DeviceInfo | None = None,
    install: TrtllmInstall | None = None,
) -> EngineLogits:
    """TensorRT-LLM's context logits for the artifact at artifact_root, or an EngineLogits with a reason.

    engine_record is the manifest's `engine` section (EngineRecord as JSON). seq_len, when given,
    is checked against the engine's limits up front. device / install default to this machine.
    """
    artifact_root = Path(artifact_root)
    engine_dir = artifact_root / ENGINE_DIR
    target = engine_record.get("target")
    why = _why_not_ready(engine_record, engine_dir)
    if why:
        return unavailable(why)
    install = install or probe_tensorrt_llm()
    if not install.importable:
        return unavailable(NOT_INSTALLED_REASON.replace("not built: ", "") + (f" (import failed: {install.error})" if install.error else ""))
    device = device or detect_device()
    why = _why_not_on_this_host(engine_dir, device, install)
    if why:
        return unavailable(why)
    from trtconv.engine.backends import BACKENDS

    return BACKENDS[target].candidate(engine_dir, artifact_root, Path(tokenizer_dir), vocab, seq_len, install)


def _why_not_ready(engine_record: dict[str, Any], engine_dir: Path) -> str | None:
    target, status = engine_record.get("target"), engine_record.get("status")
    if target not in ENGINE_TARGETS:
        return f"engine target is {target!r}: there is no TensorRT-LLM runtime to judge"
    if status != "built":
        detail = f" ({engine_record['reason']})" if engine_record.get("reason") else ""
        return f"the {target} engine status is {status!r}, not 'built'{detail}"
    if not engine_dir.is_dir():
        return f"{engine_dir} is missing although the engine record says built"
    return None


def _why_not_on_this_host(engine_dir: Path, device: DeviceInfo, install: TrtllmInstall) -> str | None:
    try:
        check_engine_compatible(engine_dir, device, {"tensorrt_llm": install.version, "tensorrt": install.tensorrt_version})
        stamp = read_engine_stamp(engine_dir)
    except UserError as exc:  # a mismatching host is a reason to fall back, not a crash
        return str(exc)
    if device.kind != "cuda":
        return f"TensorRT-LLM needs a CUDA GPU and none is visible here ({device.name})"
    world_size = int(stamp.get("world_size") or 1)
    if device.count and device.count < world_size:
        return f"the engine needs {world_size} GPUs (world_size), {device.count} visible here"
    return None


def tensorrt_candidate(engine_dir: Path, tokenizer_dir: Path, vocab: int, seq_len: int | None) -> EngineLogits:
    build = _engine_build_config(engine_dir)
    if build.get("gather_context_logits") is not True:
        return unavailable(
            f"{engine_dir} was built without gather_context_logits, so TensorRT-LLM returns no prompt logits: set "
            "engine.tensorrt.gather_context_logits: true and rebuild (`trtconv engine OUT`)"
        )
    max_input_len = build.get("max_input_len")
    if seq_len is not None and isinstance(max_input_len, int) and seq_len > max_input_len:
        return unavailable(f"evaluation rows of {seq_len} tokens exceed the engine's max_input_len {max_input_len}")
    try:
        from tensorrt_llm import SamplingParams
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        # dtype stays "auto" on this backend: the engine fixes the KV-cache dtype. The sliding window
        # is a run-time setting: passed explicitly, not left to the engine's runtime_defaults.
        kv_cache = {"enable_block_reuse": False}
        window = _engine_attention_window(engine_dir)
        if window is not None:
            kv_cache["max_attention_window"] = [window]
        llm = LLM(model=str(engine_dir), tokenizer=str(tokenizer_dir), kv_cache_config=KvCacheConfig(**kv_cache))
    except Exception as exc:  # noqa: BLE001 - the gate still runs on the checkpoint; the reason is recorded
        return unavailable(f"engine failed to load: {type(exc).__name__}: {exc}")
    description = f"TensorRT engine ({engine_dir.name}/) via tensorrt_llm._tensorrt_engine.LLM context logits"
    return EngineLogits(_logits_fn(llm, SamplingParams, vocab), description, None, llm)


def pytorch_candidate(engine_dir: Path, hf_dir: Path, vocab: int, seq_len: int | None, install: TrtllmInstall) -> EngineLogits:
    if install.version is None or parse_version(install.version)[:2] < PYTORCH_CONTEXT_LOGITS_MIN:
        return unavailable(f"TensorRT-LLM {install.version}: the PyTorch backend returns context logits from 1.1 on")
    options_path = engine_dir / OPTIONS_FILE
    if not options_path.is_file():
        return unavailable(f"{options_path} is missing: rebuild the engine (`trtconv engine OUT`)")
    options = yaml.safe_load(options_path.read_text(encoding="utf-8")) or {}
    max_seq_len = options.get("max_seq_len")
    if seq_len is not None and isinstance(max_seq_len, int) and seq_len + 1 > max_seq_len:
        return unavailable(f"evaluation rows of {seq_len} tokens (+1 generated) exceed the options' max_seq_len {max_seq_len}")
    try:
        from tensorrt_llm import LLM, SamplingParams

        llm = LLM(model=str(hf_dir), **_llm_kwargs_without_block_reuse(options))
    except Exception as exc:  # noqa: BLE001 - the gate still runs on the checkpoint; the reason is recorded
        return unavailable(f"PyTorch-backend LLM failed to load {hf_dir}: {type(exc).__name__}: {exc}")
    description = f"unified HF checkpoint via tensorrt_llm.LLM (PyTorch backend, {OPTIONS_FILE}) context logits"
    return EngineLogits(_logits_fn(llm, SamplingParams, vocab), description, None, llm)


def _llm_kwargs_without_block_reuse(options: dict[str, Any]) -> dict[str, Any]:
    from trtconv.engine.smoke import llm_kwargs

    options = dict(options)
    # Prefix block reuse truncates context logits of requests that share a prefix (see module docstring).
    options["kv_cache_config"] = {**(options.get("kv_cache_config") or {}), "enable_block_reuse": False}
    return llm_kwargs(options)


def _engine_attention_window(engine_dir: Path) -> int | None:
    """The sliding window the engine's checkpoint carried (pretrained_config.runtime_defaults)."""
    from trtconv.checkpoints.trtllm_format import attention_window

    config = read_json_object(Path(engine_dir) / "config.json", "the engine config trtllm-build wrote", UserError)
    return attention_window(config.get("pretrained_config") or {})


def _engine_build_config(engine_dir: Path) -> dict[str, Any]:
    # The engine's own config.json is what trtllm-build actually did; the recipe is only what was asked.
    config = read_json_object(Path(engine_dir) / "config.json", "the engine config trtllm-build wrote", UserError)
    return config.get("build_config") or {}


def _logits_fn(llm: Any, sampling_params_cls: Any, vocab: int) -> LogitsFn:
    # One generated token is the least generate() produces; only the prompt's logits are used.
    params = sampling_params_cls(max_tokens=1, return_context_logits=True)

    def logits(ids: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        batch, length = ids.shape
        lengths = [length] * batch if lengths is None else [int(n) for n in lengths]
        if len(lengths) != batch or any(n < 0 or n > length for n in lengths):
            raise ValueError(f"lengths {lengths} do not fit input ids of shape {tuple(ids.shape)}")
        rows = [row[:n] for row, n in zip(ids.tolist(), lengths)]
        out = torch.zeros(batch, length, vocab, dtype=torch.float32, device=ids.device)
        sent = [j for j in range(batch) if lengths[j] > 0]  # the LLM API refuses empty prompts
        if sent:
            outputs = llm.generate([rows[j] for j in sent], sampling_params=params, use_tqdm=False)
            for j, output in zip(sent, outputs, strict=True):
                out[j, : lengths[j]] = _row_logits(output, lengths[j], vocab, j).to(out.device)
        return out

    return logits


def _row_logits(output: Any, length: int, vocab: int, row: int) -> torch.Tensor:
    logits = getattr(output, "context_logits", None)
    if logits is None:
        raise RuntimeError(f"row {row}: TensorRT-LLM returned no context_logits although return_context_logits=True")
    if logits.dim() != 2 or logits.shape[0] != length or logits.shape[1] < vocab:
        raise RuntimeError(f"row {row}: context_logits has shape {tuple(logits.shape)}, expected [{length}, >= {vocab}]")
    # Padded vocabularies (AWQ exports, TP-padded lm_head) carry ids that are never real tokens.
    return logits[:, :vocab].float()
