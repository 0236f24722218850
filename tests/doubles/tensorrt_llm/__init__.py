"""!!! TEST DOUBLE of `tensorrt_llm` -- NOT TensorRT-LLM, builds no engines, runs no model !!!

It lives in trtconv's tests/doubles/ and exists only so trtconv's engine stage can be tested on
machines without TensorRT-LLM (it cannot be installed there). It enforces the documented
contract of TensorRT-LLM 1.0-1.2 strictly (see tensorrt_llm/commands/build.py here for
`trtllm-build`, _double_llm.py for `LLM`), and writes clearly fake outputs.

`__version__` is "1.2.0" unless the environment variable TRTCONV_DOUBLE_TRTLLM_VERSION says otherwise.
"""

import os

TRTCONV_TEST_DOUBLE = True
__version__ = os.environ.get("TRTCONV_DOUBLE_TRTLLM_VERSION", "1.2.0")

from tensorrt_llm._double_llm import LLM, SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]
