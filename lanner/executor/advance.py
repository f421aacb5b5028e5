"""A steady decode step's inputs, advanced on the device instead of staged from the host.

A step that decodes the same requests as the step before, in the same order, each one position
further and still inside the KV block it wrote last, needs nothing from the host: its positions,
KV slots and context lengths are the last step's plus one, its block tables and logits rows are
the same, and its input tokens are what the last step sampled, row for row, already on the device.
The runner then adds one to them there: three small device operations, where staging and
planning through pinned buffers take about ten CUDA calls (copies, event records and waits, the
pending tokens' gather), most of a batch-1 step's host time on an H100's host. A step that
crosses into a new block, or changes the batch in any other way, stages as usual.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lanner.core.batch import ForwardBatch
from lanner.core.request import Request
from lanner.core.schedule import SchedulerOutput
from lanner.executor.deferred import Deferred

if TYPE_CHECKING:
    from lanner.executor.model_runner import ModelRunner


@dataclass
class DecodeRun:
    """The last decode step a runner staged or advanced, which the next may advance."""
    requests: list[Request]  # a row each, in order
    positions: list[int]  # each row's position in that step
    num_blocks: list[int]  # each request's KV blocks then
    rows: int  # rows staged (a decode graph's size, or the requests)
    stages: int  # the runner's staging count after that step: a staging since overwrote its inputs
    batch: ForwardBatch


def advanced_positions(run: DecodeRun, sched: SchedulerOutput, block_size: int) -> list[int] | None:
    """The rows' positions when `sched` is `run` one token further (every request samples its next
    token from the one `run` sampled, in the block it wrote last); otherwise None."""
    if len(sched.scheduled) != len(run.requests):
        return None
    positions = []
    for (req, n), last, position, blocks in zip(sched.scheduled, run.requests, run.positions, run.num_blocks):
        begin = req.num_computed_tokens
        if (req is not last or n != 1 or begin != position + 1 or begin % block_size == 0
                or len(req.block_ids) != blocks or req.draft_token_ids or req.num_tokens != begin + 1):
            return None
        positions.append(begin)
    return positions


def decode_run(runner: ModelRunner, sched: SchedulerOutput, batch: ForwardBatch) -> DecodeRun | None:
    """The step `runner` staged as the next one may advance it: every row a request's one token,
    which samples (no drafts, no drafter), on a path that plans from the batch as staged (a decode
    graph, or the plain forward: pieces would plan their own padding)."""
    n, rows = len(sched.scheduled), batch.input_ids.shape[0]
    if (not runner.advance_decodes or runner.drafter is not None or batch.num_real_tokens != n
            or not batch.sampling_rows_are_tokens or batch.device_seq_lens is not None):
        return None
    graphs = runner.graphs
    in_graph = graphs is not None and graphs.padded_size(n) == rows
    if not in_graph and not (graphs is None and runner.piecewise is None and rows == n):
        return None
    requests = [req for req, _ in sched.scheduled]
    return DecodeRun(requests, [req.num_computed_tokens for req in requests], [len(req.block_ids) for req in requests],
                     rows, runner.num_stages, batch)


def advance(runner: ModelRunner, sched: SchedulerOutput):
    """`runner.prepare` of a step that advances its last decode step by a token on the device, or
    None where it cannot."""
    run = runner.decode_run
    if run.stages != runner.num_stages or not runner.backend.can_advance(run.rows):
        return None
    positions = advanced_positions(run, sched, runner.block_size)
    if positions is None:
        return None
    n = len(positions)
    runner.staged_view(1, n, stop=3).add_(1)  # positions and KV slots, one further in the same blocks
    runner.staged_view(0, n).copy_(runner.last_sampled[:n])  # each row's request sampled its input there
    batch = dataclasses.replace(run.batch, seq_lens=[p + 1 for p in positions], planned=True)
    runner.backend.advance_decode(batch, run.rows)
    run.positions, run.batch = positions, batch
    runner.num_advanced_steps += 1
    # no prompt rows, and no layout (it is a drafter's, and there is none)
    return batch, list(run.requests), [0] * n, [], [], Deferred(runner.block_size)
