"""Top-k routing of tokens to experts, one module for every MoE family.

Qwen3-MoE: softmax over the router logits, top-k, optionally renormalised.
DeepSeek-V3: sigmoid scores; experts are chosen on the scores plus an optional
per-expert correction bias (selection only: the weights come from the plain
scores), within the `topk_groups` best of `num_groups` expert groups (a group
scores the sum of its two best); the weights are renormalised and scaled by
`routed_scaling_factor`. Padding rows of a CUDA graph (past the step's real
token count, read on the device) route to expert -1: they cost nothing and
change nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lanner.kernels.moe.routing_reference import route_reference


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias (absent in V2-style configs)
    float32_logits: bool = False  # DeepSeek computes the router's matmul in float32

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.num_experts % self.num_groups or not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(f"{self.num_experts} experts do not split into {self.num_groups} groups of which "
                             f"{self.topk_groups} are kept")
        if self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
            raise ValueError(f"top_k {self.top_k} is more than the {self.topk_groups} kept groups hold")


class Router(nn.Module):
    # read from a checkpoint when there (DeepSeek-V3 has it; V2-style and converted checkpoints may not:
    # zeros choose as no bias does)
    optional_checkpoint_buffers = ("e_score_correction_bias",)

    def __init__(self, spec: RouterSpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        # DeepSeek's router computes in float32 (its checkpoints store the weight in float32 too)
        dtype = torch.float32 if spec.float32_logits else None
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size, dtype=dtype), requires_grad=False)
        bias = torch.zeros(spec.num_experts, dtype=torch.float32) if spec.correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor, num_real_tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k] int32, weights [T, k] float32); rows at or past `num_real_tokens`
        (a device tensor) get ids -1 and weight 0."""
        spec = self.spec
        logits = F.linear(x.float() if spec.float32_logits else x, self.weight)
        if logits.is_cuda:  # one kernel instead of about ten
            from lanner.kernels.moe.routing import route
        else:
            route = route_reference
        return route(logits, spec.top_k, spec.scoring, spec.renormalize, self.e_score_correction_bias,
                     spec.num_groups, spec.topk_groups, spec.scaling, num_real_tokens)
