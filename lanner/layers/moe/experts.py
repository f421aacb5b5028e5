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
    """`intermediate_size`: this rank's slice of each expert's features under tensor parallelism
    (gate/up rows and down columns; the block sums the ranks' outputs)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def num_shards(self, param: torch.Tensor) -> int:
        """Checkpoint tensors that make up `param`: gate and up of each expert, or its down."""
        return self.num_experts * (1 if param is self.w2 else 2)

    def shard(self, param: torch.Tensor, index: tuple[int, int]) -> torch.Tensor:
        """The view of one checkpoint tensor: (expert, 0 gate | 1 up) in w13, (expert, 0) in w2."""
        expert, part = index
        if not 0 <= expert < self.num_experts:
            raise ConfigError(f"a checkpoint tensor of expert {expert}; the layer has {self.num_experts} experts")
        if param is self.w2:
            return param[expert]
        size = self.intermediate_size
        return param[expert, part * size:(part + 1) * size]

    def checkpoint_slice(self, param: torch.Tensor, tensor: torch.Tensor, shard=None) -> torch.Tensor:
        """This rank's features of one expert's checkpoint tensor (all of them on one rank)."""
        size = self.intermediate_size
        return tensor.narrow(1 if param is self.w2 else 0, TP.rank * size, size) if TP.size > 1 else tensor


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
