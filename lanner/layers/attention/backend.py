"""The attention backend interface and the layer that calls it.

A backend owns the paged KV cache tensors and the per-step metadata:
`plan(batch)` runs once per step on the host and prepares whatever the kernels
need; `forward(layer, q, k, v)` runs once per layer inside the model forward,
writes this step's K/V into the cache and attends over the cached context
(`store` only writes them).
The model reaches the backend through `forward_context`, so layers need no
extra arguments and a graph runner can swap in its own metadata.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lanner.core.batch import ForwardBatch


class _Forward(threading.local):
    """The backend of the forward running on this thread: engines on other threads (a server's
    engine thread beside an LLM, two models in one process) run forwards of their own meanwhile."""
    backend: AttentionBackend | None = None


_active = _Forward()


class AttentionBackend(ABC):
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 kv_scales: list[tuple[float, float]] | None = None):
        self.kv_caches = kv_caches  # per layer: K and V, each [num_blocks, block_size, kv_heads, head_dim]
        self.block_size = block_size
        # per layer: an fp8 cache holds K / k_scale and V / v_scale (a checkpoint's; 1.0 without)
        self.kv_scales = kv_scales or [(1.0, 1.0)] * len(kv_caches)
        assert len(self.kv_scales) == len(kv_caches), "a (k_scale, v_scale) per layer"
        self.projected_kv: set[int] = set()  # layers whose projection stored K/V (kv_store_target), this forward

    @abstractmethod
    def plan(self, batch: ForwardBatch, num_padded_seqs: int | None = None, graph_tokens: int | None = None) -> None:
        """Prepare the metadata of one step (host side, once per step); `num_padded_seqs` > num_seqs
        adds empty sequences for a CUDA graph's padding rows; `graph_tokens`: the step replays a graph
        of the whole forward captured for that many tokens (executor/piecewise.py)."""

    def can_advance(self, rows: int) -> bool:
        """Whether `advance_decode` may follow the last plan, which had `rows` rows. This default
        plans from the batch's host lists, so it always may."""
        return True

    def advance_decode(self, batch: ForwardBatch, rows: int) -> None:
        """Plan `batch`: the last plan's decode rows, each one token longer, in the same blocks, with
        the same `rows` (a graph's padding included; executor/advance.py)."""
        self.plan(batch, num_padded_seqs=rows)

    def kv_store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple] | None:
        """(k_cache, v_cache, slot_mapping, (k_scale, v_scale)) for a projection that writes this layer's
        K/V itself (fused with its norm and rotary); the layer's next `forward` in this forward context
        then skips its store. None (the default): `forward` stores."""
        return None

    def kernel_shape(self) -> tuple:
        """What the planned step's kernels compile for: graph capture warms up each new value first
        (compiling inside a capture fails on some drivers). () means the backend compiles nothing
        for any plan (the default), and the warm-ups stop at the first one (graphs.warm_up_kernel_shapes)."""
        return ()

    def decode_kernel_shape(self, rows: int) -> tuple:
        """`kernel_shape()` of a decode plan of `rows` rows, without making one."""
        return ()

    @abstractmethod
    def plan_decode(self, block_tables: list[list[int]]) -> None:
        """Prepare decode steps (one query per sequence) over these block tables whose lengths
        and slots are on the device (a drafter's steps: they depend on how many drafts the
        target accepted); `set_decode_lens` gives them, step by step."""

    @abstractmethod
    def set_decode_lens(self, seq_lens: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """The context lengths and KV slots of the next decode step (device tensors)."""

    @abstractmethod
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k and v ([T, kv_heads, head_dim]) at the planned slots, and attend to nothing."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, heads, head_dim], k and v: [T, kv_heads, head_dim] -> [T, heads, head_dim],
        written into `out` when given. Padding tokens (slot -1, past the planned sequences)
        write no KV; their output rows are zero in a fresh output and untouched in `out`."""


@contextmanager
def forward_context(backend: AttentionBackend) -> Iterator[None]:
    if _active.backend is not None:
        raise RuntimeError("forward contexts do not nest")
    _active.backend = backend
    backend.projected_kv.clear()  # a record never outlives the forward (say, one that raised) that made it
    try:
        yield
    finally:
        _active.backend = None


class Attention(nn.Module):
    def __init__(self, layer_idx: int, scale: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None):
        backend = _active.backend
        if backend is None:
            raise RuntimeError("Attention called outside forward_context")
        return backend.forward(self.layer_idx, q, k, v, self.scale, out)

    def kv_store_target(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple] | None:
        """Where a fused projection may write this layer's K/V (None: outside a forward context, as
        when piece graphs are captured, or a backend that stores in `forward`)."""
        backend = _active.backend
        return None if backend is None else backend.kv_store_target(self.layer_idx)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        backend = _active.backend
        if backend is None:
            raise RuntimeError("Attention called outside forward_context")
        backend.store(self.layer_idx, k, v)
