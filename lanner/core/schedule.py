"""SchedulerOutput: which requests one step computes, and how many tokens each."""
from __future__ import annotations

from dataclasses import dataclass, field

from lanner.core.request import Request


@dataclass
class SchedulerOutput:
    # (request, tokens to compute this step), in batch order.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # the drafts each request verifies; those the step before proposed on the device are filled in
    # when that step is read back (until then they are placeholders): `unread_drafts`
    drafts: dict[Request, list[int]] = field(default_factory=dict)
    unread_drafts: set[Request] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
