"""Top-k routing from router logits, in torch: the reference of routing.py's kernel, and the
CPU path. Scores are softmax (Qwen3-MoE) or sigmoid (DeepSeek-V3); with groups, experts are
chosen among the `topk_groups` groups whose two best (score + bias) experts sum highest; the
bias, when given, changes the choice only; the chosen scores are the weights, optionally
renormalised, times `scaling`. Rows at or past `num_real` (a [1] device tensor) are padding:
ids -1, weights 0."""
from __future__ import annotations

import torch


def route_reference(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                    bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
                    scaling: float = 1.0, num_real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, top_k] int32, weights [T, top_k] float32) from logits [T, E]."""
    logits = logits.float()
    T, E = logits.shape
    if scoring == "softmax":
        weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    else:
        scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias
        if topk_groups < num_groups:
            per_group = choice.view(T, num_groups, E // num_groups)
            group_scores = per_group.topk(min(2, E // num_groups), dim=-1)[0].sum(dim=-1)
            kept = group_scores.topk(topk_groups, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~mask[:, :, None].expand_as(per_group).reshape(T, E), float("-inf"))
        ids = choice.topk(top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    if scaling != 1.0:
        weights = weights * scaling
    ids = ids.to(torch.int32)
    if num_real is not None:
        padding = (torch.arange(T, device=logits.device) >= num_real)[:, None]
        ids, weights = ids.masked_fill(padding, -1), weights.masked_fill(padding, 0.0)
    return ids, weights
