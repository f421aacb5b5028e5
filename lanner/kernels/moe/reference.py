"""Torch references of the MoE kernels (no Triton here), and the padding contract they share.

An *entry* is one (token, choice) pair, numbered t * K + j over topk_ids [T, K]. Entries whose
expert id is -1 (a padding row of a CUDA graph, or a dropped choice) appear in no layout, cost no
GEMM work, and add nothing to any output: a padding row comes out zero, and no real row changes.

- contiguous layout (align_reference): the entries of each expert, in increasing order, padded
  up to a multiple of block_m, one segment per expert in expert order. sorted_ids has the fixed
  length max_padded(T*K, E, block_m); every position that holds no entry holds the sentinel T*K.
  block_experts gives each block's expert (-1 past the end); num_padded the real segments' length.
- masked layout (masked_layout_reference): slots [E, capacity], expert e's entries in increasing
  order in slots[e, :counts[e]], -1 after them. capacity bounds any expert's count (the caller
  passes T: a token picks an expert at most once); entries past it would be dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def max_padded(num_entries: int, num_experts: int, block_m: int) -> int:
    """Length of the contiguous layout: every expert's segment may waste up to block_m - 1 slots."""
    return -(-(num_entries + num_experts * (block_m - 1)) // block_m) * block_m


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j] >= 0.
    Rounds as a torch model in x.dtype does: gate/up and the activation in x.dtype, the down
    projection, the router weight and the sum over choices in float32, rounded once at the end."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token, choice = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate_up = x[token] @ w13[e].t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = act.float() @ w2[e].float().t()
        out.index_add_(0, token, down * topk_weights[token, choice, None].float())
    return out.to(x.dtype)


def moe_reference_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor) -> torch.Tensor:
    """moe_reference without data-dependent shapes (it can run inside a CUDA graph capture):
    every expert over every token, weighted by the routing (zero where not chosen). E times the
    work: a fallback only."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        gate_up = x @ w13[e].t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = act.float() @ w2[e].float().t()
        out += (topk_weights.float() * (topk_ids == e)).sum(dim=-1, keepdim=True) * down
    return out.to(x.dtype)


def _entries_by_expert(topk_ids: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    flat = topk_ids.flatten()
    return [torch.nonzero(flat == e)[:, 0].to(torch.int32) for e in range(num_experts)]


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The contiguous layout: (sorted_ids, block_experts, num_padded [1]), all int32."""
    n = topk_ids.numel()
    length = max_padded(n, num_experts, block_m)
    sorted_ids = torch.full((length,), n, dtype=torch.int32, device=topk_ids.device)
    block_experts = torch.full((length // block_m,), -1, dtype=torch.int32, device=topk_ids.device)
    start = 0
    for e, entries in enumerate(_entries_by_expert(topk_ids, num_experts)):
        sorted_ids[start:start + len(entries)] = entries
        end = start + -(-len(entries) // block_m) * block_m
        block_experts[start // block_m:end // block_m] = e
        start = end
    return sorted_ids, block_experts, torch.tensor([start], dtype=torch.int32, device=topk_ids.device)


def masked_layout_reference(topk_ids: torch.Tensor, num_experts: int, capacity: int):
    """The masked layout: (slots [E, capacity], counts [E]), int32."""
    slots = torch.full((num_experts, capacity), -1, dtype=torch.int32, device=topk_ids.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=topk_ids.device)
    for e, entries in enumerate(_entries_by_expert(topk_ids, num_experts)):
        kept = entries[:capacity]
        slots[e, :len(kept)] = kept
        counts[e] = len(kept)
    return slots, counts
