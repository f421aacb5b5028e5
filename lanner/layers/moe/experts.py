"""The routed experts' weights, stacked: w13 [E, 2I, H] (each expert's gate rows, then its up
rows) and w2 [E, H, I], the layout the fused executors read. Checkpoints store one
gate/up/down Linear per expert; `checkpoint_target` maps those names onto the stacks."""
from __future__ import annotations

import re

import torch
from torch import nn

from lanner.distributed import TP
from lanner.errors import ConfigError

_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class Experts(nn.Module):
    """Under tensor parallelism, either every expert with a slice of its features
    (`intermediate_size` is this rank's: gate/up rows and down columns), or, with expert
    parallelism, whole experts [first, first + count) of the layer's `num_experts` (`expert_ranks`
    says which rank holds which). Either way the block sums the ranks' outputs."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.first, self.count = 0, num_experts
        # the slice of every expert's features this rank holds, when it holds slices
        self.features_of = TP.rank if TP.size > 1 and not TP.expert_parallel else None
        if TP.expert_parallel:
            self.count = TP.split(num_experts, "num_experts")
            self.first = TP.rank * self.count
        self.w13 = nn.Parameter(torch.empty(self.count, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.count, hidden_size, intermediate_size), requires_grad=False)

    def num_shards(self, param: torch.Tensor) -> int:
        """Checkpoint tensors that make up `param`: gate and up of each expert held, or its down."""
        return self.count * (1 if param is self.w2 else 2)

    def shard(self, param: torch.Tensor, index: tuple[int, int]) -> torch.Tensor | None:
        """The view of one checkpoint tensor: (expert, 0 gate | 1 up) in w13, (expert, 0) in w2;
        None for an expert another rank holds."""
        expert, part = index
        if not 0 <= expert < self.num_experts:
            raise ConfigError(f"a checkpoint tensor of expert {expert}; the layer has {self.num_experts} experts")
        if not self.first <= expert < self.first + self.count:
            return None
        if param is self.w2:
            return param[expert - self.first]
        size = self.intermediate_size
        return param[expert - self.first, part * size:(part + 1) * size]

    def checkpoint_slice(self, param: torch.Tensor, tensor: torch.Tensor, shard=None) -> torch.Tensor:
        """This rank's features of one expert's checkpoint tensor (all of them on one rank, or
        with expert parallelism)."""
        if self.features_of is None:
            return tensor
        size = self.intermediate_size
        return tensor.narrow(1 if param is self.w2 else 0, self.features_of * size, size)


def expert_ranks(num_experts: int, num_ranks: int) -> list[int]:
    """The rank that holds each expert under expert parallelism: contiguous blocks, in order."""
    per_rank = num_experts // num_ranks
    return [e // per_rank for e in range(num_experts)]


def checkpoint_target(name: str) -> tuple[str, tuple[int, int]] | None:
    """(our parameter, shard) of a per-expert checkpoint tensor
    ('model.layers.3.mlp.experts.7.up_proj.weight' -> ('model.layers.3.mlp.experts.w13', (7, 1))),
    or None for any other name."""
    match = _EXPERT_WEIGHT.search(name)
    if match is None:
        return None
    expert, proj = int(match.group(1)), match.group(2)
    stack = "w2" if proj == "down_proj" else "w13"
    return f"{name[:match.start()]}.experts.{stack}", (expert, 1 if proj == "up_proj" else 0)
