"""TensorRT-LLM engine targets: the tensorrt and pytorch backends, plan checks, logits, smoke, record, stamp."""
