"""Dispatch and combine: where a MoE layer's tokens meet the experts that hold their routes.

On one GPU every expert is local, so dispatch hands the tokens through and combine returns the
experts' output. Expert parallelism ([10]) adds an implementation that sends each token to the
ranks owning its experts and gathers the weighted results back; the MoE block calls only
this interface."""
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
