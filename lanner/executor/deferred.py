"""Inputs that only the device knows yet, filled in there (overlap scheduling).

With overlap scheduling the host plans step N+1 while step N still runs, so some of N+1's inputs
are on the device only:

- the token each request sampled in N (its first row's input);
- with speculative decoding, the drafts that N's drafter proposed (the rows after it), and how
  many of N's drafts the target accepted, a. The host plans N+1 as if N accepted all m of its
  drafts; the device moves the request's positions back by the rejected ones, shift = a - m, and
  takes each row's KV slot from the slots of every position it may turn out to have. Context
  lengths (position + 1: such a step is all decode rows), the draft's first pass and the
  sampler's keys (output index + shift) follow the same shift.

The host collects all of it while it stages the step (`add`), then one copy and a few gathers
fill it in (`apply`), with no sync.
"""
from __future__ import annotations

import torch

from lanner.core.batch import kv_slots
from lanner.core.request import Request
from lanner.core.transfer import PinnedRing, to_device_parts


class Deferred:
    def __init__(self, block_size: int, extra_positions: int = 0):
        """`extra_positions`: positions past a request's rows whose slots a drafter also writes
        (a draft LM's first pass reads one more row per request)."""
        self.block_size = block_size
        self.extra = extra_positions
        self.firsts: list[tuple[int, int, int, int]] = []  # per request: (row, sample row, sample index, m)
        self.draft_rows: list[tuple[int, int, int]] = []  # (row, sample index, draft j)
        self.shifted: list[tuple[int, int, int]] = []  # (row, request q, candidate slot index at shift 0)
        self.slots: list[int] = []  # candidate slots: per shifted request, its positions begin - m ...
        self.bases: dict[Request, tuple[int, int]] = {}  # shifted request -> (q, candidate index of position 0)
        self.spread: list[int] = []  # per row of the step: m of a shifted request, else 0
        self.shift: torch.Tensor | None = None  # [Q] on the device, after apply
        self.row_shift: torch.Tensor | None = None  # [rows] on the device, after apply
        self.candidates: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.firsts)

    @property
    def plain(self) -> bool:
        """Only each request's first token is on the device (plain overlap): `pending_rows` say
        where it goes and where the step before sampled it, and travel with the step's inputs."""
        return bool(self.firsts) and not self.shifted and not self.draft_rows

    def pending_rows(self) -> tuple[list[int], list[int]]:
        return [row for row, _, _, _ in self.firsts], [sample_row for _, sample_row, _, _ in self.firsts]

    @property
    def shifts(self) -> bool:
        """Some request's positions depend on how many drafts the step before accepted."""
        return bool(self.shifted)

    def add(self, req: Request, row: int, n: int, num_drafts: int) -> None:
        """A request whose token sampled in the step before is still on the device; its rows start
        at `row` (that token, then `num_drafts` drafts, on the device too if req.drafts_on_device)."""
        q = len(self.firsts)
        m = req.num_verifying
        self.firsts.append((row, req.sample_row, req.sample_index, m))
        if req.drafts_on_device:
            self.draft_rows += [(row + 1 + j, req.sample_index, j) for j in range(num_drafts)]
        if m:
            begin = req.num_computed_tokens
            lo = begin - m
            base = len(self.slots) - lo
            self.slots += kv_slots(req.block_ids, lo, begin + n + self.extra, self.block_size)
            self.bases[req] = (q, base)
            self.shifted += self.rows_of(req, row, begin, n)

    def apply(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
              last_sampled: torch.Tensor, last_accepted: torch.Tensor | None, last_proposed: torch.Tensor | None,
              num_rows: int, ring: PinnedRing,
              staged_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fill in the staged step's inputs (the runner's buffers) from the step before's results.
        `staged_rows`: `pending_rows` already on the device (a plain step's), as two tensors.
        index_copy_ and index_select rather than indexing: a step's host time, ~2.5 us against ~6."""
        if staged_rows is not None:
            rows, sample_rows = staged_rows
            input_ids.index_copy_(0, rows, last_sampled.index_select(0, sample_rows))
            return
        parts = [[x for t in self.firsts for x in t], [x for t in self.draft_rows for x in t],
                 [x for t in self.shifted for x in t], self.slots]
        views = to_device_parts(parts, torch.long, ring)
        firsts, draft_rows, shifted, self.candidates = (views[0].view(-1, 4), views[1].view(-1, 3),
                                                        views[2].view(-1, 3), views[3])
        if not self.shifts:  # plain overlap, or drafts after a step that verified none
            input_ids.index_copy_(0, firsts[:, 0], last_sampled.index_select(0, firsts[:, 1]))
        else:  # steps that verified drafts always have their accepted counts
            m = firsts[:, 3]
            accepted = torch.where(m > 0, last_accepted[firsts[:, 2].clamp(max=last_accepted.shape[0] - 1)], 0)
            input_ids[firsts[:, 0]] = last_sampled[firsts[:, 1] + accepted]
            self.shift = accepted - m
            by = self.move(positions, slot_mapping, shifted)
            self.row_shift = torch.zeros(num_rows, dtype=torch.long, device=input_ids.device)
            self.row_shift[shifted[:, 0]] = by
            self.spread = [0] * num_rows
            for row, q, _ in self.shifted:
                self.spread[row] = self.firsts[q][3]
        if self.draft_rows:
            input_ids[draft_rows[:, 0]] = last_proposed[draft_rows[:, 1], draft_rows[:, 2]]

    def rows_of(self, req: Request, first_row: int, first_position: int, count: int) -> list[tuple[int, int, int]]:
        """(row, q, candidate index at shift 0) for `count` rows of a shifted request from
        `first_row`, planned at positions from `first_position` (a drafter's first pass)."""
        q, base = self.bases[req]
        return [(first_row + i, q, base + first_position + i) for i in range(count)]

    def move(self, positions: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Shift the planned positions of `rows` ([R, 3] as rows_of gives them, on the device) and
        take their slots from the candidates; returns each row's shift."""
        by = self.shift[rows[:, 1]]
        positions[rows[:, 0]] += by
        slots[rows[:, 0]] = self.candidates[rows[:, 2] + by]
        return by
