"""Programmatic dependent launch (Hopper and newer) between lanner's Triton kernels.

A decode step at batch 1 is a chain of ~250 short kernels in one CUDA graph, and each waits for the
one before to finish, flush, and for its own programs to be scheduled: a gap of about a microsecond
a kernel. With programmatic dependent launch a kernel's programs are scheduled while the kernel
before it still runs, and wait inside (`griddepcontrol.wait`) until it has finished and its writes
are visible; each kernel lets its successor launch as soon as all its own programs are past that
wait. Every read and write of a kernel launched so comes after its wait, so the order of the
kernels' memory effects is the stream's. A kernel launched without it (torch's, cuBLAS's) waits for
its predecessor to finish as always. CUDA graph capture keeps the launches' programmatic edges.

Enabled for the process by the model runner (GraphConfig.dependent_launch) through
`lanner.kernels.set_dependent_launch`, whose `dependent_launch()` gives the launch arguments; the
interpreter (CPU tests) never runs it."""
from __future__ import annotations

import triton
import triton.language as tl


def supported(device) -> bool:
    """An NVIDIA GPU of Hopper or newer (ROCm's capability numbers mean other GPUs), and a Triton
    that launches so (3.4+)."""
    import torch

    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait"))


@triton.jit
def wait_for_prior(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait until the kernel before has finished (its writes
    visible), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
