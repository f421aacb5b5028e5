"""Paged decode attention (one query token per sequence) with split-K.

Each program handles one (sequence, kv head, split): the query heads of that kv
head's group are packed into one tile, so the K/V it streams from the cache
serve the whole group. Long contexts are cut into `num_splits` pieces that run
in parallel and write partial results; the last split of a (sequence, kv head) to
finish (an atomic counter says which) merges them by log-sum-exp and resets the
counter, so decode attention is one kernel a layer (a merge kernel of its own cost a
graph node and a launch gap a layer at batch 1). The launch's split count is the most a
sequence may use: each uses as many as its length gives MIN_SPLIT_KEYS keys, or one when it
has at most ONE_SPLIT_KEYS. With one split (a batch large enough to fill the GPU alone, or a
short sequence) the program writes the output directly: no partials, no count, no merge.
A sequence of length 0 (a padding row of a CUDA graph) gets an all-zero output.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lanner.kernels import dependent_launch, next_power_of_2
from lanner.kernels.attention.prefill import dot_precision, load_kv_tile, query_for_cache
from lanner.kernels.attention.reference import FP8_KV_DTYPE
from lanner.kernels.pdl import wait_for_prior

# A split's fewest keys, and the most keys a sequence walks in one program. On the H100 at batch 1
# (scripts/decode_probe.py SPLIT_KEYS, docs/benchmarks.md 2026-12-05 22:36-22:45) a program's keys are
# walked one 64-key tile after another, ~1.4 us a tile past the second, while a merge of the
# partials costs ~0.5 us: so a tile a split, except that two tiles in one program beat two splits.
# 384 keys of Qwen3-8B's shape: 5.5 us a layer against 7.9 with a split per 256 keys.
MIN_SPLIT_KEYS = 64
ONE_SPLIT_KEYS = 128


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, part_out_ptr,
                         part_lse_ptr, counter_ptr, out_ptr, scale, v_scale, stride_qt, stride_qh, stride_ot,
                         stride_oh, stride_kb, stride_ks, stride_kh, stride_bt, NUM_HEADS: tl.constexpr,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr, ONE_SPLIT_KEYS: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # the splits this sequence uses at its length (the launch's were sized for the longest it may
    # have): none shorter than MIN_SPLIT_KEYS keys, and one up to ONE_SPLIT_KEYS; the programs past
    # them have no keys and do nothing
    splits = tl.where(seq_len <= ONE_SPLIT_KEYS, 1, tl.minimum(tl.cdiv(seq_len, MIN_SPLIT_KEYS), NUM_SPLITS))
    split_len = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
    q = query_for_cache(q, k_cache_ptr)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, n, n_ok, kv_head, d,
                            stride_kb, stride_ks, stride_kh, PAGE)
        k = k.to(q.dtype)  # an fp8 cache's elements widen exactly (query_for_cache)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    has_keys = start < end
    out = acc / tl.where(has_keys, l, 1.0)[:, None] * v_scale
    out_at = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        return
    if splits == 1:  # a short sequence: the first split has every key, nothing to merge
        if split == 0:
            tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    elif split < splits:
        _store_and_merge(out, m, l, has_keys, out_at, part_out_ptr, part_lse_ptr, counter_ptr, seq, kv_head, heads,
                         head_ok, d, split, splits, NUM_HEADS, HEAD_DIM, NUM_SPLITS, GROUP_PAD)


@triton.jit
def _store_and_merge(out, m, l, has_keys, out_at, part_out_ptr, part_lse_ptr, counter_ptr, seq, kv_head, heads,
                     head_ok, d, split, splits, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Write this split's partial output and LSE; the last of the sequence's `splits` to count merges
    them by log-sum-exp into out_at."""
    lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("-inf"))
    first = (seq * NUM_HEADS + heads) * NUM_SPLITS  # this group's partials: a row a (head, split)
    tl.store(part_out_ptr + (first + split)[:, None] * HEAD_DIM + d[None, :], out, mask=head_ok[:, None])
    tl.store(part_lse_ptr + first + split, lse, mask=head_ok)
    # every thread's partials are written before the count goes up (release); the last split to
    # count reads all of them (acquire, and through L2: .cg), merges, and zeroes the count for the
    # next launch
    tl.debug_barrier()
    counter = counter_ptr + seq * tl.num_programs(1) + kv_head
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1:
        top = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        for sp in tl.static_range(NUM_SPLITS):
            used = head_ok & (tl.full([GROUP_PAD], sp, tl.int32) < splits)
            top = tl.maximum(top, tl.load(part_lse_ptr + first + sp, mask=used, other=float("-inf"),
                                          cache_modifier=".cg"))
        top = tl.where(top == float("-inf"), 0.0, top)  # no split had keys: zeros
        total = tl.zeros([GROUP_PAD], tl.float32)
        merged = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for sp in tl.static_range(NUM_SPLITS):
            used = head_ok & (tl.full([GROUP_PAD], sp, tl.int32) < splits)
            w = tl.exp(tl.load(part_lse_ptr + first + sp, mask=used, other=float("-inf"), cache_modifier=".cg")
                       - top)
            part = tl.load(part_out_ptr + (first + sp)[:, None] * HEAD_DIM + d[None, :], mask=used[:, None],
                           other=0.0, cache_modifier=".cg")
            total += w
            merged += part * w[:, None]
        out = merged / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_at, out.to(out_at.dtype.element_ty), mask=head_ok[:, None])
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


def decode_tile(head_dim: int, fp8_cache: bool = False, num_splits: int = 1) -> tuple[int, int, int]:
    """(keys a tile, warps, pipeline stages) of the split kernel (scripts/decode_probe.py measures them).
    Over an fp8 cache with one split (a batch that fills the GPU alone), two warps: within 5% of the
    best of 27 tiles at batch 256 and 64 (H200), where four warps were 25-60% slower (as slow as over
    a bf16 cache, whose bytes are twice as many); with splits (small batches, long contexts) two
    warps were up to 2.5x slower at batch 1 x 8k keys, and four as good at 16 x 8k."""
    if head_dim > 128:
        return 32, 4, 3
    return (64, 2, 3) if fp8_cache and num_splits == 1 else (64, 4, 3)


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough programs to fill the GPU's `num_sms` multiprocessors twice over, but no split shorter
    than MIN_SPLIT_KEYS keys, and one when no sequence has more than ONE_SPLIT_KEYS (the kernel uses
    fewer for a sequence shorter than the longest)."""
    if max_seq_len <= ONE_SPLIT_KEYS:
        return 1
    want = math.ceil(2 * num_sms / max(1, num_seqs * num_kv_heads))
    return max(1, min(want, 16, math.ceil(max_seq_len / MIN_SPLIT_KEYS)))


def decode_workspace(rows_x_splits: int, num_heads: int, head_dim: int, rows_x_kv_heads: int,
                     device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial outputs and LSEs for (rows x splits) of every head, and the zeroed split counters of
    (rows x kv heads) (the kernel leaves them zero again)."""
    return (torch.empty(rows_x_splits * num_heads * head_dim, dtype=torch.float32, device=device),
            torch.empty(rows_x_splits * num_heads, dtype=torch.float32, device=device),
            torch.zeros(rows_x_kv_heads, dtype=torch.int32, device=device))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int, out: torch.Tensor | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     tile: tuple[int, int, int] | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0, min_split_keys: int = MIN_SPLIT_KEYS,
                     one_split_keys: int = ONE_SPLIT_KEYS) -> torch.Tensor:
    """q: [B, heads, dim]; block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (0: padding row);
    the caches are of q's dtype, or fp8 (e4m3) holding K / k_scale and V / v_scale.
    `workspace` (decode_workspace: partials and split counters) may be pre-allocated so CUDA graphs
    can capture the call. `tile`: (keys a tile, warps, pipeline stages) instead of decode_tile(head_dim)'s.
    A sequence uses at most `num_splits` splits, none shorter than `min_split_keys` keys, and one
    when it has at most `one_split_keys`."""
    B, H, D = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = H // kv_heads
    out = torch.empty_like(q) if out is None else out
    if workspace is None:
        workspace = decode_workspace(B * num_splits, H, D, B * kv_heads, q.device)
    part_out, part_lse, counters = workspace
    block_n, num_warps, num_stages = tile or decode_tile(D, k_cache.dtype == FP8_KV_DTYPE, num_splits)
    _decode_split_kernel[(B, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, counters, out, scale * k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=H, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=D, PAGE=page,
        NUM_SPLITS=num_splits, MIN_SPLIT_KEYS=min_split_keys, ONE_SPLIT_KEYS=one_split_keys, BLOCK_N=block_n,
        PRECISION=dot_precision(q), num_warps=num_warps, num_stages=num_stages, **dependent_launch())
    return out
