"""Smoke check of the `pytorch` target, run as a child process: `python -m trtconv.engine.smoke`.

Loads `tensorrt_llm.LLM(model=<unified HF checkpoint>, **<llm_api_options.yaml>)` once and
generates a few tokens. A child process, like trtllm-build, so the LLM's GPU memory and MPI
workers are gone when it exits, and a crash cannot take the pipeline down.
Prints one line `TRTCONV_SMOKE {"text": ..., "token_ids": [...]}` on success.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

SMOKE_PREFIX = "TRTCONV_SMOKE "
SMOKE_PROMPT = "The capital of France is"
SMOKE_MAX_TOKENS = 8


def llm_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The YAML's options as LLM(...) keyword arguments: nested dicts become the LLM API's config objects."""
    from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

    kwargs = dict(options)
    if "kv_cache_config" in kwargs:
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
    if kwargs.get("cuda_graph_config") is not None:
        kwargs["cuda_graph_config"] = CudaGraphConfig(**kwargs["cuda_graph_config"])
    return kwargs


def run_smoke(model_dir: str, options_path: str) -> dict[str, Any]:
    from tensorrt_llm import LLM, SamplingParams

    with open(options_path, encoding="utf-8") as f:
        options = yaml.safe_load(f) or {}
    llm = LLM(model=model_dir, **llm_kwargs(options))
    try:
        outputs = llm.generate([SMOKE_PROMPT], SamplingParams(max_tokens=SMOKE_MAX_TOKENS))
        completion = outputs[0].outputs[0]
        return {"text": completion.text, "token_ids": [int(t) for t in completion.token_ids]}
    finally:
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trtconv.engine.smoke", description=__doc__)
    parser.add_argument("--model", required=True, help="unified HF checkpoint folder")
    parser.add_argument("--options", required=True, help="llm_api_options.yaml")
    args = parser.parse_args(argv)
    result = run_smoke(args.model, args.options)
    if not result["token_ids"]:
        print("smoke check generated no tokens", file=sys.stderr)
        return 1
    print(SMOKE_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
