"""Named ranges of an engine step on torch.profiler's timeline, free when no profiler runs."""
from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

_NOTHING = contextlib.nullcontext()


def step_range(name: str):
    """record_function(name) while a profiler runs, else nothing: record_function dispatches an op
    even with no profiler (~6 us of host time each, and a step opens six of them)."""
    return record_function(name) if torch.autograd._profiler_enabled() else _NOTHING
