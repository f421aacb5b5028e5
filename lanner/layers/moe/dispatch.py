"""Dispatch and combine: where a MoE layer's tokens meet the experts that hold their routes.

On one GPU every expert is local, so dispatch hands the tokens through and combine returns the
experts' output. With expert parallelism each rank holds a block of experts
(`experts.expert_ranks`); the MoE block calls only this interface."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatched:
    """Tokens as the local experts see them: ids are local expert indices, -1 where the
    choice belongs to no local expert (or to a padding row)."""
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor


class LocalDispatcher:
    """Every expert on this device."""

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        return Dispatched(x, ids, weights)

    def combine(self, out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return out


class ExpertParallelDispatcher:
    """Experts [first, first + count) on this rank, under tensor parallelism: every rank holds
    every token (attention is tensor-parallel), so dispatch keeps the choices of local experts
    (the others become -1: no work) and the block's all-reduce over the ranks is the combine. A
    rank whose experts no token chose computes nothing and adds zeros."""

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        local = ids - self.first
        held = (local >= 0) & (local < self.count)
        return Dispatched(x, torch.where(held, local, -1).to(ids.dtype), weights)

    def combine(self, out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return out  # summed with the other ranks' in the block
