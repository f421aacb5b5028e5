"""Paged prefill/extend attention: each sequence computes `q_len` new tokens on
top of `seq_len - q_len` tokens already in the cache (a prefix hit or earlier
chunks). The new tokens' K/V are stored first, so keys come from the cache
alone; query i (at position prefix + i) sees keys 0 ..= prefix + i."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(q: torch.Tensor) -> str:
    """float32 runs use exact IEEE products (the reference path); half types use tensor cores."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, n, n_ok, kv_head, d, stride_kb, stride_ks, stride_kh,
                 PAGE: tl.constexpr):
    """K and V [len(n), head_dim] of key positions n of one kv head, through the sequence's block table."""
    page = tl.load(table_ptr + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    offset = page * stride_kb + (n % PAGE) * stride_ks + kv_head * stride_kh
    k = tl.load(k_cache_ptr + offset[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offset[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
                    scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    m_idx = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m_idx < q_len
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + m_idx)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=m_ok[:, None], other=0.0)
    query_pos = prefix + m_idx

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)  # keys past the tile's last query are masked
    end = tl.where(m_block * BLOCK_M < q_len, end, 0)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, n, n_ok, kv_head, d,
                            stride_kb, stride_ks, stride_kh, PAGE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(n_ok[None, :] & (n[None, :] <= query_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (q_start + m_idx)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, heads, dim], tokens of sequence i at query_start[i]:query_start[i+1];
    seq_lens: [B] context length after this step; block_tables: [B, max_blocks] int32."""
    T, H, D = q.shape
    _, page, kv_heads, _ = k_cache.shape
    B = seq_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    block_m = 64 if D <= 128 else 32
    grid = (triton.cdiv(max(max_query_len, 1), block_m), B, H)
    _prefill_kernel[grid](q, k_cache, v_cache, out, block_tables, seq_lens, query_start, scale,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
                          k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), GROUP=H // kv_heads,
                          HEAD_DIM=D, PAGE=page, BLOCK_M=block_m, BLOCK_N=32 if D > 128 else 64,
                          PRECISION=dot_precision(q), num_warps=4, num_stages=2)
    return out
