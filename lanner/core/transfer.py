"""Host -> device copies of per-step metadata."""
from __future__ import annotations

import torch


def to_device(rows: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or tensor) as a device tensor, through pinned memory from torch's host cache:
    a pageable copy would wait for the GPU, and so may a fresh pinned allocation (cudaHostAlloc,
    as `Tensor.pin_memory()` can do). The buffer returns to the cache once the copy is done."""
    host = rows.to(dtype) if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return host
    pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def to_device_parts(parts: list[list], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Several host lists in one copy (`to_device`), as views of it, in order."""
    flat = to_device([x for part in parts for x in part], dtype, device)
    views, start = [], 0
    for part in parts:
        views.append(flat[start:start + len(part)])
        start += len(part)
    return views
