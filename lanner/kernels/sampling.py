"""Draw one token per row from probabilities with counter-based random numbers,
beside its torch reference.

The draw is an exponential race: the winner is argmax_v p[v] / E[v] with
E[v] = -log U[v], which picks v with probability p[v]. U[v] is a hash of the
row's key and v, not the state of a generator, so one kernel serves a whole
batch, nothing is synchronised, and a row's draw depends only on its key: the
request's seed and how many tokens it has produced. The same key gives the same
numbers in the kernel and in the reference (the hash is integer arithmetic), so
CPU and GPU runs of a seeded request see the same noise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN32 = 0x9E3779B9
# lowbias32 (C. Wellons): a 32-bit integer hash with good avalanche
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def row_key(seed: int, index: int) -> tuple[int, int]:
    """Two 32-bit keys for the `index`-th token that a request with `seed` samples."""
    z = _splitmix64((seed & _M64) ^ _splitmix64(index))
    return z & _M32, z >> 32


# ---- Triton ---------------------------------------------------------------------------


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
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
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


# ---- torch reference --------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32_ref(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def race_noise_ref(keys: torch.Tensor, V: int) -> torch.Tensor:
    """The exponential noise E [B, V] that the kernel uses for these keys."""
    cols = torch.arange(V, dtype=torch.long, device=keys.device)[None, :]
    h = _hash32_ref((_mul32(cols, _GOLDEN32) + keys[:, :1]) & _M32)
    h = _hash32_ref(h ^ keys[:, 1:])
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    return -torch.log(u)


def race_sample_ref(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (probs.float() / race_noise_ref(keys, probs.shape[1])).argmax(dim=-1)
