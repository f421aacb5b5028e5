"""Torch references of the paged attention kernels (decode.py, prefill.py, store_kv.py):
the CPU path's attention and the ground truth the kernels are tested against. No Triton
here, so the CPU path can import it on a machine without Triton."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_KV_DTYPE = torch.float8_e4m3fn  # an fp8 KV cache's elements (kv_cache_dtype fp8)
FP8_E4M3_MAX = 448.0  # e4m3's largest finite value: a cast of anything larger gives NaN


def to_cache_ref(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it (store_kv.cache_value): x / scale, saturated for fp8."""
    if cache_dtype == x.dtype and scale == 1.0:
        return x
    y = x.float() * (1.0 / scale)
    if cache_dtype == FP8_KV_DTYPE:
        y = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(cache_dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """Causal attention of the last q_len positions of a context over all of it.
    q: [q_len, heads, d]; k, v: [ctx_len, kv_heads, d]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    query_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
    mask = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos[:, None]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def from_cache_ref(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cache elements back as values of `dtype` (an fp8 element widens exactly), times the scale."""
    return x.to(dtype) if scale == 1.0 else (x.float() * scale).to(dtype)


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, k_scale=1.0,
                        v_scale=1.0) -> torch.Tensor:
    """Plain torch, one sequence at a time; rows of no sequence (and empty sequences) are zero. The
    caches hold K / k_scale and V / v_scale."""
    page = k_cache.shape[1]
    k_flat = k_cache.reshape(-1, *k_cache.shape[2:])
    v_flat = v_cache.reshape(-1, *v_cache.shape[2:])
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[2]
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, stop = int(query_start[i]), int(query_start[i + 1])
        if seq_len == 0 or stop == start:
            continue
        pos = torch.arange(seq_len, device=q.device)
        slots = block_tables[i, pos // page].long() * page + pos % page
        out[start:stop] = attend(q[start:stop].float(), from_cache_ref(k_flat[slots], torch.float32, k_scale),
                                 from_cache_ref(v_flat[slots], torch.float32, v_scale), scale, group).to(q.dtype)
    return out


prefill_attention_ref = paged_attention_ref


def decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0):
    query_start = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, k_scale, v_scale)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = to_cache_ref(k[keep], k_cache.dtype, k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = to_cache_ref(v[keep], v_cache.dtype, v_scale)
