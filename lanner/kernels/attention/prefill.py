"""Paged prefill/extend attention: each sequence computes `q_len` new tokens on
top of `seq_len - q_len` tokens already in the cache (a prefix hit or earlier
chunks). The new tokens' K/V are stored first, so keys come from the cache
alone; query i (at position prefix + i) sees keys 0 ..= prefix + i.

A tile is a few query positions times the query heads of one KV head (GQA), so
the keys and values it loads serve the whole group. Programs walk a tile table
planned on the host, one (sequence, query tile) entry each, heaviest first; the
table's first row holds its length. The grid is a number of programs that each
take every P-th tile: for a step, its tiles (capped); for a CUDA graph, what its
token count can need (`prefill_programs`). One graph then serves any mix of
sequences, and the captured grid has no program per possible tile (most of which
would be empty)."""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from lanner.kernels import next_power_of_2


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
def query_for_cache(q, k_cache_ptr):
    """q in the type a tile's dots run in, which its K/V tiles widen to: over an fp8 cache, fp16 for a
    16-bit q (e4m3 widens to fp16 in one instruction a pair, to bf16 in several; a bf16 q is exact in
    fp16 between ~6e-5 and 65,504 in magnitude, where attention's queries lie, and the probabilities
    gain precision); otherwise q's own."""
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        if q.dtype != tl.float32:
            q = q.to(tl.float16)
    return q


def prefill_tile(head_dim: int, group: int, num_tokens: int) -> tuple[int, int, int, int]:
    """(rows, keys, warps, stages) of a tile for a step of `num_tokens` query tokens: a tile's rows
    are query positions x the query heads of one KV head (`group`, padded to a power of two), so
    the keys it loads serve the whole group. Chosen from scripts/prefill_probe.py on an H200 (prompts
    of 64-8k tokens, and a 448-token chunk with 64 decode rows; timed in CUDA graphs since
    2026-12-04): small tiles while a step's keys are few or its queries short, large ones for long
    prompts. (32, 128) is the best for a 512-token prompt of 16 heads and within 10% of the best
    for a mixed step, where (16, 128) wins; 128 rows win a 512-token prompt of 32 heads by 24%.
    """
    stages = 2
    if head_dim > 128:
        rows, keys, warps = 64, 32, 4
    elif num_tokens > 1024:
        rows, keys, warps, stages = 128, 128, 8, 3
    elif num_tokens > 128:
        rows, keys, warps = 32, 128, 4
    else:
        rows, keys, warps = 16, 64, 4
    return max(rows, 16, next_power_of_2(group)), keys, warps, stages


def tile_positions(tile: tuple[int, int, int, int], group: int) -> int:
    """Query positions a tile of `tile`'s rows holds for a GQA group of `group` heads."""
    return tile[0] // next_power_of_2(group)


def prefill_tile_bound(num_tokens: int, max_seqs: int, positions: int) -> int:
    """The most tiles of `positions` query positions a step of `num_tokens` query tokens in at most
    `max_seqs` sequences has."""
    return -(-num_tokens // positions) + min(num_tokens, max_seqs)


def prefill_programs(num_tokens: int, num_tiles: int, num_kv_heads: int, positions: int, num_sms: int) -> int:
    """Programs a KV head for a step of `num_tokens` query tokens and up to `num_tiles` tiles: one
    per tile of a single long prompt, plus enough to keep the GPU busy (four a multiprocessor over
    the KV heads) when many short queries (decode rows of a mixed step) add tiles of their own."""
    return max(1, min(num_tiles, -(-num_tokens // positions) + -(-4 * num_sms // num_kv_heads)))


def prefill_tiles(query_lens, seq_lens, positions: int, capacity: int | None = None) -> np.ndarray:
    """The tile table [1 + capacity, 2] (int32): row 0 is (number of tiles, 0); then (sequence,
    query tile) of every tile of `positions` query positions, by keys to read, most first (the
    programs take them in turns); `capacity` (default: the tiles) leaves rows unused."""
    if len(query_lens) == 1:  # one prompt (a step's host time counts): its later tiles read more keys
        total = -(-query_lens[0] // positions)
        tiles = _tile_table(total, capacity)
        tiles[1:1 + total, 1] = np.arange(total - 1, -1, -1)
        return tiles
    q, s = np.asarray(query_lens, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64)
    per_seq = -(-q // positions)
    total = int(per_seq.sum())
    tiles = _tile_table(total, capacity)
    seq = np.repeat(np.arange(len(q)), per_seq)
    block = np.arange(total) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    keys = np.minimum(s[seq], (s - q)[seq] + (block + 1) * positions)
    order = np.argsort(-keys, kind="stable")
    tiles[1:1 + total, 0] = seq[order]
    tiles[1:1 + total, 1] = block[order]
    return tiles


def _tile_table(total: int, capacity: int | None) -> np.ndarray:
    """A zeroed tile table of `capacity` rows (default `total`) whose count says `total`."""
    capacity = total if capacity is None else capacity
    if total > capacity:
        raise ValueError(f"{total} prefill tiles do not fit a table of {capacity}")
    tiles = np.zeros((1 + capacity, 2), dtype=np.int32)
    tiles[0, 0] = total
    return tiles


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
                    tiles_ptr, scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks,
                    stride_kh, stride_bt, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_HEADS: tl.constexpr,
                    PRECISION: tl.constexpr):
    # the KV heads vary fastest over the programs, which the GPU starts in order: every head's heaviest
    # tile first, then every head's next (one head's tiles, heaviest first, then the next head's, left
    # the later heads' heaviest tiles to start once the first heads' light ones were done)
    kv_head = tl.program_id(0) % KV_HEADS
    first = tl.program_id(0) // KV_HEADS
    d = tl.arange(0, HEAD_DIM)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows % GROUP_PAD  # row r: query position r // GROUP_PAD of head r % GROUP_PAD
    head_ok = rows % GROUP_PAD < GROUP
    for tile in range(first, tl.load(tiles_ptr), tl.num_programs(0) // KV_HEADS):
        seq = tl.load(tiles_ptr + 2 + 2 * tile)
        _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr + seq * stride_bt,
                      tl.load(seq_lens_ptr + seq), tl.load(query_start_ptr + seq),
                      tl.load(query_start_ptr + seq + 1), tl.load(tiles_ptr + 3 + 2 * tile), rows // GROUP_PAD,
                      head, head_ok, kv_head, d, scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                      stride_kb, stride_ks, stride_kh, HEAD_DIM, PAGE, BLOCK_M, BLOCK_N, BLOCK_M // GROUP_PAD,
                      PRECISION)


@triton.jit
def _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, table_ptr, seq_len, q_start, q_end, block, position,
                  head, head_ok, kv_head, d, scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb,
                  stride_ks, stride_kh, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, POSITIONS: tl.constexpr, PRECISION: tl.constexpr):
    """One tile (POSITIONS query positions x a KV head's query heads): flash attention over the keys
    its queries may see."""
    q_len = q_end - q_start
    prefix = seq_len - q_len
    m_idx = block * POSITIONS + position
    m_ok = (m_idx < q_len) & head_ok
    q = tl.load(q_ptr + (q_start + m_idx)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=m_ok[:, None], other=0.0)
    q = query_for_cache(q, k_cache_ptr)
    query_pos = prefix + m_idx

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(seq_len, prefix + (block + 1) * POSITIONS)  # keys past the tile's last query are masked
    for n0 in range(0, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, n, n_ok, kv_head, d,
                            stride_kb, stride_ks, stride_kh, PAGE)
        k = k.to(q.dtype)  # an fp8 cache's elements widen exactly (query_for_cache)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(n_ok[None, :] & (n[None, :] <= query_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None] * v_scale
    tl.store(out_ptr + (q_start + m_idx)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start: torch.Tensor, tiles: torch.Tensor, scale: float,
                      out: torch.Tensor | None = None, num_programs: int | None = None,
                      tile: tuple[int, int, int, int] | None = None, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """q: [T, heads, dim], tokens of sequence i at query_start[i]:query_start[i+1];
    seq_lens: [B] context length after this step; block_tables: [B, max_blocks] int32;
    tiles: a table from `prefill_tiles` planned with `tile_positions(tile)`, contiguous, on q's
    device; `num_programs` a KV head (default: one per tile); `tile`: (rows, keys, warps, stages),
    by default `prefill_tile(dim, group, T)`. The caches are of q's dtype, or fp8 (e4m3) holding
    K / k_scale and V / v_scale."""
    T, H, D = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = H // kv_heads
    out = torch.empty_like(q) if out is None else out
    num_programs = tiles.shape[0] - 1 if num_programs is None else num_programs
    rows, keys, num_warps, num_stages = tile or prefill_tile(D, group, T)
    if num_programs:
        _prefill_kernel[(num_programs * kv_heads,)](
            q, k_cache, v_cache, out, block_tables, seq_lens, query_start, tiles, scale * k_scale, v_scale,
            q.stride(0), q.stride(1),
            out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), GROUP=group, GROUP_PAD=next_power_of_2(group), HEAD_DIM=D, PAGE=page,
            BLOCK_M=rows, BLOCK_N=keys, KV_HEADS=kv_heads, PRECISION=dot_precision(q), num_warps=num_warps,
            num_stages=num_stages)
    return out
