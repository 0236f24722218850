"""TEST DOUBLE of tensorrt_llm.llmapi: the two config objects trtconv's smoke check constructs.

Like the real ones they are pydantic models that forbid unknown fields.
"""

from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class KvCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_block_reuse: bool = True  # TensorRT-LLM 1.x default (llm_args.KvCacheConfig)
    dtype: Literal["auto", "fp8"] = "auto"
    free_gpu_memory_fraction: Optional[float] = Field(0.9, gt=0.0, le=1.0)
    # One window per layer, repeated when shorter than the layer count (llm_args.KvCacheConfig).
    max_attention_window: Optional[List[int]] = None

    @field_validator("max_attention_window")
    @classmethod
    def _positive(cls, value: Optional[List[int]]) -> Optional[List[int]]:
        if value is not None and (not value or any(w < 1 for w in value)):
            raise ValueError(f"max_attention_window must be a non-empty list of positive ints, got {value}")
        return value


class CudaGraphConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_sizes: Optional[List[int]] = None
    max_batch_size: int = 0
    enable_padding: bool = False
