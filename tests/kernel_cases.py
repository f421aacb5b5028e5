"""Random paged-attention problems, shared by the CPU (interpreter) and GPU kernel tests."""
from __future__ import annotations

import torch


def paged_problem(seq_lens: list[int], q_lens: list[int], heads: int, kv_heads: int, dim: int, page: int,
                  dtype: torch.dtype, device: str, seed: int = 0):
    """K/V for each sequence scattered over shuffled cache blocks, plus queries for the last q_len tokens."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // page) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(dtype).to(device)
    width = max(blocks_per_seq + [1])
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(order[used:used + n], dtype=torch.int32)
        used += n
    query_start = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(query_start[-1]), heads, dim, generator=g).to(dtype).to(device)
    return (q, k_cache, v_cache, block_tables.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start.to(device))


def tile_table(q_lens: list[int], seq_lens: list[int], q: torch.Tensor, k_cache: torch.Tensor,
               capacity: int | None = None, tile: tuple | None = None) -> torch.Tensor:
    """The prefill kernel's tile table for these sequences, planned for `tile` (default: the
    kernel's default for q's tokens), with unused rows up to `capacity`."""
    from lanner.kernels.attention.prefill import prefill_tile, prefill_tiles, tile_positions

    group = q.shape[1] // k_cache.shape[2]
    tile = tile or prefill_tile(q.shape[2], group, q.shape[0])
    return torch.from_numpy(prefill_tiles(q_lens, seq_lens, tile_positions(tile, group), capacity)).to(q.device)


def fp8_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches as an fp8 KV cache (kv_cache_dtype=fp8, scale 1) holds them."""
    from lanner.kernels.attention.reference import to_cache_ref

    return to_cache_ref(k_cache, torch.float8_e4m3fn), to_cache_ref(v_cache, torch.float8_e4m3fn)
