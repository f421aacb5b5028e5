"""Draw one token per row from probabilities with counter-based random numbers: the
method, and the torch reference of the kernel in sampling.py.

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
    return -torch.log(uniform_of_hash(h))


def uniform_of_hash(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash -> U in (0, 1), from its top 23 bits: (k + 0.5) / 2**23 is exact in float32.
    With 24 bits the top value rounds to 1.0, so E = 0: that token would win whatever its
    probability, and at probability 0 (masked out) the race would be NaN, which argmax picks."""
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)


def race_sample_ref(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (probs.float() / race_noise_ref(keys, probs.shape[1])).argmax(dim=-1)
