"""fused_moe: the mixture-of-experts block in four launch groups, no host syncs.

1. layout: the routed entries (token, choice) grouped by expert on the device (align.py);
2. gate/up GEMM: each program multiplies BLOCK_M rows of x, gathered through the layout, by one
   expert's gate and up columns, and writes silu(gate) * up (fused: gate/up never reach memory);
3. down GEMM: the same kernel over the activations, scaling each row by its router weight, into a
   float32 row per entry;
4. combine: each token sums its K rows in a fixed order (deterministic: no atomics).

Two layouts feed the one GEMM kernel. "contiguous" (sorted, padded per expert) launches only as
many row blocks as the routing can need, for prefill-sized batches. "masked" launches a fixed
(expert, row block, column tile) grid over per-expert slots and counts, and programs past an
expert's count return at once: the shape CUDA graphs replay for decode and small batches.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lanner.kernels import next_power_of_2
from lanner.kernels.moe.align import align_by_expert, masked_layout
from lanner.kernels.moe.configs import LAYOUTS, get_config


@triton.jit
def _grouped_tile(pid, num_m_blocks, num_n_tiles, GROUP_M: tl.constexpr):
    """Programs in groups of GROUP_M row blocks sweep the column tiles together: the expert
    weights they share stay in L2."""
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, weights_ptr, entries_ptr, meta_ptr, num_padded_ptr, N, K, num_entries,
                     num_m_blocks, capacity, stride_a, stride_we, stride_wn, stride_o,
                     A_ROW_DIV: tl.constexpr, MASKED: tl.constexpr, GATE_UP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     PRECISION: tl.constexpr):
    """out[entry, n-tile] for BLOCK_M entries of one expert. Masked: entries_ptr is slots [E, capacity],
    meta_ptr counts [E]. Contiguous: entries_ptr is sorted_ids, meta_ptr block_experts. A row of
    a_ptr is entry // A_ROW_DIV (x for the gate/up GEMM, whose rows are tokens: A_ROW_DIV = top-k)."""
    rows = tl.arange(0, BLOCK_M)
    if MASKED:
        expert = tl.program_id(0)
        m_block = tl.program_id(1)
        n_tile = tl.program_id(2)
        if m_block * BLOCK_M >= tl.load(meta_ptr + expert):
            return
        slot = m_block * BLOCK_M + rows
        entries = tl.load(entries_ptr + expert * capacity + slot, mask=slot < capacity, other=-1)
    else:
        m_block, n_tile = _grouped_tile(tl.program_id(0), num_m_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
        if m_block * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(meta_ptr + m_block)
        if expert < 0:
            return
        entries = tl.load(entries_ptr + m_block * BLOCK_M + rows)

    row_ok = (entries >= 0) & (entries < num_entries)  # -1 past a masked count, the sentinel in padding
    entry = tl.where(row_ok, entries, 0).to(tl.int64)
    a_rows = a_ptr + (entry // A_ROW_DIV)[:, None] * stride_a
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    w_tile = w_ptr + expert.to(tl.int64) * stride_we + n[None, :] * stride_wn + k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if GATE_UP:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k < K - k0
        a = tl.load(a_rows + (k0 + k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        acc = tl.dot(a, tl.load(w_tile + k0, mask=w_ok, other=0.0), acc, input_precision=PRECISION)
        if GATE_UP:  # the up projection's rows follow the gate's N rows
            up = tl.load(w_tile + N * stride_wn + k0, mask=w_ok, other=0.0)
            acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)

    if GATE_UP:  # rounded where a torch model rounds: gate, up, silu(gate), the product
        dtype = a_ptr.dtype.element_ty
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        result = silu * acc_up.to(dtype).to(tl.float32)
    else:
        result = acc * tl.load(weights_ptr + entry, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + entry[:, None] * stride_o + n[None, :], result.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(rows_ptr, ids_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for j in tl.static_range(TOP_K):  # rows of unrouted entries were never written: read no column of them
        width = tl.where(tl.load(ids_ptr + token * TOP_K + j) >= 0, H, 0)
        acc += tl.load(rows_ptr + (token * TOP_K + j) * H + h, mask=h < width, other=0.0)
    tl.store(out_ptr + token * H + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class _Layout(NamedTuple):
    """The routed entries as _moe_gemm_kernel reads them."""
    entries: torch.Tensor  # sorted_ids, or slots [E, capacity]
    meta: torch.Tensor  # block_experts, or counts [E]
    num_padded: torch.Tensor  # contiguous only
    masked: bool
    m_blocks: int  # row blocks in the grid: of all sorted_ids, or of one expert's slots
    capacity: int  # masked only


def _expert_gemm(a, w, out, weights, layout: _Layout, num_entries: int, a_row_div: int, gate_up: bool,
                 config: dict) -> None:
    entries, meta, num_padded, masked, m_blocks, capacity = layout
    assert w.stride(2) == 1, "expert weights need contiguous rows (vector loads of the reduction dim)"
    n = w.shape[1] // 2 if gate_up else w.shape[1]
    n_tiles = triton.cdiv(n, config["BLOCK_N"])
    grid = (meta.numel(), m_blocks, n_tiles) if masked else (m_blocks * n_tiles,)
    _moe_gemm_kernel[grid](
        a, w, out, weights, entries, meta, num_padded, n, a.shape[1], num_entries, m_blocks, capacity,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), A_ROW_DIV=a_row_div, MASKED=masked,
        GATE_UP=gate_up, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, layout: str, config: dict | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_ids [T, K] int32 (-1: no
    expert), topk_weights [T, K] float32 -> out [T, H], as moe_reference computes it. `layout`:
    "contiguous" or "masked"; `config`: a tile config, else get_config's for this shape and T."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown MoE layout {layout!r}: one of {LAYOUTS}")
    T, H = x.shape
    E, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    config = config or get_config(E, H, two_i // 2, T, layout, _device_name(x.device))
    x, topk_ids, topk_weights = x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    block_m = config["BLOCK_M"]
    if layout == "contiguous":
        entries, block_experts, num_padded = align_by_expert(topk_ids, E, block_m)
        layout_args = _Layout(entries, block_experts, num_padded, False, block_experts.numel(), 0)
    else:
        slots, counts = masked_layout(topk_ids, E, T)
        layout_args = _Layout(slots, counts, counts, True, triton.cdiv(T, block_m), T)
    act = torch.empty(T * top_k, two_i // 2, dtype=x.dtype, device=x.device)
    rows = torch.empty(T * top_k, H, dtype=torch.float32, device=x.device)
    _expert_gemm(x, w13, act, topk_weights, layout_args, T * top_k, top_k, True, config)
    _expert_gemm(act, w2, rows, topk_weights, layout_args, T * top_k, 1, False, config)
    block_h = min(1024, next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](rows, topk_ids, out, H, TOP_K=top_k, BLOCK_H=block_h)
    return out
