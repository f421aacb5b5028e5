"""Host -> device copies of per-step metadata."""
from __future__ import annotations

import math

import numpy as np
import torch


class PinnedRing:
    """Pinned host buffers for one kind of per-step upload, reused in turn. A fresh pinned tensor
    costs tens of microseconds of host time a step (torch's host allocator), and `torch.tensor` over
    a long list more; a step instead fills a numpy view of the next of `depth` buffers and copies
    out of it. A buffer is written again only once the copies out of it have run (an event behind
    them). Callers take at most two buffers a step (the drafter's backend plans twice), so with one
    step in flight the wait is for a step that has finished; taking more would stall the host."""

    def __init__(self, device: torch.device, depth: int = 4):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None] * depth
        self.events: list[torch.cuda.Event | None] = [None] * depth
        # per buffer, its (tensor, array) views by (shape, dtype): making them is three torch calls,
        # microseconds each on a step's cold caches, and a steady batch asks for the same shapes
        self.views: list[dict] = [{} for _ in range(depth)]
        self.turn = 0

    def take(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
        """A host tensor of `shape` (uninitialized; a dtype numpy has) and its numpy view, to fill,
        then copy from, then `sent()`."""
        self.turn = (self.turn + 1) % len(self.buffers)
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()
        views = self.views[self.turn]
        key = (shape, dtype)
        taken = views.get(key)
        if taken is not None:
            return taken
        shape = (shape,) if isinstance(shape, int) else shape
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self.buffers[self.turn]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(2 * nbytes, 4096), dtype=torch.uint8, pin_memory=self.cuda)
            self.buffers[self.turn] = buffer
            views.clear()
        if len(views) >= 64:  # prompt steps of every length: bounded
            views.clear()
        host = buffer[:nbytes].view(dtype).view(shape)
        views[key] = host, host.numpy()
        return views[key]

    def sent(self) -> None:
        """The copies out of the last `take` are enqueued (on the device's current stream)."""
        if self.cuda:
            if self.events[self.turn] is None:
                self.events[self.turn] = torch.cuda.Event()
            self.events[self.turn].record(torch.cuda.current_stream(self.device))


def to_device(rows: list | torch.Tensor | np.ndarray, dtype: torch.dtype, device: torch.device,
              ring: PinnedRing | None = None) -> torch.Tensor:
    """A host list (or tensor) as a device tensor, through pinned memory (`ring`'s, or from torch's
    host cache): a pageable copy would wait for the GPU, and so may a fresh pinned allocation
    (cudaHostAlloc, as `Tensor.pin_memory()` can do). The buffer is free again once the copy is done."""
    if ring is not None and not isinstance(rows, torch.Tensor):
        values = np.asarray(rows)  # converted once; its shape is the result's
        host, view = ring.take(values.shape, dtype)
        view[...] = values
        out = host.to(device, non_blocking=True) if ring.cuda else host.clone()
        ring.sent()
        return out
    host = rows.to(dtype) if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return host
    pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def to_device_parts(parts: list[list], dtype: torch.dtype, device: torch.device,
                    ring: PinnedRing | None = None) -> list[torch.Tensor]:
    """Several host lists in one copy (`to_device`), as views of it, in order."""
    flat = to_device([x for part in parts for x in part], dtype, device, ring)
    views, start = [], 0
    for part in parts:
        views.append(flat[start:start + len(part)])
        start += len(part)
    return views
