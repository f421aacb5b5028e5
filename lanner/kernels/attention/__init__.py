"""Triton attention kernels over the paged KV cache; their torch references are in reference.py:

- store_kv:           write this step's K/V into their slots (slot -1: skip)
- decode_attention:   one query token per sequence, split-K over the context (flash-decoding)
- prefill_attention:  many query tokens per sequence, causal, over a cached prefix plus the new tokens

KV cache layout, per layer: K and V each [num_blocks, block_size, kv_heads, head_dim].
The kernel modules import Triton, so they are imported only where the GPU path is chosen.
"""
