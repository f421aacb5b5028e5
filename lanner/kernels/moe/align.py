"""The two layouts of routed entries (reference.py states the contract), built on the device.

Three small launches (one, for the masked layout of at most ENTRY_TILE entries: a decode step), no
atomics, so the order of entries within an expert is always increasing:
1. each tile of ENTRY_TILE entries counts its entries per expert;
2. one program sums the counts, places each expert's segment, and gives every (tile, expert) the
   position where that tile's entries of that expert start;
3. each tile writes its entries from there, in order (rank among the tile's earlier entries).
Output sizes depend on T, K, E and block_m alone, so the calls capture in CUDA graphs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels import next_power_of_2
from lanner.kernels.moe.reference import max_padded

ENTRY_TILE = 128  # rank within a tile is a [tile, tile] comparison: keep it in registers
TILE_ROWS = 32  # rows of the [tiles, experts] count table the offsets program reads at once


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_entries, num_experts, TILE: tl.constexpr, E_PAD: tl.constexpr):
    tile = tl.program_id(0)
    i = tile * TILE + tl.arange(0, TILE)
    ids = tl.load(ids_ptr + i, mask=i < num_entries, other=-1)
    e = tl.arange(0, E_PAD)
    counts = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    tl.store(counts_ptr + tile * num_experts + e, counts, mask=e < num_experts)


@triton.jit
def _offsets_kernel(counts_ptr, offsets_ptr, block_experts_ptr, num_padded_ptr, expert_counts_ptr, num_tiles,
                    num_experts, capacity, num_blocks, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                    E_PAD: tl.constexpr, ROWS: tl.constexpr):
    e = tl.arange(0, E_PAD)
    e_ok = e < num_experts
    total = tl.zeros([E_PAD], tl.int32)
    for r0 in range(0, num_tiles, ROWS):
        r = r0 + tl.arange(0, ROWS)
        total += tl.sum(tl.load(counts_ptr + r[:, None] * num_experts + e[None, :],
                                mask=(r < num_tiles)[:, None] & e_ok[None, :], other=0), 0)
    if MASKED:
        start = e * capacity
        tl.store(expert_counts_ptr + e, tl.minimum(total, capacity), mask=e_ok)
    else:
        padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
        end = tl.cumsum(padded, 0)
        start = end - padded
        tl.store(num_padded_ptr, tl.sum(padded, 0))
        for b0 in range(0, num_blocks, ROWS):
            b = b0 + tl.arange(0, ROWS)
            # a block's expert is the number of segments that end at or before its first row
            expert = tl.sum((end[None, :] <= b[:, None] * BLOCK_M).to(tl.int32), 1)
            tl.store(block_experts_ptr + b, tl.where(expert < num_experts, expert, -1), mask=b < num_blocks)
    running = start
    for r0 in range(0, num_tiles, ROWS):
        r = r0 + tl.arange(0, ROWS)
        mask = (r < num_tiles)[:, None] & e_ok[None, :]
        counts = tl.load(counts_ptr + r[:, None] * num_experts + e[None, :], mask=mask, other=0)
        before = tl.cumsum(counts, 0) - counts
        tl.store(offsets_ptr + r[:, None] * num_experts + e[None, :], running[None, :] + before, mask=mask)
        running += tl.sum(counts, 0)


@triton.jit
def _scatter_kernel(ids_ptr, offsets_ptr, out_ptr, num_entries, num_experts, capacity, MASKED: tl.constexpr,
                    TILE: tl.constexpr):
    tile = tl.program_id(0)
    j = tl.arange(0, TILE)
    i = tile * TILE + j
    ids = tl.load(ids_ptr + i, mask=i < num_entries, other=-1)
    rank = tl.sum(((ids[:, None] == ids[None, :]) & (j[None, :] < j[:, None])).to(tl.int32), 1)
    routed = (ids >= 0) & (ids < num_experts)  # an id past the experts is dropped, never written out of bounds
    pos = tl.load(offsets_ptr + tile * num_experts + ids, mask=routed, other=0) + rank
    if MASKED:  # past capacity: dropped (never, with capacity = T)
        routed = routed & (pos < (ids + 1) * capacity)
    tl.store(out_ptr + pos, i, mask=routed)


@triton.jit
def _masked_small_kernel(ids_ptr, slots_ptr, counts_ptr, num_entries, num_experts, capacity, TILE: tl.constexpr,
                         E_PAD: tl.constexpr, CAP_PAD: tl.constexpr):
    """The masked layout of at most TILE entries in one program (the -1 fill, the counts, the
    slots): a decode step's layout is one launch instead of four."""
    e = tl.arange(0, E_PAD)
    c = tl.arange(0, CAP_PAD)
    table = e[:, None] * capacity + c[None, :]
    tl.store(slots_ptr + table, tl.full([E_PAD, CAP_PAD], -1, tl.int32),
             mask=(e < num_experts)[:, None] & (c < capacity)[None, :])
    j = tl.arange(0, TILE)
    ids = tl.load(ids_ptr + j, mask=j < num_entries, other=-1)
    counts = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    tl.store(counts_ptr + e, tl.minimum(counts, capacity), mask=e < num_experts)
    rank = tl.sum(((ids[:, None] == ids[None, :]) & (j[None, :] < j[:, None])).to(tl.int32), 1)
    tl.debug_barrier()  # every thread's -1 lands before any slot is written
    tl.store(slots_ptr + ids * capacity + rank, j, mask=(ids >= 0) & (ids < num_experts) & (rank < capacity))


def _build_layout(topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor, masked: bool, capacity: int = 0,
                  block_m: int = 16, block_experts: torch.Tensor | None = None, num_padded: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None) -> None:
    """The three launches; `out` (sorted_ids or slots) comes pre-filled with its empty value."""
    ids = topk_ids.reshape(-1)
    num_entries = ids.numel()
    num_tiles = triton.cdiv(num_entries, ENTRY_TILE)
    e_pad = next_power_of_2(num_experts)
    tile_counts = torch.empty(num_tiles, num_experts, dtype=torch.int32, device=ids.device)
    offsets = torch.empty_like(tile_counts)
    if num_tiles:
        _count_kernel[(num_tiles,)](ids, tile_counts, num_entries, num_experts, TILE=ENTRY_TILE, E_PAD=e_pad)
    unused = out  # pointer arguments of the other layout
    _offsets_kernel[(1,)](tile_counts, offsets, unused if masked else block_experts,
                          unused if masked else num_padded, counts if masked else unused, num_tiles, num_experts,
                          capacity, 0 if masked else block_experts.numel(), MASKED=masked, BLOCK_M=block_m,
                          E_PAD=e_pad, ROWS=TILE_ROWS)
    if num_tiles:
        _scatter_kernel[(num_tiles,)](ids, offsets, out, num_entries, num_experts, capacity, MASKED=masked,
                                      TILE=ENTRY_TILE)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The contiguous layout of topk_ids [T, K]: (sorted_ids, block_experts, num_padded [1]), int32,
    equal to align_reference's."""
    n = topk_ids.numel()
    length = max_padded(n, num_experts, block_m)
    sorted_ids = torch.full((length,), n, dtype=torch.int32, device=topk_ids.device)
    block_experts = torch.empty(length // block_m, dtype=torch.int32, device=topk_ids.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    _build_layout(topk_ids, num_experts, sorted_ids, False, block_m=block_m, block_experts=block_experts,
                  num_padded=num_padded)
    return sorted_ids, block_experts, num_padded


def masked_layout(topk_ids: torch.Tensor, num_experts: int, capacity: int):
    """The masked layout of topk_ids [T, K]: (slots [E, capacity], counts [E]), int32, equal to
    masked_layout_reference's."""
    counts = torch.empty(num_experts, dtype=torch.int32, device=topk_ids.device)
    if 0 < topk_ids.numel() <= ENTRY_TILE:  # one tile: one launch
        slots = torch.empty((num_experts, capacity), dtype=torch.int32, device=topk_ids.device)
        _masked_small_kernel[(1,)](topk_ids.reshape(-1), slots, counts, topk_ids.numel(), num_experts, capacity,
                                   TILE=ENTRY_TILE, E_PAD=next_power_of_2(num_experts),
                                   CAP_PAD=next_power_of_2(capacity))
        return slots, counts
    slots = torch.full((num_experts, capacity), -1, dtype=torch.int32, device=topk_ids.device)
    _build_layout(topk_ids, num_experts, slots, True, capacity=capacity, counts=counts)
    return slots, counts
