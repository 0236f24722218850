"""TEST DOUBLE of tensorrt_llm.llmapi: the two config objects trtconv's smoke check constructs.

Like the real ones they are pydantic models that forbid unknown fields.
"""

from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class KvCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_block_reuse: bool = True  # TensorRT-LLM 1.x default (llm_args.KvCacheConfig)
    dtype: Literal["auto", "fp8"] = "auto"
    free_gpu_memory_fraction: Optional[float] = Field(0.9, gt=0.0, le=1.0)


class CudaGraphConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_sizes: Optional[List[int]] = None
    max_batch_size: int = 0
    enable_padding: bool = False
