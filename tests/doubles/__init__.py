"""TEST DOUBLES of TensorRT-LLM / TensorRT for trtconv's tests. Never shipped, never imported by trtconv."""
