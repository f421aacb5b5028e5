"""Host -> device copies of per-step metadata."""
from __future__ import annotations

import math
from itertools import accumulate

import numpy as np
import torch


class Views:
    """Tensor views made once per key and kept: making one (a slice, a view) is a torch call,
    several microseconds of a step's host time on the cold caches a forward leaves, and a steady
    batch asks for the same few each step. Bounded: prompt steps come in every length."""

    def __init__(self, limit: int = 4096):
        self.kept: dict = {}
        self.limit = limit

    def get(self, key, make):
        view = self.kept.get(key)
        if view is None:
            if len(self.kept) >= self.limit:
                self.kept.clear()
            view = self.kept[key] = make()
        return view


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
        self.views = [Views(limit=64) for _ in range(depth)]  # per buffer, by (shapes, dtype)
        self.turn = 0

    def take(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
        """A host tensor of `shape` (uninitialized; a dtype numpy has) and its numpy view, to fill,
        then copy from, then `sent()`."""
        return self.take_parts(((shape,) if isinstance(shape, int) else shape,), dtype)[0]

    def take_parts(self, shapes: tuple[tuple[int, ...], ...],
                   dtype: torch.dtype) -> tuple[tuple[torch.Tensor, np.ndarray], ...]:
        """`take` for several tensors, one after another in one buffer."""
        self.turn = (self.turn + 1) % len(self.buffers)
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()
        return self.views[self.turn].get((shapes, dtype), lambda: self._parts(shapes, dtype))

    def _parts(self, shapes: tuple[tuple[int, ...], ...],
               dtype: torch.dtype) -> tuple[tuple[torch.Tensor, np.ndarray], ...]:
        """New views of this turn's buffer, grown first if they do not fit (its kept views go with
        it: views that were kept fit, so a hit never needs this)."""
        sizes = [math.prod(shape) for shape in shapes]
        nbytes = sum(sizes) * dtype.itemsize
        buffer = self.buffers[self.turn]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(2 * nbytes, 4096), dtype=torch.uint8, pin_memory=self.cuda)
            self.buffers[self.turn] = buffer
            self.views[self.turn].kept.clear()
        flat = buffer[:nbytes].view(dtype)
        parts, start = [], 0
        for shape, size in zip(shapes, sizes):
            part = flat[start:start + size].view(shape)
            parts.append((part, part.numpy()))
            start += size
        return tuple(parts)  # kept and handed out again: not to be changed

    def send(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` (part of the last `take`) on `device`, then `sent()`; on the CPU a copy, since the
        buffer is handed out again."""
        out = host.to(device, non_blocking=True) if self.cuda else host.clone()
        self.sent()
        return out

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
        return ring.send(host, device)
    host = rows.to(dtype) if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return host
    pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def write_pieces(row: np.ndarray, pieces, at: int = 0) -> int:
    """Write `pieces` (lists, ranges, arrays) one after another into `row` from `at`; returns where
    they end. An array copies at memory speed, a list element by element; consecutive lists are
    joined first (a numpy call costs more than extending a short list)."""
    if len(pieces) == 1:  # most of a step's rows: nothing to join
        row[at:at + len(pieces[0])] = pieces[0]
        return at + len(pieces[0])
    run = []
    for piece in pieces:
        if isinstance(piece, np.ndarray):
            if run:
                row[at:at + len(run)] = run
                at += len(run)
                run = []
            row[at:at + len(piece)] = piece
            at += len(piece)
        else:
            run += piece
    if run:
        row[at:at + len(run)] = run
        at += len(run)
    return at


class Pieces(tuple):
    """One part of `to_device_parts` given as pieces (lists, ranges, arrays) that follow each other."""


def to_device_parts(parts: list, dtype: torch.dtype, ring: PinnedRing) -> list[torch.Tensor]:
    """Several host sequences in one copy through `ring`, on its device, as views of it, in order.
    A part is a list (or a range, an array), or `Pieces`."""
    parts = [part if isinstance(part, Pieces) else (part,) for part in parts]
    sizes = [sum(map(len, part)) for part in parts]
    # each part 16-byte aligned: Triton specializes a kernel on its pointers' alignment, so a view at
    # an odd offset would compile another copy of every kernel it reaches, while the step waits
    align = max(1, 16 // dtype.itemsize)
    starts = list(accumulate((-(-size // align) * align for size in sizes), initial=0))
    host, view = ring.take(starts[-1], dtype)
    # one write_pieces (it joins neighbouring lists into one numpy write), the gaps as lists of zeros
    gaps = [[0] * (end - start - size) for start, end, size in zip(starts, starts[1:], sizes)]
    write_pieces(view, [piece for part, gap in zip(parts, gaps) for piece in (*part, gap)])
    flat = ring.send(host, ring.device)
    return [flat[start:start + size] for start, size in zip(starts, sizes)]
