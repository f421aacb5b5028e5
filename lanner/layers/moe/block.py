"""A sparse MoE MLP block: route each token to its top-k experts, run them, weight and sum
their outputs; plus, for DeepSeek-style models, shared experts every token goes through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lanner.distributed import TP, all_reduce
from lanner.layers.mlp import GatedMLP
from lanner.layers.moe.dispatch import ExpertParallelDispatcher, LocalDispatcher
from lanner.layers.moe.experts import Experts
from lanner.layers.moe.router import Router, RouterSpec
from lanner.layers.moe.strategies import MoERuntime


@dataclass(frozen=True)
class MoESpec:
    router: RouterSpec
    intermediate_size: int  # of each routed expert
    shared_intermediate_size: int = 0  # of the shared experts, fused into one MLP (0: none)
    sparse_layers: tuple[int, ...] = ()  # the decoder layers whose MLP is this block


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, hidden_size: int, runtime: MoERuntime, slot: int):
        super().__init__()
        self.gate = Router(spec.router, hidden_size)
        self.experts = Experts(spec.router.num_experts, hidden_size, spec.intermediate_size)
        # under tensor parallelism every rank holds a slice of each expert's features: the routed and
        # shared experts' partial outputs are summed over the ranks once, together
        self.shared_experts = GatedMLP(hidden_size, spec.shared_intermediate_size, reduce=False) \
            if spec.shared_intermediate_size else None
        experts = self.experts
        self.dispatcher = ExpertParallelDispatcher(experts.first, experts.count) if TP.expert_parallel \
            else LocalDispatcher()
        self.runtime = runtime
        self.split = TP.size > 1  # the ranks' outputs are partial sums
        self.slot = slot  # this block's index among the model's MoE layers (its column of the routing record)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        ids, weights = self.gate(x, runtime.num_real_tokens)
        if runtime.routing is not None:
            runtime.routing[:x.shape[0], self.slot].copy_(ids)
        local = self.dispatcher.dispatch(x, ids, weights)
        experts = self.experts
        out = runtime.strategy(local.x, experts.w13).run(local.x, experts.w13, experts.w2, local.ids, local.weights)
        out = self.dispatcher.combine(out, local)
        out = out if self.shared_experts is None else out + self.shared_experts(x)
        return all_reduce(out) if self.split else out
