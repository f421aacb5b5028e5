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
then needs no activation kernel before it, one graph node fewer a layer. NORM: x is an RMSNorm's
input h (HAS_RES: x + residual is, rounded as the add + RMSNorm kernel rounds), and the GEMV
multiplies the norm's output (`Norm`): as RMSNorm(h) @ w^T = (h * weight) @ w^T / RMS(h), it streams
the weights against h * weight while it sums h's squares, and scales by 1/RMS at the end (a split-K
program reads the other splits' columns of h for that once its weights are done). The first row
block's programs write h to the norm's `added`, a tensor of its own: the next layer's residual.
Writing it in place would have to wait until every program had read the old one (a count, atomics
from every program), which cost more than the norm kernel it replaces. So the projections after a
decoder layer's norms need no norm kernel, and the kernel no extra pass: only the sum of squares
runs in another order than the norm kernel's (outputs close, not bit for bit; h exact).

Which configuration (or cuBLAS) runs each (N, K, M) is measured on the GPU at hand:
lanner/executor/gemv_table.py. The torch reference is `x @ w.t()` (`gemv_reference`)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lanner.kernels import dependent_launch
from lanner.kernels.fused import add_rounded, silu_mul
from lanner.kernels.fused_reference import Norm, rms_norm_ref, silu_and_mul_ref
from lanner.kernels.pdl import wait_for_prior

MAX_ROWS = 16  # rows (M) one launch takes: the dot pads x to 16


def block_rows(rows: int) -> int:
    return 1 if rows == 1 else MAX_ROWS


def takes_norm(dtype: torch.dtype, rows: int) -> bool:
    """Whether the GEMV may apply an RMSNorm to its input: with several rows the tensor cores take
    h * weight in the model dtype before 1/RMS scales it, which float16's range may not hold (a
    residual channel of 2,000 times a norm weight of 40); one row multiplies in float32."""
    return rows == 1 or dtype != torch.float16


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
def _inv_rms(x_ptr, res_ptr, stride_xm, stride_rm, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
             HAS_RES: tl.constexpr):
    """[BLOCK_M] float32: 1 / RMS of each row of x (plus the residual, rounded as the add + RMSNorm
    kernel rounds) over all K columns: a split-K program's own columns are only part of them."""
    ms = tl.arange(0, BLOCK_M)[:, None]
    ks = tl.arange(0, BLOCK_K)[None, :]
    squares = tl.zeros([BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        ok = (ms < M) & (k + ks < K)
        h = tl.load(x_ptr + ms * stride_xm + k + ks, mask=ok, other=0.0)
        if HAS_RES:
            h = add_rounded(h, tl.load(res_ptr + ms * stride_rm + k + ks, mask=ok, other=0.0))
        hf = h.to(tl.float32)
        squares += tl.sum(hf * hf, 1)
    return tl.rsqrt(squares / K + eps)


@triton.jit
def _load(at, ok, WHOLE: tl.constexpr):
    """tl.load with zeros where `ok` is false; WHOLE: every element (whole tiles, `ok` unused)."""
    if WHOLE:
        return tl.load(at)
    return tl.load(at, mask=ok, other=0.0)


@triton.jit
def _input(x_at, ok, res_at, norm_w_at, w_ok, K, X_WHOLE: tl.constexpr, W_WHOLE: tl.constexpr,
           GATED: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr):
    """(what the GEMV multiplies, the norm's input) at x_at: x, silu(gate) * up (GATED: up is K
    further on), or (NORM) the norm's input h, x + the residual at res_at with HAS_RES, times the
    norm's weight at norm_w_at in float32 (before 1/RMS it may not fit float16: `takes_norm`), which
    the kernel scales by 1/RMS once summed. X_WHOLE, W_WHOLE: x's (and the residual's), the norm
    weight's loads need no mask."""
    x = _load(x_at, ok, X_WHOLE)
    if GATED:
        x = silu_mul(x, _load(x_at + K, ok, X_WHOLE))
    h = x
    if NORM:
        if HAS_RES:
            h = add_rounded(x, _load(res_at, ok, X_WHOLE))
        x = h.to(tl.float32) * _load(norm_w_at, w_ok, W_WHOLE).to(tl.float32)
    return x, h


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, counter_ptr, res_ptr, norm_w_ptr, added_ptr, eps, M, N, K,
                 stride_xm, stride_rm, stride_am, stride_wn, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                 GATED: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
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
    writes_added = block == 0  # with HAS_RES the first row block's programs write x + residual (their columns)
    if BLOCK_M == 1:
        wide = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k in range(start, end, BLOCK_K):
            ok = k + ks < end
            w = _load(w_rows + (k + ks)[None, :], ok[None, :], EVEN_K)
            x, h = _input(x_ptr + k + ks, ok, res_ptr + k + ks, norm_w_ptr + k + ks, ok, K, EVEN_K, EVEN_K, GATED,
                          NORM, HAS_RES)
            wide += w.to(tl.float32) * x.to(tl.float32)[None, :]
            if NORM:
                squares += h.to(tl.float32) * h.to(tl.float32)
                if HAS_RES and writes_added:
                    tl.store(added_ptr + k + ks, h, mask=ok)
        acc = tl.sum(wide, 1)[:, None]
        squares = tl.sum(squares, 0)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k in range(start, end, BLOCK_K):
            k_ok = (k + ks)[None, :] < end
            w = _load(w_rows + (k + ks)[None, :], k_ok, EVEN_K)
            x_ok = ms[:, None] < M
            if not EVEN_K:
                x_ok = x_ok & k_ok
            x, h = _input(x_ptr + ms[:, None] * stride_xm + (k + ks)[None, :], x_ok,
                          res_ptr + ms[:, None] * stride_rm + (k + ks)[None, :], norm_w_ptr + (k + ks)[None, :], k_ok,
                          K, False, EVEN_K, GATED, NORM, HAS_RES)
            acc = tl.dot(w, tl.trans(x.to(w.dtype)), acc, input_precision=PRECISION)
            if NORM:
                squares += tl.sum(h.to(tl.float32) * h.to(tl.float32), 1)
                if HAS_RES and writes_added:
                    tl.store(added_ptr + ms[:, None] * stride_am + (k + ks)[None, :], h, mask=x_ok)
    if NORM:
        # RMSNorm(h) @ w^T = (h * weight) @ w^T / RMS(h): the weights streamed before the sum was known.
        # One split has every column's square; a split-K program reads the rows' other columns after.
        if SPLIT_K == 1:
            inv = tl.rsqrt(squares / K + eps)
        else:
            inv = _inv_rms(x_ptr, res_ptr, stride_xm, stride_rm, M, K, eps, BLOCK_M, BLOCK_K, HAS_RES)
            if BLOCK_M == 1:
                inv = tl.sum(inv, 0)
        acc = acc * (inv if BLOCK_M == 1 else inv[None, :])
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
    """Split-K partials and per-row-block counts: shared by every GEMV of a model (launches on one
    stream run one after another, and each leaves its counts at zero)."""

    @classmethod
    def of(cls, config: GemvConfig, n: int, rows: int, device) -> GemvWorkspace:
        return cls(config.workspace_floats(n, rows), config.blocks(n), device)

    def __init__(self, floats: int, blocks: int, device):
        self.partials = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(blocks, 1), dtype=torch.int32, device=device)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig, workspace: GemvWorkspace | None = None,
         out: torch.Tensor | None = None, gated: bool = False, norm: Norm | None = None) -> torch.Tensor:
    """x: [M, K] (M <= 16, unit stride along K), or with `gated` [M, 2K] (gate, then up: the product
    is silu(gate) * up @ weight^T); `norm`: the product is rms_norm(x, ...) @ weight^T (see Norm:
    with a residual, x + residual goes to its `added`); weight: [N, K] contiguous; out: [M, N], unit
    stride along N;
    `workspace` is needed when config.split_k > 1 (GemvWorkspace.of)."""
    M = x.shape[0]
    N, K = weight.shape
    assert M <= MAX_ROWS and x.stride(1) == 1 and weight.is_contiguous() and x.shape[1] == K * (1 + gated)
    assert not (gated and norm)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (M, N) and out.stride(1) == 1
    blocks = config.blocks(N)
    if config.split_k > 1:
        assert workspace is not None and workspace.partials.numel() >= config.workspace_floats(N, M) \
            and workspace.counters.numel() >= blocks
        part, counters = workspace.partials, workspace.counters
    else:
        part = counters = out  # unused
    assert norm is None or takes_norm(x.dtype, M)
    residual = None if norm is None else norm.residual
    if residual is not None:
        added = norm.added  # written while others read x and the residual: a tensor of its own
        assert added is not None and added.data_ptr() not in (x.data_ptr(), residual.data_ptr())
        assert residual.shape == added.shape == x.shape and residual.stride(1) == added.stride(1) == 1
    if M:
        _gemv_kernel[(blocks, config.split_k)](
            x, weight, out, part, counters, x if residual is None else residual,
            weight if norm is None else norm.weight, x if residual is None else added,
            0.0 if norm is None else norm.eps, M, N, K, x.stride(0), 0 if residual is None else residual.stride(0),
            0 if residual is None else added.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=block_rows(M), BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
            EVEN_K=K % (config.block_k * config.split_k) == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GATED=gated, NORM=norm is not None,
            HAS_RES=residual is not None, num_warps=config.num_warps, num_stages=config.num_stages,
            **dependent_launch())
    return out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, gated: bool = False, norm: Norm | None = None) -> torch.Tensor:
    """With `norm` and its residual, x + residual is written to its `added`, as the kernel writes it."""
    if gated:
        x = silu_and_mul_ref(x)
    if norm is not None:
        x = rms_norm_ref(x, norm.weight, norm.eps, norm.residual)
        if norm.residual is not None:
            x, added = x
            norm.added.copy_(added)
    return (x.float() @ weight.float().t()).to(x.dtype)
