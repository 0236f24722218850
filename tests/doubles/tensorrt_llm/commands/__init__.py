"""TEST DOUBLE: tensorrt_llm.commands (only `build`, the trtllm-build entry point)."""
