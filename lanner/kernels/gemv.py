"""Weight GEMV for decode batches of a few rows: out[M, N] = x[M, K] @ w[N, K]^T with M <= 16.

At batch 1-8 a decoder's matmuls read their weights once and do almost no arithmetic, so their
time is the weight bytes over the memory bandwidth plus the kernel's latency; cuBLAS's small-M
kernels leave part of both on the table for these shapes (docs/performance.md). Here a program
owns BLOCK_N weight rows and streams them in BLOCK_K columns: one row (M = 1) multiplies and
accumulates elementwise and reduces once at the end; more rows pad x to 16 and use the tensor
cores with the weight as the dot's tall operand (w @ x^T). When N alone gives too few programs to
fill the GPU, SPLIT_K programs share a row block's columns: each writes a float32 partial, and the
last to finish (an atomic count per row block) sums them, writes the output and zeroes the count,
so the GEMV stays one kernel (a graph node) either way.

GATED: x is a gated MLP's [M, 2K] gate and up projections, and the GEMV multiplies silu(gate) * up
(kernels/fused.py `silu_mul`, the same rounding as `silu_and_mul`) as it loads x: a down projection
then needs no activation kernel before it, one graph node fewer a layer.

Which configuration (or cuBLAS) runs each (N, K, M) is measured on the GPU at hand:
lanner/executor/gemv_table.py. The torch reference is `x @ w.t()` (`gemv_reference`)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lanner.kernels.fused import silu_mul
from lanner.kernels.fused_reference import silu_and_mul_ref

MAX_ROWS = 16  # rows (M) one launch takes: the dot pads x to 16


def block_rows(rows: int) -> int:
    return 1 if rows == 1 else MAX_ROWS


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def blocks(self, n: int) -> int:
        """Programs along N (each also owns a split count with split-K)."""
        return -(-n // self.block_n)

    def workspace_floats(self, n: int, rows: int) -> int:
        """Split-K partials of an [rows, n] output: one row's path keeps one column a block."""
        return 0 if self.split_k == 1 else self.split_k * self.blocks(n) * self.block_n * block_rows(rows)

    def __str__(self) -> str:
        return f"n{self.block_n}-k{self.block_k}-s{self.split_k}-w{self.num_warps}-st{self.num_stages}"


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr):
    block = tl.program_id(0)
    split = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past N read the last row (unmasked, vectorized loads) and are not stored
    w_rows = w_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_wn
    ks = tl.arange(0, BLOCK_K)
    ms = tl.arange(0, BLOCK_M)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole tiles a split (EVEN_K: exactly K / SPLIT_K)
    start = split * span
    end = tl.minimum(start + span, K)
    if BLOCK_M == 1:
        wide = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k in range(start, end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_rows + (k + ks)[None, :])
                x = tl.load(x_ptr + k + ks)
                if GATED:
                    x = silu_mul(x, tl.load(x_ptr + K + k + ks))
            else:
                w = tl.load(w_rows + (k + ks)[None, :], mask=(k + ks)[None, :] < end, other=0.0)
                x = tl.load(x_ptr + k + ks, mask=k + ks < end, other=0.0)
                if GATED:
                    x = silu_mul(x, tl.load(x_ptr + K + k + ks, mask=k + ks < end, other=0.0))
            wide += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(wide, 1)[:, None]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k in range(start, end, BLOCK_K):
            x_ok = ms[:, None] < M
            if EVEN_K:
                w = tl.load(w_rows + (k + ks)[None, :])
            else:
                w = tl.load(w_rows + (k + ks)[None, :], mask=(k + ks)[None, :] < end, other=0.0)
                x_ok = x_ok & ((k + ks)[None, :] < end)
            x_at = x_ptr + ms[:, None] * stride_xm + (k + ks)[None, :]
            x = tl.load(x_at, mask=x_ok, other=0.0)
            if GATED:
                x = silu_mul(x, tl.load(x_at + K, mask=x_ok, other=0.0))
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    out_at = out_ptr + ms[None, :] * stride_om + rows[:, None]
    out_ok = (rows[:, None] < N) & (ms[None, :] < M)
    if SPLIT_K == 1:
        tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        # this split's partial, then the count (release); the last split to count sums all of them
        # (acquire, reading through L2: .cg) and zeroes the count for the next launch
        blocks = tl.num_programs(0) * BLOCK_N
        tl.store(part_ptr + (split * blocks + rows)[:, None] * BLOCK_M + ms[None, :], acc)
        tl.debug_barrier()
        counter = counter_ptr + block
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for sp in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + (sp * blocks + rows)[:, None] * BLOCK_M + ms[None, :],
                                 cache_modifier=".cg")
            tl.store(out_at, total.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


class GemvWorkspace:
    """Split-K partials and per-row-block counts, shared by every GEMV of a model: launches on one
    stream run one after another, and each leaves the counts at zero."""

    @classmethod
    def of(cls, config: GemvConfig, n: int, rows: int, device) -> GemvWorkspace:
        return cls(config.workspace_floats(n, rows), config.blocks(n), device)

    def __init__(self, floats: int, blocks: int, device):
        self.partials = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(blocks, 1), dtype=torch.int32, device=device)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig, workspace: GemvWorkspace | None = None,
         out: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x: [M, K] (M <= 16, unit stride along K), or with `gated` [M, 2K] (gate, then up: the product
    is silu(gate) * up @ weight^T); weight: [N, K] contiguous; out: [M, N], unit stride along N;
    `workspace` is needed when config.split_k > 1 (GemvWorkspace.of)."""
    M = x.shape[0]
    N, K = weight.shape
    assert M <= MAX_ROWS and x.stride(1) == 1 and weight.is_contiguous() and x.shape[1] == K * (1 + gated)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (M, N) and out.stride(1) == 1
    blocks = config.blocks(N)
    if config.split_k > 1:
        assert workspace is not None and workspace.partials.numel() >= config.workspace_floats(N, M) \
            and workspace.counters.numel() >= blocks
        part, counters = workspace.partials, workspace.counters
    else:
        part = counters = out  # unused
    if M:
        _gemv_kernel[(blocks, config.split_k)](
            x, weight, out, part, counters, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=block_rows(M), BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
            EVEN_K=K % (config.block_k * config.split_k) == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GATED=gated, num_warps=config.num_warps,
            num_stages=config.num_stages)
    return out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> torch.Tensor:
    if gated:
        x = silu_and_mul_ref(x)
    return (x.float() @ weight.float().t()).to(x.dtype)
