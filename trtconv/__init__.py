"""trtconv: a Hugging Face checkpoint -> quantized TensorRT-LLM artifact, from one YAML recipe."""

__version__ = "0.1.0"
