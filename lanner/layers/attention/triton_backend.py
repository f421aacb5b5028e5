"""The GPU attention backend: Triton kernels over the paged cache.

All per-step metadata lives in device buffers allocated once; `plan()` fills
them in place (through pinned host buffers reused in turn, core/transfer.py), so the model forward never
syncs with the host and a CUDA graph captured over these buffers replays with
whatever the latest `plan()` wrote.
"""
from __future__ import annotations

from itertools import accumulate

import numpy as np
import torch

from lanner.core.batch import ForwardBatch
from lanner.core.transfer import PinnedRing, Views
from lanner.kernels.attention.decode import decode_attention, decode_workspace, num_decode_splits
from lanner.kernels.attention.prefill import (
    prefill_attention,
    prefill_programs,
    prefill_tile,
    prefill_tile_bound,
    prefill_tiles,
    tile_positions,
)
from lanner.kernels.attention.store_kv import store_kv
from lanner.layers.attention.backend import AttentionBackend


class TritonAttentionBackend(AttentionBackend):
    def __init__(self, kv_caches, block_size: int, max_rows: int, max_model_len: int, num_heads: int,
                 max_tokens: int, kv_scales: list[tuple[float, float]] | None = None):
        """`max_rows`: the most sequences a plan holds (a verify step's rows each count as one);
        `max_tokens`: the most query tokens."""
        super().__init__(kv_caches, block_size, kv_scales)
        device = kv_caches[0][0].device
        self.max_model_len = max_model_len
        self.num_heads = num_heads
        # split-K fills the multiprocessors this GPU has (the interpreter on the CPU: an H100's)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        _, _, self.num_kv_heads, self.head_dim = kv_caches[0][0].shape
        width = -(-max_model_len // block_size)
        self.block_tables = torch.zeros(max_rows, width, dtype=torch.int32, device=device)
        # context lengths, then query starts: one buffer, so a plan copies both at once (the starts
        # 16-byte aligned, as a buffer of their own would be: Triton specializes on alignment)
        self.query_start_at = -(-max_rows // 4) * 4
        self.lens = torch.zeros(self.query_start_at + max_rows + 1, dtype=torch.int32, device=device)
        self.seq_lens, self.query_start = self.lens[:max_rows], self.lens[self.query_start_at:]
        self.max_rows = max_rows
        self.uploads = PinnedRing(device)
        self._views = Views()
        self.advanceable_rows: int | None = None  # the rows of the last plan, when advance_decode may follow it
        self.group = num_heads // self.num_kv_heads
        # the count, then at most a tile a query token
        self.tiles = torch.zeros(1 + max_tokens, 2, dtype=torch.int32, device=device)
        self.splits = [num_decode_splits(rows, self.num_kv_heads, max_model_len, self.num_sms)
                       for rows in range(max_rows + 1)]  # by row count: a plan looks it up
        # split-K partials of the largest (rows x splits) any plan can ask for
        parts = max(r * self.splits[r] for r in range(1, max_rows + 1))
        self.workspace = decode_workspace(parts, num_heads, self.head_dim, max_rows * self.num_kv_heads, device)

    def plan(self, batch: ForwardBatch, num_padded_seqs: int | None = None, graph_tokens: int | None = None) -> None:
        """`num_padded_seqs` > num_seqs adds empty sequences (length 0) for a CUDA graph's padding rows.
        `graph_tokens`: the plan is for a CUDA graph that runs the prefill kernel on steps of this many
        (padded) tokens, so the kernel's grid is what any such step needs (kernels/attention/prefill.py)."""
        n = batch.num_seqs
        rows = num_padded_seqs or n
        self.advanceable_rows = None
        self._plan_rows(rows, decode_only=batch.is_decode_only and graph_tokens is None)
        self.slot_mapping = batch.slot_mapping
        tiles = None if self.decode_only else self._plan_prefill(batch, graph_tokens)
        # one pinned host buffer for the step's metadata: block tables, lengths, tiles
        width = self._tables_width(batch.block_tables)
        lens = self.query_start_at + rows + 1  # every context length (zeros past the plan's), the query starts
        shapes = ((len(batch.block_tables), width), (lens,)) + (() if tiles is None else (tiles.shape,))
        (host_tables, tables_view), (host_lens, lens_view), *tiles_part = self.uploads.take_parts(shapes, torch.int32)
        self._copy_block_tables(batch.block_tables, host_tables, tables_view)
        self._fill_lens(lens_view, batch)
        self.device_view("lens", lens).copy_(host_lens, non_blocking=True)
        if tiles is not None:
            (host, view), = tiles_part
            view[:] = tiles
            self.device_view("tiles", tiles.shape[0]).copy_(host, non_blocking=True)
        self.uploads.sent()
        if batch.device_seq_lens is not None:
            self.device_view("seq_lens", n).copy_(batch.device_seq_lens)
        elif self.decode_only:
            self.advanceable_rows = rows

    def can_advance(self, rows: int) -> bool:
        return self.advanceable_rows == rows

    def advance_decode(self, batch: ForwardBatch, rows: int) -> None:
        # the context lengths one longer; the tables, query starts and split count stay as planned
        self.device_view("seq_lens", batch.num_seqs).add_(1)

    def _plan_rows(self, rows: int, decode_only: bool) -> None:
        """The planned row count and what follows from it, once a plan rather than once a layer."""
        self.rows, self.decode_only, self.num_splits = rows, decode_only, self.splits[rows]
        self.planned_tables = self.device_view("block_tables", rows)
        self.planned_seq_lens = self.device_view("seq_lens", rows)
        self.planned_query_start = self.device_view("query_start", rows + 1)

    def _fill_lens(self, view: np.ndarray, batch: ForwardBatch) -> None:
        """`view` (host, laid out as self.lens up to the plan's rows): each context length, zeros
        past them, then the query starts (cumulative query lengths, flat over padding rows)."""
        n = batch.num_seqs
        view[:n] = batch.seq_lens
        view[n:self.query_start_at] = 0
        query_start = view[self.query_start_at:]
        query_start[0] = 0
        query_start[1:n + 1] = list(accumulate(batch.query_lens))  # np.cumsum over a list costs more
        query_start[n + 1:] = query_start[n]

    def _plan_prefill(self, batch: ForwardBatch, graph_tokens: int | None) -> np.ndarray:
        """The prefill kernel's tile shape and program count (fixed by a graph's size); returns the
        tile table to upload. The shape follows the staged rows, padding included, so a graph and
        the pieces of its size agree."""
        tokens = batch.input_ids.shape[0] if graph_tokens is None else graph_tokens
        self.prefill_tile = prefill_tile(self.head_dim, self.group, tokens)
        positions = tile_positions(self.prefill_tile, self.group)
        tiles = prefill_tiles(batch.query_lens, batch.seq_lens, positions)
        most = tiles.shape[0] - 1 if graph_tokens is None else prefill_tile_bound(tokens, self.max_rows, positions)
        self.num_prefill_programs = prefill_programs(tokens, most, self.num_kv_heads, positions, self.num_sms)
        return tiles

    def kernel_shape(self) -> tuple:
        """What the planned step's attention kernels compile for (a new value: a new compilation)."""
        return self.decode_kernel_shape(self.rows) if self.decode_only else ("prefill", self.prefill_tile)

    def decode_kernel_shape(self, rows: int) -> tuple:
        return ("decode", self.splits[rows])

    def plan_decode(self, block_tables):
        self.advanceable_rows = None
        n = len(block_tables)
        host, view = self.uploads.take((n, self._tables_width(block_tables)), torch.int32)
        self._copy_block_tables(block_tables, host, view)
        self.uploads.sent()
        self._plan_rows(n, decode_only=True)

    def set_decode_lens(self, seq_lens, slot_mapping):
        self.advanceable_rows = None
        self.planned_seq_lens.copy_(seq_lens)  # device to device: inside a draft graph too
        self.slot_mapping = slot_mapping

    @staticmethod
    def _tables_width(block_tables: list[list[int]]) -> int:
        return max((len(b) for b in block_tables), default=1) or 1

    def _copy_block_tables(self, block_tables: list[list[int]], host: torch.Tensor, view: np.ndarray) -> None:
        """Copy the tables through `host` (pinned, n x width, and `view`, its numpy view)."""
        view[:] = 0
        for i, blocks in enumerate(block_tables):
            view[i, :len(blocks)] = blocks
        self.device_view("block_tables", *host.shape).copy_(host, non_blocking=True)

    def device_view(self, name: str, rows: int, cols: int | None = None) -> torch.Tensor:
        """The first `rows` (x `cols`) of the named metadata buffer, kept per shape (core/transfer.py Views)."""
        return self._views.get((name, rows, cols), lambda: getattr(self, name)[:rows] if cols is None
                               else getattr(self, name)[:rows, :cols])

    def store(self, layer, k, v):
        k_cache, v_cache = self.kv_caches[layer]
        store_kv(k, v, k_cache, v_cache, self.slot_mapping, *self.kv_scales[layer])

    def kv_store_target(self, layer):
        self.projected_kv.add(layer)
        return (*self.kv_caches[layer], self.slot_mapping, self.kv_scales[layer])

    def forward(self, layer, q, k, v, scale, out=None):
        if layer in self.projected_kv:
            self.projected_kv.discard(layer)  # the projection's kernel stored K/V
        else:
            self.store(layer, k, v)
        k_cache, v_cache = self.kv_caches[layer]
        k_scale, v_scale = self.kv_scales[layer]
        rows = self.rows
        if self.decode_only:
            # one query row per planned sequence; rows past them (piecewise padding) stay untouched
            return decode_attention(q[:rows], k_cache, v_cache, self.planned_tables, self.planned_seq_lens,
                                    scale, self.num_splits, out=None if out is None else out[:rows],
                                    workspace=self.workspace, k_scale=k_scale, v_scale=v_scale)
        return prefill_attention(q, k_cache, v_cache, self.planned_tables, self.planned_seq_lens,
                                 self.planned_query_start, self.tiles, scale, out=out,
                                 num_programs=self.num_prefill_programs, tile=self.prefill_tile, k_scale=k_scale,
                                 v_scale=v_scale)
