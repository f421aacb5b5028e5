"""CUDA graphs for prefill, mixed and large verify steps: whole-forward graphs for
the smaller token counts, piecewise graphs for all.

The model's forward is split at its attention calls into L + 1 pieces
(`run_piece`): everything between two attentions (o_proj, norms, MLP, the next
q/k/v projection and rotary) is a piece, and pieces only read and write static
tensors (`PieceBuffers`). For each capture size (a token count) every piece is
captured as one CUDA graph; a step of T tokens pads to the next size S and
replays the pieces, running attention eagerly in between, because attention's
metadata (sequence count, lengths, tile grid) changes every step.

Padding: rows T..S get token 0, position 0 and KV slot -1 (no KV write); the
attention output rows of padding are zeroed once per step and no attention
kernel writes them, so they stay zero through every layer. The real token
count is also on the device (`ForwardBatch.num_real_tokens_device`) for kernels
inside graphs that must skip padding (MoE routing).

Whole-forward graphs: up to `prefill_graph_max_tokens`, each size also gets one
graph of the entire forward, the attention kernels included (`capture_full`),
replayed by steps with prompt tokens. The prefill kernel walks a tile table in
the backend's buffers with a number of programs fixed by the token count (each
program takes every P-th tile), so one graph serves every mix of sequences; a
step's host work is the plan's copies and one launch instead of two Triton
launches a layer. Decode-only steps that reach these graphs (verify
steps over the decode graphs' rows) keep the pieces and the decode kernel, which
reads a GQA group's keys once.

Steps over the largest size run the same pieces eagerly, unpadded, with
buffers of their own size (one warning). On the CPU there are no graphs: the
pieces run eagerly with the same padding, which is how CI tests this logic.

Each model that captures graphs owns one `PiecewiseGraphs` with its own sizes,
buffers and memory pool (`role` tells target and draft models apart).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lanner.core.batch import ForwardBatch
from lanner.executor.graphs import SizeLadder, warm_up_kernel_shapes
from lanner.layers.attention import forward_context
from lanner.models.llama import PieceBuffers

logger = logging.getLogger(__name__)


def piecewise_sizes(max_tokens: int, sizes: list[int] | None = None) -> list[int]:
    """The capture ladder: every 16 tokens to 256, then steps of 1/8 of the power of two below
    (32 to 512, 64 to 1024, ..., 512 to 8192): padding wastes at most 1/8 above 128 tokens, and
    round budgets (512, 2048, 8192) need none."""
    if sizes:
        return sorted({s for s in sizes if 0 < s <= max_tokens})
    ladder = list(range(16, 257, 16))
    while ladder[-1] < max_tokens:
        ladder.append(ladder[-1] + (1 << (ladder[-1].bit_length() - 1)) // 8)
    return sorted({s for s in ladder if s <= max_tokens} | {max_tokens})


@dataclass
class PiecewiseReport:
    role: str
    sizes: list[int]
    num_pieces: int
    warmup_s: float
    capture_s: float
    pool_bytes: int


class PiecewiseGraphs(SizeLadder):
    def __init__(self, model, sizes: list[int], dtype: torch.dtype, device: torch.device, role: str = "target",
                 full_max_tokens: int = 0):
        super().__init__(sizes)
        self.model = model
        self.role = role
        self.device = device
        self.dtype = dtype
        self.bufs = PieceBuffers.allocate(model.spec, self.max_size, dtype, device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.full_sizes = [s for s in sizes if s <= full_max_tokens]
        self.full_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # size -> the whole forward
        self.pool = None
        self.full_capture_s = 0.0
        self.full_pool_growth = 0  # bytes the whole-forward captures added to the pool (reserved memory)
        self.report: PiecewiseReport | None = None
        self._warned_oversize = False
        self.num_graph_steps = 0  # steps that replayed graphs
        self.num_eager_steps = 0  # steps that ran the pieces eagerly (no graph of their size)
        self.num_full_graph_steps = 0  # steps that replayed a whole-forward graph

    @torch.inference_mode()
    def capture(self, input_ids: torch.Tensor, positions: torch.Tensor) -> PiecewiseReport:
        """Capture every piece at every size, largest first, into one pool. `input_ids` and
        `positions` are the runner's static input buffers (at least max_size long)."""
        model = self.model
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        largest = self.max_size
        # one warm-up at the largest size compiles the Triton kernels and sets cuBLAS up
        for j in range(model.num_pieces):
            model.run_piece(j, input_ids[:largest], positions[:largest], self.bufs)
        torch.cuda.synchronize(self.device)
        warmup_s = time.perf_counter() - start
        pool = None
        for size in reversed(self.sizes):
            bufs = self.bufs.rows(size)
            graphs = []
            for j in range(model.num_pieces):
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        model.run_piece(j, input_ids[:size], positions[:size], bufs)
                except Exception as e:
                    raise RuntimeError(f"piecewise CUDA graph capture failed ({self.role} model, {size} tokens, "
                                       f"piece {j} of {model.num_pieces}): {e}") from e
                pool = graph.pool() if pool is None else pool
                graphs.append(graph)
            self.graphs[size] = graphs
        self.pool = pool
        torch.cuda.synchronize(self.device)
        self.report = PiecewiseReport(self.role, self.sizes, model.num_pieces, warmup_s,
                                      time.perf_counter() - start - warmup_s,
                                      torch.cuda.memory_reserved(self.device) - before)
        logger.info("captured %d x %d piecewise graphs (%s model, %d..%d tokens): warm-up %.1f s, capture %.1f s, "
                    "%.0f MiB", len(self.sizes), model.num_pieces, self.role, self.sizes[0], largest, warmup_s,
                    self.report.capture_s, self.report.pool_bytes / 2**20)
        return self.report

    @torch.inference_mode()
    def capture_full(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     backend) -> None:
        """The whole-forward graphs, largest first, into the pieces' pool (call after `capture`, once the
        backend and its KV cache exist), then a warm-up of the steps that replay pieces. The runner's
        static inputs are the graphs' inputs; the warm-ups and the captures plan one empty sequence (no
        keys, no KV writes)."""

        slot_mapping[:self.max_size].fill_(-1)  # once: plans and graphs only read it

        def setup(size: int) -> None:
            backend.plan(ForwardBatch(input_ids[:size], positions[:size], slot_mapping[:size], [size], [0], [[]],
                                      input_ids[:0], size), graph_tokens=size)

        if self.full_sizes:
            self._capture_full(input_ids, positions, backend, setup)
        self._warm_up_piece_steps(input_ids, positions, backend, setup)

    def _warm_up_piece_steps(self, input_ids: torch.Tensor, positions: torch.Tensor, backend, setup) -> None:
        """One step of each new attention kernel shape among the sizes without a whole-forward graph
        (at least one size: decode-only steps over the decode graphs take the pieces too), run as such
        a step runs (pieces replayed, attention eagerly between them), so that the kernels only these
        steps launch (the KV store, a prefill tile) compile now: otherwise the first long prompt
        compiles them while every other request waits (0.4 s on a fresh machine, W-8B)."""
        if not self.graphs:  # nothing captured (the CPU)
            return

        def run(size: int) -> None:
            graphs = self.graphs[size]
            with forward_context(backend):
                self.model.forward_pieces(input_ids[:size], positions[:size], self.bufs.rows(size),
                                          lambda j: graphs[j].replay())

        # a graph's plan (setup): the prefill kernel's grid is fixed, its tiles attend to no keys
        warm_up_kernel_shapes(backend, [s for s in self.sizes if s not in self.full_graphs] or self.sizes[:1],
                              setup, run)
        torch.cuda.synchronize(self.device)

    def _capture_full(self, input_ids: torch.Tensor, positions: torch.Tensor, backend, setup) -> None:
        before = torch.cuda.memory_reserved(self.device)

        def run(size: int) -> torch.Tensor:
            with forward_context(backend):
                return self.model.forward_pieces(input_ids[:size], positions[:size], self.bufs.rows(size))

        graphs, report = self.capture_ladder(setup, run, f"whole-forward ({self.role} model) tokens", backend,
                                             self.full_sizes, self.pool)
        self.full_graphs = {size: graph for size, (graph, _) in graphs.items()}
        torch.cuda.empty_cache()  # the warm-ups' activations
        self.full_capture_s = report.seconds
        self.full_pool_growth = torch.cuda.memory_reserved(self.device) - before

    @contextmanager
    def uncounted(self):
        """Steps run inside (start-up warm-ups) add to no step count and use up no one-time warning:
        those are about the requests' steps."""
        saved = self.num_graph_steps, self.num_eager_steps, self._warned_oversize
        try:
            yield
        finally:
            self.num_graph_steps, self.num_eager_steps, self._warned_oversize = saved

    def forward(self, batch, backend) -> torch.Tensor:
        """Hidden states [T_padded, hidden] of a staged batch whose input rows were padded to
        `padded_size(batch.num_real_tokens)` (or not padded at all if it is too large)."""
        real = batch.num_real_tokens
        size = batch.input_ids.shape[0]
        if size > self.max_size:
            if not self._warned_oversize:
                logger.warning("a step of %d tokens is over the largest piecewise graph (%d): it runs the same "
                               "pieces eagerly", real, self.max_size)
                self._warned_oversize = True
            bufs = PieceBuffers.allocate(self.model.spec, size, self.dtype, self.device)
        else:
            bufs = self.bufs.rows(size)
        bufs.attn_out[real:].zero_()  # padding rows: no attention kernel writes them
        full = None if batch.is_decode_only else self.full_graphs.get(size)
        if full is not None:
            backend.plan(batch, graph_tokens=size)
            full.replay()
            self.num_full_graph_steps += 1
            return bufs.hidden
        graphs = self.graphs.get(size)
        run_piece = None if graphs is None else (lambda j: graphs[j].replay())
        if graphs is None:
            self.num_eager_steps += 1
        else:
            self.num_graph_steps += 1
        backend.plan(batch)
        with forward_context(backend):
            return self.model.forward_pieces(batch.input_ids, batch.positions, bufs, run_piece)
