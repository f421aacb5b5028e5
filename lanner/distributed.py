"""Tensor parallelism: this process's place among the ranks, and the collectives the sharded
layers call. With one rank (the default) every collective is a no-op and every layer holds the
whole model, so the single-device path is unchanged.

The state is process-wide (`TP`), set once before the model is built (executor/worker.py); the
layers read it when they are constructed (their shard) and when they run (the collectives)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lanner.errors import ConfigError


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # the device group: NCCL on GPUs, gloo on CPUs
    plans: Any = None  # a gloo group of the same ranks, for the step plans rank 0 sends
    expert_parallel: bool = False  # MoE layers hold whole experts per rank (else a slice of each)

    def reset(self) -> None:
        """Back to one rank (after leaving the group)."""
        self.rank, self.size, self.group, self.plans, self.expert_parallel = 0, 1, None, None, False

    def split(self, n: int, what: str) -> int:
        """This rank's share of `n` (heads, features, vocabulary rows), which must divide evenly."""
        if n % self.size:
            raise ConfigError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size


TP = TensorParallel()


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (an engine process, a rank that
    lanner started), even while it is loading."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 (other platforms: a closed pipe or connection stops the process instead)
        pass


@contextmanager
def whole_on_every_rank() -> Iterator[None]:
    """Build (and load) modules inside this as on one rank: each rank holds them whole and they
    run no collectives (a speculative draft, small enough to replicate). Layers decide whether
    they are sharded when they are constructed, so the choice sticks."""
    saved = TP.rank, TP.size, TP.expert_parallel
    TP.rank, TP.size, TP.expert_parallel = 0, 1, False
    try:
        yield
    finally:
        TP.rank, TP.size, TP.expert_parallel = saved


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place (rows of a row-parallel layer's partial outputs)."""
    if TP.size > 1:
        torch.distributed.all_reduce(x, group=TP.group)
    return x


def all_gather_columns(x: torch.Tensor) -> torch.Tensor:
    """[T, n] on each rank -> [T, n * size], rank r's columns at r * n (vocabulary-parallel logits)."""
    if TP.size == 1:
        return x
    parts = torch.empty(TP.size * x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(parts, x.contiguous(), group=TP.group)  # (renamed in torch 2.13)
    return parts.view(TP.size, *x.shape).permute(1, 0, 2).reshape(x.shape[0], TP.size * x.shape[1])
