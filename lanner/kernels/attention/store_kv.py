"""Writing this step's K/V into the paged cache, and what a cache element holds: the value
divided by the cache's scale, saturated to e4m3's range when the cache is fp8 (a plain cast
would overflow to NaN); in a cache of the model's dtype, the value itself."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels import next_power_of_2
from lanner.kernels.attention.reference import FP8_E4M3_MAX

_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)


@triton.jit
def cache_value(x, inv_scale, cache_ptr):
    """x as an element of the cache at `cache_ptr` stores it (scale 1: exact for a model-dtype cache)."""
    y = x.to(tl.float32) * inv_scale
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        y = tl.clamp(y, -_FP8_MAX, _FP8_MAX)
    return y.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt, k_inv_scale,
                     v_inv_scale, ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, cache_value(k, k_inv_scale, k_cache_ptr), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, cache_value(v, v_inv_scale, v_cache_ptr), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [T, kv_heads, head_dim] (rows contiguous); caches: [blocks, block_size, kv_heads, head_dim],
    of the model's dtype or fp8 (e4m3) holding k / k_scale and v / v_scale."""
    T, heads, dim = k.shape
    row = heads * dim
    assert k.stride(1) == dim and k.stride(2) == 1 and v.stride(1) == dim and v.stride(2) == 1
    if T:
        _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), 1.0 / k_scale,
                               1.0 / v_scale, ROW=row, ROW_PAD=next_power_of_2(row))
