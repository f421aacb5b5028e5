"""SchedulerOutput: which requests one step computes, and how many tokens each."""
from __future__ import annotations

from dataclasses import dataclass, field

from lanner.core.request import Request


@dataclass
class SchedulerOutput:
    # (request, tokens to compute this step), in batch order.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
