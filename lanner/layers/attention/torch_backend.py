"""Reference attention backend in plain torch: the CPU path, and the ground
truth that the Triton kernels are tested against. One sequence at a time."""
from __future__ import annotations

import torch

from lanner.core.batch import ForwardBatch
from lanner.kernels.attention.reference import attend, from_cache_ref, store_kv_ref
from lanner.layers.attention.backend import AttentionBackend


class TorchAttentionBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch, num_padded_seqs: int | None = None, graph_tokens: int | None = None) -> None:
        """Rows past the planned sequences (a graph's padding) attend to nothing: their output is zero.
        This backend's work has no grid that a graph fixes: `graph_tokens` changes nothing."""
        device = batch.input_ids.device
        self.slot_mapping = batch.slot_mapping
        self.seqs: list[tuple[int, int, torch.Tensor]] = []  # (first token, query length, context slots)
        start = 0
        offsets = torch.arange(self.block_size)
        # lengths known on the device only: read them (a sync, but this backend is the CPU path)
        seq_lens = batch.seq_lens if batch.device_seq_lens is None else batch.device_seq_lens.tolist()
        for q_len, seq_len, blocks in zip(batch.query_lens, seq_lens, batch.block_tables):
            slots = (torch.tensor(blocks, dtype=torch.long)[:, None] * self.block_size + offsets).flatten()[:seq_len]
            self.seqs.append((start, q_len, slots.to(device)))
            start += q_len

    def plan_decode(self, block_tables):
        self.decode_tables = block_tables

    def set_decode_lens(self, seq_lens, slot_mapping):
        lens = seq_lens.tolist()  # the CPU path: nothing to overlap with
        self.plan(ForwardBatch(slot_mapping, slot_mapping, slot_mapping, [1] * len(lens), lens, self.decode_tables,
                               slot_mapping[:0], len(lens)))

    def store(self, layer, k, v):
        store_kv_ref(k, v, *self.kv_caches[layer], self.slot_mapping, *self.kv_scales[layer])

    def forward(self, layer, q, k, v, scale, out=None):
        self.store(layer, k, v)
        k_cache, v_cache = self.kv_caches[layer]
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        out = torch.zeros_like(q) if out is None else out
        group = q.shape[1] // k.shape[1]
        k_scale, v_scale = self.kv_scales[layer]
        for start, q_len, slots in self.seqs:
            out[start:start + q_len] = attend(q[start:start + q_len], from_cache_ref(k_flat[slots], q.dtype, k_scale),
                                              from_cache_ref(v_flat[slots], q.dtype, v_scale), scale, group)
        return out
