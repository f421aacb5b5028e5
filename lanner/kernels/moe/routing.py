"""Top-k routing in one Triton kernel: one program per token row does the scoring (softmax or
sigmoid), the group selection, the top-k, the renormalisation and scaling, and the padding mask
that the torch reference (routing_reference.py) does in about ten kernels; at batch 1 those
small kernels per MoE layer cost more than the layer's expert GEMMs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels import next_power_of_2


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, num_real_ptr, ids_ptr, weights_ptr, stride_l, E, scaling,
                  TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, SIGMOID: tl.constexpr,
                  RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REAL: tl.constexpr, NUM_GROUPS: tl.constexpr,
                  TOPK_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, G_POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_POW2)
    valid = e < E
    x = tl.load(logits_ptr + row * stride_l + e, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    else:
        p = tl.exp(x - tl.max(x, 0))
        scores = p / tl.sum(p, 0)
    # NaN scores (a broken input) rank last, so every pick is a real expert
    choice = tl.where(valid & (scores == scores), scores, float("-inf"))
    if HAS_BIAS:
        choice += tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    if TOPK_GROUPS < NUM_GROUPS:  # keep the groups whose two best experts sum highest
        group = e // GROUP_SIZE
        g = tl.arange(0, G_POW2)
        group_scores = tl.full([G_POW2], float("-inf"), dtype=tl.float32)
        for j in tl.static_range(NUM_GROUPS):
            members = tl.where(group == j, choice, float("-inf"))
            best = tl.max(members, 0)
            total = best
            if GROUP_SIZE > 1:
                first = tl.min(tl.where(members == best, e, E_POW2), 0)
                total += tl.max(tl.where(e == first, float("-inf"), members), 0)
            group_scores = tl.where(g == j, total, group_scores)
        kept = e < 0
        for _ in tl.static_range(TOPK_GROUPS):
            top = tl.max(group_scores, 0)
            pick = tl.min(tl.where(group_scores == top, g, G_POW2), 0)
            kept = kept | (group == pick)
            group_scores = tl.where(g == pick, float("-inf"), group_scores)
        choice = tl.where(kept, choice, float("-inf"))
    k = tl.arange(0, K_POW2)
    ids = tl.zeros([K_POW2], dtype=tl.int32)
    weights = tl.zeros([K_POW2], dtype=tl.float32)
    for i in tl.static_range(TOP_K):  # the best remaining expert, the lowest id among equals
        top = tl.max(choice, 0)
        pick = tl.min(tl.where(choice == top, e, E_POW2), 0)
        ids = tl.where(k == i, pick, ids)
        weights = tl.where(k == i, tl.sum(tl.where(e == pick, scores, 0.0), 0), weights)
        choice = tl.where(e == pick, float("-inf"), choice)
    if RENORM:
        weights = weights / (tl.sum(weights, 0) + (1e-20 if SIGMOID else 0.0))
    weights = weights * scaling
    if HAS_REAL:
        padding = row >= tl.load(num_real_ptr)
        ids = tl.where(padding, -1, ids)
        weights = tl.where(padding, 0.0, weights)
    tl.store(ids_ptr + row * TOP_K + k, ids, mask=k < TOP_K)
    tl.store(weights_ptr + row * TOP_K + k, weights, mask=k < TOP_K)


def route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
          bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1, scaling: float = 1.0,
          num_real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """routing_reference.route_reference in one kernel (experts in order of score)."""
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, bias if bias is not None else logits, num_real if num_real is not None else ids,
                            ids, weights, logits.stride(0), E, scaling, TOP_K=top_k,
                            K_POW2=next_power_of_2(top_k), E_POW2=next_power_of_2(E),
                            SIGMOID=scoring == "sigmoid", RENORM=renormalize, HAS_BIAS=bias is not None,
                            HAS_REAL=num_real is not None, NUM_GROUPS=num_groups, TOPK_GROUPS=topk_groups,
                            GROUP_SIZE=E // num_groups, G_POW2=next_power_of_2(num_groups))
    return ids, weights
