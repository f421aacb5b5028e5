"""The counter-based sampling kernel (the exponential race); sampling_reference.py has
the method, the key derivation and the bit-identical torch reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _race_kernel(probs_ptr, keys_ptr, out_ptr, stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k1 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    k2 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    best = tl.full([BLOCK], -1.0, tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        p = tl.load(probs_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = _hash32(cols.to(tl.uint32) * 0x9E3779B9 + k1)
        h = _hash32(h ^ k2)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # in (0, 1) exactly: sampling_reference.py
        score = tl.where(mask, p / -tl.log(u), -1.0)
        better = score > best  # strict: the lowest index wins a tie, as in torch.argmax
        best = tl.where(better, score, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, 0)
    winner = tl.min(tl.where(best == top, best_idx, V), 0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def race_sample(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """probs [B, V] (rows sum to 1), keys [B, 2] int64 from `row_key` -> token ids [B] (int64)."""
    B, V = probs.shape
    out = torch.empty(B, dtype=torch.long, device=probs.device)
    if B:
        _race_kernel[(B,)](probs, keys, out, probs.stride(0), V, BLOCK=1024)
    return out
