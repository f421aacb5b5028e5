"""Torch references of the paged attention kernels (decode.py, prefill.py, store_kv.py):
the CPU path's attention and the ground truth the kernels are tested against. No Triton
here, so the CPU path can import it on a machine without Triton."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale) -> torch.Tensor:
    """Plain torch, one sequence at a time; rows of no sequence (and empty sequences) are zero."""
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
        out[start:stop] = attend(q[start:stop].float(), k_flat[slots].float(), v_flat[slots].float(), scale,
                                 group).to(q.dtype)
    return out


prefill_attention_ref = paged_attention_ref


def decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    query_start = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = v[keep]
