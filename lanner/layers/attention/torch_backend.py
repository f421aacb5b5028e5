"""Reference attention backend in plain torch: the CPU path, and the ground
truth that the Triton kernels are tested against. One sequence at a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lanner.executor.batch import ForwardBatch
from lanner.layers.attention.backend import AttentionBackend


class TorchAttentionBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        self.slot_mapping = batch.slot_mapping
        self.seqs: list[tuple[int, int, torch.Tensor]] = []  # (first token, query length, context slots)
        start = 0
        offsets = torch.arange(self.block_size)
        for q_len, seq_len, blocks in zip(batch.query_lens, batch.seq_lens, batch.block_tables):
            slots = (torch.tensor(blocks)[:, None] * self.block_size + offsets).flatten()[:seq_len]
            self.seqs.append((start, q_len, slots.to(device)))
            start += q_len

    def forward(self, layer, q, k, v, scale, out=None):
        k_cache, v_cache = self.kv_caches[layer]
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        keep = self.slot_mapping >= 0
        k_flat[self.slot_mapping[keep]] = k[keep]
        v_flat[self.slot_mapping[keep]] = v[keep]
        out = torch.zeros_like(q) if out is None else out
        group = q.shape[1] // k.shape[1]
        for start, q_len, slots in self.seqs:
            out[start:start + q_len] = attend(q[start:start + q_len], k_flat[slots], v_flat[slots], scale, group)
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """Causal attention of the last q_len positions of a context over all of it.
    q: [q_len, heads, d]; k, v: [ctx_len, kv_heads, d]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    query_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
    mask = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos[:, None]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
