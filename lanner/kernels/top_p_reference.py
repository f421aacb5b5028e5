"""Top-p (nucleus) as a probability threshold: the method, and the torch reference of the kernel in
top_p.py.

Sort a row's probabilities in descending order, p_0 >= p_1 >= ...; the nucleus is the shortest
prefix whose mass reaches top_p, p_0..p_m with m the first index where p_0 + ... + p_m >= top_p.
Its last probability p_m is a threshold: the row keeps every token with p >= p_m. (Tokens tied with
p_m are all kept, whatever order a sort would give them, so a row's kept set does not depend on a
sort's tie order, nor on the rows beside it.)

The kernel finds the same threshold without a sort. Let S(t) be the mass of the tokens with p >= t;
S falls as t grows, and p_m is the largest t with S(t) >= top_p. Non-negative float32 values order
like their bit patterns as integers, so the kernel bisects the bit patterns between 0 and 1.0: each
pass over the row sums S at 32 evenly spaced pivots and keeps the sub-interval where S crosses
top_p, 33 times narrower; six passes narrow 2**30 patterns to one. The sums' order differs from a
cumulative sum's, so where p_0 + ... + p_m is within float32 rounding of top_p the two may choose
neighbouring thresholds.
"""
from __future__ import annotations

import torch


def top_p_threshold_ref(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [B, V] float32 (rows sum to 1), top_p [B] in (0, 1] -> [B]: the smallest probability
    of each row's nucleus (the row keeps probs >= it)."""
    ordered = probs.sort(dim=-1, descending=True).values
    reached = ordered.cumsum(dim=-1) >= top_p[:, None]
    last = torch.where(reached.any(dim=-1), reached.int().argmax(dim=-1), probs.shape[1] - 1)
    return ordered.gather(1, last[:, None]).squeeze(1)
