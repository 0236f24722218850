"""TEST DOUBLE of `tensorrt_llm.commands.build` (the `trtllm-build` CLI of TensorRT-LLM 1.0-1.2).

Enforces the documented contract (trtllm-reference.md §3, §4.1, §2) and builds nothing real:
- exactly the documented flags of the version in TRTCONV_DOUBLE_TRTLLM_VERSION (argparse; an
  unknown flag exits 2 "unrecognized arguments", like the real one; --auto_parallel,
  --gpus_per_node and --cluster_key exist only before 1.2); no prefix abbreviations;
- choices of every enum / enable|disable flag;
- --opt_num_tokens with --multiple_profiles enable is refused (RuntimeError);
- the checkpoint is load-checked like TensorRT-LLM's loader (tensorrt_llm/_double_checkpoint.py);
- output: config.json with exactly version / pretrained_config / build_config (which records
  gather_context_logits / gather_generation_logits, read back by the double's runtime LLM), and one
  rank{N}.engine per rank whose content is a clearly fake header + the rank file's sha256.
Hooks for failure tests (env): TRTCONV_DOUBLE_BUILD_CRASH_AFTER_RANK=N (write rank0..N engines,
then die with exit 134), TRTCONV_DOUBLE_BUILD_SKIP_RANK=N (exit 0 but leave rankN.engine out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import tensorrt_llm
from tensorrt_llm._double_checkpoint import CheckpointRejected, check_rank_file, load_config

FAKE_ENGINE_HEADER = b"TRTCONV TEST DOUBLE ENGINE -- NOT A TENSORRT PLAN\n"
DTYPES = ["auto", "float16", "float32", "bfloat16", "int32", "disable"]
ENABLE = ["enable", "disable"]
# (flag, default) of the dtype-valued plugin flags and of the enable/disable feature flags.
DTYPE_PLUGINS = {"gpt_attention_plugin": "auto", "bert_attention_plugin": "auto", "lora_plugin": None, "moe_plugin": "auto",
                 "mamba_conv1d_plugin": "auto", "nccl_plugin": "auto"}
BOOL_FEATURES = {"context_fmha": "enable", "bert_context_fmha_fp32_acc": "disable", "remove_input_padding": "enable",
                 "use_paged_context_fmha": "enable", "use_fp8_context_fmha": "enable", "fuse_fp4_quant": "disable",
                 "multiple_profiles": "disable", "streamingllm": "disable", "norm_quant_fusion": "disable",
                 "reduce_fusion": "disable", "user_buffer": "disable", "pp_reduce_scatter": "disable", "paged_state": "enable",
                 "use_fused_mlp": "enable", "dora_plugin": "disable"}


def _version() -> tuple[int, int]:
    major, minor = tensorrt_llm.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtllm-build", allow_abbrev=False)
    for flag in ("--checkpoint_dir", "--model_config", "--build_config", "--model_cls_file", "--model_cls_name",
                 "--input_timing_cache", "--visualize_network"):
        p.add_argument(flag, type=str, default=None)
    p.add_argument("--output_dir", type=str, default="engine_outputs")
    p.add_argument("--output_timing_cache", type=str, default="model.cache")
    for flag, default in (("--max_batch_size", 2048), ("--max_input_len", 1024), ("--max_beam_width", 1), ("--max_num_tokens", 8192),
                          ("--max_encoder_input_len", 1024), ("--workers", 1), ("--max_lora_rank", 64), ("--max_draft_len", 0)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--max_seq_len", "--max_decoder_seq_len", dest="max_seq_len", type=int, default=None)
    p.add_argument("--opt_num_tokens", type=int, default=None)
    p.add_argument("--max_prompt_embedding_table_size", "--max_multimodal_len", dest="max_prompt_embedding_table_size", type=int, default=0)
    p.add_argument("--kv_cache_type", choices=["continuous", "paged", "disabled"], default=None)
    p.add_argument("--paged_kv_cache", choices=ENABLE, default=None)  # deprecated spelling of --kv_cache_type paged
    p.add_argument("--profiling_verbosity", choices=["layer_names_only", "detailed", "none"], default="layer_names_only")
    for flag in ("--strip_plan", "--weight_sparsity", "--weight_streaming", "--fast_build", "--enable_debug_output", "--dry_run",
                 "--monitor_memory", "--gather_context_logits", "--gather_generation_logits", "--gather_all_token_logits"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--log_level", choices=["internal_error", "error", "warning", "info", "verbose", "debug", "trace"], default="info")
    p.add_argument("--logits_dtype", choices=["float16", "float32"], default=None)
    p.add_argument("--lora_dir", nargs="+", default=None)
    p.add_argument("--lora_ckpt_source", choices=["hf", "nemo"], default="hf")
    p.add_argument("--lora_target_modules", nargs="+", default=None)
    p.add_argument("--speculative_decoding_mode", default=None,
                   choices=["draft_tokens_external", "lookahead_decoding", "medusa", "explicit_draft_tokens", "eagle"])
    for name, default in DTYPE_PLUGINS.items():
        p.add_argument(f"--{name}", choices=DTYPES, default=default or "disable")
    p.add_argument("--gemm_plugin", choices=[*DTYPES, "fp8", "nvfp4"], default=None)
    for name in ("gemm_swiglu_plugin", "low_latency_gemm_plugin", "low_latency_gemm_swiglu_plugin"):
        p.add_argument(f"--{name}", choices=["fp8", "disable"], default="disable")
    p.add_argument("--fp8_rowwise_gemm_plugin", choices=DTYPES, default="disable")
    p.add_argument("--gemm_allreduce_plugin", choices=["float16", "bfloat16", "disable"], default="disable")
    for name, default in BOOL_FEATURES.items():
        p.add_argument(f"--{name}", choices=ENABLE, default=default)
    p.add_argument("--tokens_per_block", type=int, default=32)
    if _version() < (1, 2):  # auto-parallel planner, removed in 1.2 (PR #8329)
        p.add_argument("--auto_parallel", type=int, default=1)
        p.add_argument("--gpus_per_node", type=int, default=8)
        p.add_argument("--cluster_key", type=str, default=None)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.opt_num_tokens is not None and args.multiple_profiles == "enable":
        raise RuntimeError("multiple_profiles is enabled, please set opt_num_tokens to None")
    if args.streamingllm == "enable" and _version() >= (1, 2):
        raise AssertionError("StreamingLLM is no longer supported")
    if args.checkpoint_dir is None:
        raise SystemExit("TEST DOUBLE: building with dummy weights (no --checkpoint_dir) is not modelled")


def build_config(args: argparse.Namespace, config: dict) -> dict:
    quant_algo = (config.get("quantization") or {}).get("quant_algo")
    fp8_model = quant_algo in ("FP8", "NVFP4")
    plugin_config = {name: getattr(args, name) for name in [*DTYPE_PLUGINS, "gemm_plugin", "tokens_per_block"]}
    plugin_config.update({name: getattr(args, name) == "enable" for name in BOOL_FEATURES})
    plugin_config["use_fp8_context_fmha"] = plugin_config["use_fp8_context_fmha"] and fp8_model  # ignored off FP8
    plugin_config["use_fused_mlp"] = plugin_config["use_fused_mlp"] and quant_algo in ("FP8", "MIXED_PRECISION")
    kv_cache_type = args.kv_cache_type or ("continuous" if args.paged_kv_cache == "disable" else "paged")
    return {
        "max_input_len": args.max_input_len,
        "max_seq_len": args.max_seq_len or int(config.get("max_position_embeddings", 2048)),
        "max_batch_size": args.max_batch_size,
        "max_beam_width": args.max_beam_width,
        "max_num_tokens": args.max_num_tokens,
        "opt_num_tokens": args.opt_num_tokens,
        "opt_batch_size": 8,
        "kv_cache_type": kv_cache_type.upper(),
        "strongly_typed": True,
        # BuildConfig fields (default False); --gather_all_token_logits sets both, as in build.py.
        "gather_context_logits": bool(args.gather_context_logits or args.gather_all_token_logits),
        "gather_generation_logits": bool(args.gather_generation_logits or args.gather_all_token_logits),
        "plugin_config": plugin_config,
    }


def write_engine(output_dir: Path, config: dict, args: argparse.Namespace, headers: dict[int, str]) -> None:
    world_size = config["mapping"]["world_size"]
    pretrained = {k: v for k, v in config.items() if k != "rank"}
    engine_config = {"version": tensorrt_llm.__version__, "pretrained_config": pretrained, "build_config": build_config(args, config)}
    crash_after = os.environ.get("TRTCONV_DOUBLE_BUILD_CRASH_AFTER_RANK")
    skip = os.environ.get("TRTCONV_DOUBLE_BUILD_SKIP_RANK")
    for rank in range(world_size):
        if skip is not None and rank == int(skip):
            continue
        body = json.dumps({"rank": rank, "checkpoint_sha256": headers[rank]}).encode()
        (output_dir / f"rank{rank}.engine").write_bytes(FAKE_ENGINE_HEADER + body + b"\n")
        if crash_after is not None and rank == int(crash_after):
            print("TEST DOUBLE: simulated crash in the middle of the build", file=sys.stderr, flush=True)
            os._exit(134)
    (output_dir / "config.json").write_text(json.dumps(engine_config, indent=4))


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    print(f"[TensorRT-LLM] TensorRT LLM version: {tensorrt_llm.__version__} (TEST DOUBLE)", flush=True)
    if _version() >= (1, 3):
        print("LEGACY WARNING: the TensorRT engine backend is deprecated", file=sys.stderr)
    try:
        check_args(args)
        checkpoint_dir = Path(args.checkpoint_dir)
        config = load_config(checkpoint_dir)
        digests = {}
        for rank in range(config["mapping"]["world_size"]):
            _, warnings = check_rank_file(checkpoint_dir, config, rank)
            for warning in warnings:
                print(warning, file=sys.stderr)
            digests[rank] = hashlib.sha256((checkpoint_dir / f"rank{rank}.safetensors").read_bytes()).hexdigest()
    except CheckpointRejected as exc:
        print(f"Traceback (most recent call last):\n  (TEST DOUBLE)\n{exc}", file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, AssertionError) as exc:
        print(f"Traceback (most recent call last):\n  (TEST DOUBLE)\n{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        write_engine(output_dir, config, args, digests)
    print(f"[TensorRT-LLM] [I] Total time of building all engines: 00:00:00 (TEST DOUBLE, {len(digests)} ranks)")
    return 0
