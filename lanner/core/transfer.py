"""Host -> device copies of per-step metadata."""
from __future__ import annotations

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
        self.turn = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D host tensor of `numel` (uninitialized) to fill, then copy from, then `sent()`."""
        self.turn = (self.turn + 1) % len(self.buffers)
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()
        nbytes = numel * dtype.itemsize
        buffer = self.buffers[self.turn]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(2 * nbytes, 4096), dtype=torch.uint8, pin_memory=self.cuda)
            self.buffers[self.turn] = buffer
        return buffer[:nbytes].view(dtype)

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
        host = ring.take(values.size, dtype)
        host.numpy()[:] = values.reshape(-1)
        out = host.to(device, non_blocking=True) if ring.cuda else host.clone()
        ring.sent()
        return out.view(values.shape)
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
