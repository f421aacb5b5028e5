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


class Router(nn.Module):
    # read from a checkpoint when there (DeepSeek-V3 has it; V2-style and converted checkpoints may not:
    # zeros choose as no bias does)
    optional_checkpoint_buffers = ("e_score_correction_bias",)

    def __init__(self, spec: RouterSpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size), requires_grad=False)
        bias = torch.zeros(spec.num_experts, dtype=torch.float32) if spec.correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor, num_real_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k] int32, weights [T, k] float32); rows at or past `num_real_tokens`
        (a device tensor) get ids -1 and weight 0."""
        spec = self.spec
        if spec.float32_logits:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight).float()
        if spec.scoring == "softmax":
            weights, ids = torch.softmax(logits, dim=-1).topk(spec.top_k, dim=-1)
        else:
            ids = grouped_topk(logits.sigmoid(), self.e_score_correction_bias, spec)
            weights = logits.sigmoid().gather(1, ids)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if spec.scoring == "sigmoid" else 0))
        if spec.scaling != 1.0:
            weights = weights * spec.scaling
        ids = ids.to(torch.int32)
        if num_real_tokens is not None:
            padding = (torch.arange(x.shape[0], device=x.device) >= num_real_tokens)[:, None]
            ids = ids.masked_fill(padding, -1)
            weights = weights.masked_fill(padding, 0.0)
        return ids, weights


def grouped_topk(scores: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec) -> torch.Tensor:
    """DeepSeek-V3's choice: the top-k experts by score (+ bias) among the `topk_groups` groups
    whose two best experts score highest."""
    choice = scores if bias is None else scores + bias
    if spec.topk_groups < spec.num_groups:
        T = scores.shape[0]
        per_group = choice.view(T, spec.num_groups, spec.num_experts // spec.num_groups)
        group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)
        kept = group_scores.topk(spec.topk_groups, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~mask[:, :, None].expand_as(per_group).reshape(T, spec.num_experts), float("-inf"))
    return choice.topk(spec.top_k, dim=-1, sorted=False)[1]
