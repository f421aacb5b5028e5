"""Fused elementwise Triton kernels for the decoder layer, each beside its torch
reference. Unfused, RMSNorm, q/k-norm + rotary and SiLU-and-mul cost about 30
small kernels per layer, which at batch 1 take longer than the layer's matmuls.
Each kernel rounds to the model dtype where the reference (and transformers)
does, so results match the reference bit for bit in float32 and closely in
half precision."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels import dependent_launch, next_power_of_2
from lanner.kernels.attention.store_kv import cache_value
from lanner.kernels.pdl import wait_for_prior


@triton.jit
def add_rounded(x, residual):
    """x + residual in x's dtype, as the reference adds in the model dtype."""
    return (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:  # x + residual becomes the new residual
        x = add_rounded(x, tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0))
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * inv).to(x.dtype).to(tl.float32) * w.to(tl.float32)  # rounded where the reference rounds
    tl.store(out_ptr + row * stride_o + cols, y.to(x.dtype), mask=mask)


def rms_norm_warps(block: int) -> int:
    """Warps for a row of `block` elements: a warp per 256 elements as in Triton's layer-norm tutorial
    (which allows 1 to 8), at least the 4 this kernel always had. With 4 warps a 4096-wide row
    (Qwen3-8B) is 32 elements a thread, and a batch-256 decode step's 256 programs leave the
    multiprocessors mostly idle, waiting on memory."""
    return min(max(block // 256, 4), 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of a 2-D x. With `residual`, computes x + residual first,
    writes that sum into `residual` (in place) and returns (normed, residual)."""
    out = torch.empty_like(x)
    T, N = x.shape
    if T:
        block = next_power_of_2(N)
        _rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, out, x.stride(0),
                               residual.stride(0) if residual is not None else 0, out.stride(0), N, eps,
                               HAS_RES=residual is not None, BLOCK=block, num_warps=rms_norm_warps(block),
                               **dependent_launch())
    return out if residual is None else (out, residual)


@triton.jit
def _qk_norm_rope_kernel(src_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, stride_t, stride_h, num_heads, second_weight_from,
                         eps, v_ptr, stride_vt, k_cache_ptr, v_cache_ptr, slot_ptr, num_kv_heads, k_inv_scale,
                         v_inv_scale, HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr, HALF: tl.constexpr,
                         HEADS: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    # one token's block of HEADS heads: rows are heads, the two halves of a head rotate together
    token = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * HEADS + tl.arange(0, HEADS))[:, None]
    d = tl.arange(0, HALF)[None, :]
    live = rows < num_heads
    base = src_ptr + token * stride_t + rows * stride_h + d
    x1 = tl.load(base, mask=live, other=0.0)
    x2 = tl.load(base + HALF, mask=live, other=0.0)
    dtype = x1.dtype
    if HAS_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)[:, None]
        w = w_ptr + (rows >= second_weight_from).to(tl.int32) * 2 * HALF  # q heads, then k heads
        x1 = ((a * inv).to(dtype).to(tl.float32) * tl.load(w + d, mask=live).to(tl.float32)).to(dtype)
        x2 = ((b * inv).to(dtype).to(tl.float32) * tl.load(w + HALF + d, mask=live).to(tl.float32)).to(dtype)
    c1 = tl.load(cos_ptr + token * 2 * HALF + d).to(tl.float32)
    c2 = tl.load(cos_ptr + token * 2 * HALF + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + token * 2 * HALF + d).to(tl.float32)
    s2 = tl.load(sin_ptr + token * 2 * HALF + HALF + d).to(tl.float32)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # reference: x * cos + rotate_half(x) * sin, each product rounded to the model dtype
    o1 = ((f1 * c1).to(dtype).to(tl.float32) + (-f2 * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((f2 * c2).to(dtype).to(tl.float32) + (f1 * s2).to(dtype).to(tl.float32)).to(dtype)
    dst = out_ptr + (token * num_heads + rows) * 2 * HALF + d
    tl.store(dst, o1, mask=live)
    tl.store(dst + HALF, o2, mask=live)
    if STORE_KV:  # the k heads (after rotary) and the v heads into the paged cache, at the token's slot
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            row = num_kv_heads * 2 * HALF
            is_k = live & (rows >= second_weight_from)
            k_dst = k_cache_ptr + slot * row + (rows - second_weight_from) * 2 * HALF + d
            tl.store(k_dst, cache_value(o1, k_inv_scale, k_cache_ptr), mask=is_k)
            tl.store(k_dst + HALF, cache_value(o2, k_inv_scale, k_cache_ptr), mask=is_k)
            is_v = rows < num_kv_heads
            v_src = v_ptr + token * stride_vt + rows * 2 * HALF + d
            v_dst = v_cache_ptr + slot * row + rows * 2 * HALF + d
            tl.store(v_dst, cache_value(tl.load(v_src, mask=is_v), v_inv_scale, v_cache_ptr), mask=is_v)
            tl.store(v_dst + HALF, cache_value(tl.load(v_src + HALF, mask=is_v), v_inv_scale, v_cache_ptr), mask=is_v)


def norm_rope_heads_per_program(num_heads: int) -> int:
    """Heads one program takes (with 4 warps): a block of 8. One head a program, as before, left most
    threads idle: a 512-token step of Qwen3-0.6B's heads took 9.8 us plus 2.2 us of store_kv, against
    3.2 us now with the store (scripts/norm_rope_probe.py, H200). Fewer heads win by ~0.1 us under 64
    tokens, but a block that changed with the token count would compile a new kernel inside a CUDA
    graph capture at the first small size (captures warm up at the largest)."""
    return min(next_power_of_2(num_heads), 8)


def norm_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor | None = None,
              eps: float = 1e-6, second_weight_from: int | None = None,
              out: torch.Tensor | None = None, kv_store: tuple | None = None) -> torch.Tensor:
    """Per-head RMSNorm (if `weight`) then rotary, on x [T, heads, dim] whose heads may be
    strided views into a fused projection; returns a contiguous [T, heads, dim]. With a
    weight of shape [2, dim], heads from `second_weight_from` on use its second row: q and
    k heads, adjacent in the fused projection, go through one launch.
    `kv_store` = (v, k_cache, v_cache, slot_mapping, (k_scale, v_scale)): the heads from
    `second_weight_from` on are k heads; they (rotated) and v [T, kv_heads, dim] are also written
    into the caches ([blocks, block_size, kv_heads, dim]) at each token's slot (-1: none), as
    store_kv would with those scales (an fp8 cache's; 1.0 otherwise)."""
    T, H, D = x.shape
    assert x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device) if out is None else out
    split = H if second_weight_from is None else second_weight_from
    if kv_store is not None:
        v, k_cache, v_cache, slot_mapping, (k_scale, v_scale) = kv_store
        assert v.stride(1) == D and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
        assert v.shape[1] == H - split == k_cache.shape[2], "k heads and the cache's kv heads differ"
    else:
        v, k_cache, v_cache, slot_mapping, (k_scale, v_scale) = x, x, x, x, (1.0, 1.0)
    if T:
        heads = norm_rope_heads_per_program(H)
        _qk_norm_rope_kernel[(T, triton.cdiv(H, heads))](
            x, out, weight if weight is not None else x, cos, sin, x.stride(0), x.stride(1), H, split, eps,
            v, v.stride(0), k_cache, v_cache, slot_mapping, H - split, 1.0 / k_scale, 1.0 / v_scale,
            HAS_NORM=weight is not None,
            STORE_KV=kv_store is not None, HALF=D // 2, HEADS=heads, num_warps=4, **dependent_launch())
    return out


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up in gate's dtype, rounded where torch's F.silu(gate) * up rounds (the GEMV of a
    down projection applies it as it loads its input: kernels/gemv.py)."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2N] (gate then up) -> silu(gate) * up: [T, N]."""
    T, two_n = x.shape
    N = two_n // 2
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T:
        block = min(1024, next_power_of_2(N))
        _silu_and_mul_kernel[(T, triton.cdiv(N, block))](x, out, x.stride(0), out.stride(0), N, BLOCK=block,
                                                          **dependent_launch())
    return out
