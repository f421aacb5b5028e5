"""Linear layers whose weights are loaded from checkpoint tensors, possibly
several checkpoint tensors stacked into one (q/k/v, gate/up) so one matmul
serves them all."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return F.linear(x, self.weight, self.bias)
        torch.mm(x, self.weight.t(), out=out)  # into a static buffer (graph pieces)
        return out if self.bias is None else out.add_(self.bias)


class MergedLinear(Linear):
    """Outputs of several checkpoint linears, concatenated along the output dim."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        return param.narrow(0, self.offsets[index], self.offsets[index + 1] - self.offsets[index])
