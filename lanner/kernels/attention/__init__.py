"""Triton attention kernels over the paged KV cache, each beside its torch reference:

- store_kv:           write this step's K/V into their slots (slot -1: skip)
- decode_attention:   one query token per sequence, split-K over the context (flash-decoding)
- prefill_attention:  many query tokens per sequence, causal, over a cached prefix plus the new tokens

KV cache layout, per layer: K and V each [num_blocks, block_size, kv_heads, head_dim].
"""
from lanner.kernels.attention.decode import decode_attention, decode_attention_ref, num_decode_splits
from lanner.kernels.attention.prefill import prefill_attention, prefill_attention_ref
from lanner.kernels.attention.store_kv import store_kv, store_kv_ref

__all__ = ["store_kv", "store_kv_ref", "decode_attention", "decode_attention_ref", "num_decode_splits",
           "prefill_attention", "prefill_attention_ref"]
