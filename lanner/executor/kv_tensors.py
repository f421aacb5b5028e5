"""The paged KV-cache tensors of a decoder (the target's, or a draft's beside it)."""
from __future__ import annotations

import torch

from lanner.kernels.attention.reference import FP8_KV_DTYPE


def kv_cache_element_type(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for CacheConfig.kv_cache_dtype (EngineConfig checked the choice)."""
    return {"auto": model_dtype, "fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}[kv_cache_dtype]


def kv_block_bytes(spec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block of K and V over all of `spec`'s layers."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


def allocate_kv_caches(spec, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V of [num_blocks, block_size, kv_heads, head_dim], zeroed."""
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)]
