from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        tl.store(k_cache_ptr + slot * ROW + offs, tl.load(k_ptr + token * stride_kt + offs, mask=mask), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, tl.load(v_ptr + token * stride_vt + offs, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] (rows contiguous); caches: [blocks, block_size, kv_heads, head_dim]."""
    T, heads, dim = k.shape
    row = heads * dim
    assert k.stride(1) == dim and k.stride(2) == 1 and v.stride(1) == dim and v.stride(2) == 1
    if T:
        _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                               ROW=row, ROW_PAD=triton.next_power_of_2(row))
