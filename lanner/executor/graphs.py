"""Full CUDA graphs for decode-only steps.

One graph per batch size in a ladder (1, 2, 4, 8, 16, 24, ...); a step of B
sequences replays the smallest graph of size >= B, with the extra rows padded:
token 0, position 0, KV slot -1 (writes nothing) and context length 0 (attention
output zero). All graphs share one memory pool and are captured largest first,
so smaller ones reuse the largest one's memory. Graphs read their inputs from
the model runner's static buffers and the attention backend's metadata buffers,
which every step rewrites in place. The graphs end with the logits of every row,
so a decode step's host work is one graph launch.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

from lanner.layers.attention import forward_context

logger = logging.getLogger(__name__)


def decode_graph_sizes(max_num_seqs: int, sizes: list[int] | None = None) -> list[int]:
    if sizes:
        return sorted({s for s in sizes if s <= max_num_seqs})
    ladder = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, max_num_seqs + 1, 16))
    return sorted({s for s in ladder if s <= max_num_seqs} | {max_num_seqs})


def verify_graph_sizes(seq_sizes: list[int], rows_per_seq: int, max_rows: int) -> list[int]:
    """Row counts for decode graphs that also replay verify steps (a request's last token and its
    drafts, each row attending as a decode row): the sequence ladder, and each of its sizes times
    rows_per_seq (k + 1) and times 2 (requests probing with one draft, engine/speculation.py), so
    that B requests verifying k drafts, or one, need no padding, up to max_rows."""
    per_seq = {2, rows_per_seq} if rows_per_seq > 1 else set()
    return sorted(set(seq_sizes) | {s * r for s in seq_sizes for r in per_seq if s * r <= max_rows})


@dataclass
class CaptureReport:
    sizes: list[int]
    seconds: float
    pool_bytes: int


class SizeLadder:
    """Captured sizes (sorted); a batch pads up to the smallest size that holds it."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.graphs: dict = {}  # size -> (graph, the outputs its capture returned), from capture_ladder
        self.report: CaptureReport | None = None
        self.replays: Counter[int] = Counter()  # per graph size

    def replay_graph(self, size: int):
        """Replay the graph of `size` (its inputs already in the static buffers) and return the
        outputs its capture returned, now holding this replay's results."""
        graph, out = self.graphs[size]
        graph.replay()
        self.replays[size] += 1
        return out

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, n: int) -> int | None:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture_ladder(self, setup, run, what: str, backend=None, sizes: list[int] | None = None,
                       pool=None) -> tuple[dict, CaptureReport]:
        """A CUDA graph of `run(size)` at every size (default: the ladder's), largest first, into one
        memory pool (`pool`, or a new one), after an eager warm-up at the largest, and at each size
        whose attention kernels (`backend`'s kernel_shape) are new: kernels compile outside any
        capture. `setup(size)` runs before each, outside the capture (host-side planning). Returns
        {size: (graph, what run returned)} and the report; a failure names `what` and the size."""
        sizes = self.sizes if sizes is None else sizes
        start, before, graphs = time.perf_counter(), torch.cuda.memory_allocated(), {}
        compiled = set()
        for i, size in enumerate(reversed(sizes)):
            setup(size)
            try:
                shape = backend.kernel_shape() if backend is not None else ()
                if i == 0 or shape not in compiled:
                    compiled.add(shape)
                    run(size)
                    torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = run(size)
            except Exception as e:
                raise RuntimeError(f"CUDA graph capture failed for {what} {size}: {e}") from e
            pool = graph.pool() if pool is None else pool
            graphs[size] = (graph, out)
        torch.cuda.synchronize()
        report = CaptureReport(sizes, time.perf_counter() - start, torch.cuda.memory_allocated() - before)
        logger.info("captured %d graphs of %s %d..%d in %.1f s, %.0f MiB", len(sizes), what, sizes[0], sizes[-1],
                    report.seconds, report.pool_bytes / 2**20)
        return graphs, report


def warm_up_kernel_shapes(backend, sizes: list[int], setup, run) -> None:
    """`run(size)` eagerly once for each new attention kernel shape the plan of `setup(size)` asks for
    (`backend.kernel_shape()`; (): a backend that compiles nothing), in the order of `sizes` (smallest
    first is cheapest: the token count changes only a kernel's grid). For steps that run kernels eagerly
    outside any graph: they compile at start, not in the first such step while every request waits."""
    warmed = set()
    for size in sizes:
        setup(size)
        shape = backend.kernel_shape()
        if shape == ():
            return
        if shape in warmed:
            continue
        warmed.add(shape)
        run(size)


def fewest_rows_of_decode_shapes(backend, rows: range, compiled: set = frozenset()) -> list[int]:
    """The fewest rows among `rows` that plan each decode kernel shape (`backend.decode_kernel_shape`)
    not in `compiled`, ascending: one eager decode step at each compiles every shape `rows` can ask
    for; empty for a backend that compiles nothing."""
    fewest = {}
    for n in rows:
        shape = backend.decode_kernel_shape(n)
        if shape == ():
            return []
        if shape not in compiled:
            fewest.setdefault(shape, n)
    return sorted(fewest.values())


class DecodeGraphs(SizeLadder):
    def __init__(self, runner, sizes: list[int]):
        super().__init__(sizes)
        self.runner = runner
        # reserved memory added while capturing (the KV sizing did not count it): the pool's growth, and what
        # the eager warm-ups left cached in the allocator
        self.pool_growth = 0

    @torch.inference_mode()
    def capture(self, logits: torch.Tensor, pool=None) -> CaptureReport:
        """`logits`: one buffer of [max_size, vocab] for every graph (a step reads it before the next
        replay; per-graph outputs would cost max_num_seqs x vocab for each of the sizes), allocated
        before the KV cache was sized. `pool`: the piecewise graphs' memory pool, counted in that
        sizing (graphs that never run at once can share one); None: a pool of their own."""
        runner = self.runner
        self.logits = logits

        def setup(size: int) -> None:
            runner.backend.plan(runner.dummy_decode_batch(size), num_padded_seqs=size)

        def run(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            with forward_context(runner.backend):
                hidden = runner.model(runner.input_ids[:size], runner.positions[:size])
                return runner.model.compute_logits(hidden, out=self.logits[:size]), hidden

        on_gpu = logits.is_cuda
        reserved = torch.cuda.memory_reserved() if on_gpu else 0
        self.graphs, self.report = self.capture_ladder(setup, run, "decode batch size", runner.backend, pool=pool)
        self.pool_growth = torch.cuda.memory_reserved() - reserved if on_gpu else 0
        return self.report

    def replay(self, batch, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a decode batch (already staged in the runner's buffers) through the graph of `size`;
        returns the logits and hidden states of every row, padding included (the graph's output
        buffers: read them before the next replay of any of the target's graphs, decode, pieces or
        whole-forward, which share one memory pool)."""
        if not batch.planned:
            self.runner.backend.plan(batch, num_padded_seqs=size)
        return self.replay_graph(size)
