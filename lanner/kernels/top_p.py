"""Top-p thresholds without a sort: a bisection over float32 bit patterns, 32 pivots a pass
(top_p_reference.py has the method and the torch reference). A row is split into CHUNK-sized
pieces, a program each, so a batch of one row still spreads over the GPU; each launch is one pass.
A pass's programs first narrow their row's interval from the partial sums the pass before wrote
(each program of a row does the same arithmetic on the same sums, so they agree), then sum their
piece at the new pivots. Nothing is read back to the host.

After the first passes the interval searched is narrow and most blocks of a piece hold no element
inside it: such a block's elements are either below every pivot (they add nothing) or at or above
the interval's top (they add to every pivot's sum alike), so the block adds its elements at or
above the top to one running sum and skips the pivot-wide comparison (SKIP: a branch on the block's
maximum of "inside")."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels import next_power_of_2

PIVOTS = 32  # a pass narrows the interval 33 times: six passes cover the 2**30 patterns in [0, 1]
PASSES = 6
PATTERNS = 0x3F800001  # float32 bit patterns in [0, 1] (1.0's bits + 1): passes must narrow them to one
_PATTERNS = tl.constexpr(PATTERNS)  # the same, as the kernels read a global
CHUNK = 4096  # a program's piece of a row: the split count follows the vocabulary, never the batch


@triton.jit
def _pivots(lo, hi, NP: tl.constexpr):
    steps = tl.arange(0, NP).to(tl.int64) + 1
    return (lo + ((hi - lo).to(tl.int64) * steps) // (NP + 1)).to(tl.int32)


@triton.jit
def _at_or_above(p, pivots):
    """[NP, BLOCK]: each element where it is at or above each pivot, else 0."""
    return tl.where(p[None, :] >= pivots[:, None], p[None, :], 0.0)


@triton.jit
def _narrowed(lo, hi, mass, top_p, NP: tl.constexpr):
    """The sub-interval of [lo, hi) where S crosses top_p, from S at the pivots of [lo, hi)."""
    pivots = _pivots(lo, hi, NP)
    new_lo = tl.maximum(lo, tl.max(tl.where(mass >= top_p, pivots, lo), 0))
    new_hi = tl.minimum(hi, tl.min(tl.where(mass < top_p, pivots, hi), 0))
    return new_lo, new_hi


# B (the batch) unspecialized: one compilation serves every batch size, instead of one for 1, one for
# multiples of 16 and one for the rest, each compiled at a sampled step while every request waits
@triton.jit(do_not_specialize=["B"])
def _top_p_pass(probs_ptr, stride, top_p_ptr, bounds_ptr, sums_ptr, out_ptr, B, V, num_splits,
                PASS: tl.constexpr, FINAL: tl.constexpr, NP: tl.constexpr, SPLITS: tl.constexpr,
                CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr, SKIP: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    top_p = tl.load(top_p_ptr + row)
    if PASS == 0:
        lo = tl.zeros([], tl.int32)
        hi = tl.full([], _PATTERNS, tl.int32)  # S(hi) = 0: no probability exceeds 1
    else:
        before = (PASS - 1) % 2  # bounds and sums alternate between two halves: one pass reads, the next writes
        lo = tl.load(bounds_ptr + (before * B + row) * 2)
        hi = tl.load(bounds_ptr + (before * B + row) * 2 + 1)
        splits = tl.arange(0, SPLITS)
        pivot = tl.arange(0, NP)
        sums = tl.load(sums_ptr + ((before * B + row) * num_splits + splits[:, None]) * NP + pivot[None, :],
                       mask=splits[:, None] < num_splits, other=0.0)
        lo, hi = _narrowed(lo, hi, tl.sum(sums, 0), top_p, NP)
    if FINAL:
        tl.store(out_ptr + row, lo.to(tl.float32, bitcast=True))
    else:
        now = PASS % 2
        if split == 0:
            tl.store(bounds_ptr + (now * B + row) * 2, lo)
            tl.store(bounds_ptr + (now * B + row) * 2 + 1, hi)
        pivots = _pivots(lo, hi, NP).to(tl.float32, bitcast=True)
        lo_f, hi_f = lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)
        acc = tl.zeros([NP, BLOCK], tl.float32)  # reduced once, after the loop
        above = tl.zeros([BLOCK], tl.float32)  # skipped blocks' elements at or above the interval: every pivot's
        for start in range(0, CHUNK_SIZE, BLOCK):
            cols = split * CHUNK_SIZE + start + tl.arange(0, BLOCK)
            p = tl.load(probs_ptr + row.to(tl.int64) * stride + cols, mask=cols < V, other=0.0)
            if SKIP and PASS > 0:  # pass 0 searches all of [0, 1]: every element is inside
                inside = (p >= lo_f) & (p < hi_f)
                if tl.max(inside.to(tl.int32), 0) > 0:
                    acc += _at_or_above(p, pivots)
                else:
                    above += tl.where(p >= hi_f, p, 0.0)
            else:
                acc += _at_or_above(p, pivots)
        tl.store(sums_ptr + ((now * B + row) * num_splits + split) * NP + tl.arange(0, NP),
                 tl.sum(acc, 1) + tl.sum(above, 0))


def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor, pivots: int = PIVOTS, passes: int = PASSES,
                    skip: bool = True) -> torch.Tensor:
    """probs [B, V] float32 (rows sum to 1), top_p [B] float32 in (0, 1] -> [B] float32: the
    smallest probability of each row's nucleus, keeping what top_p_threshold_ref's keeps (0 where
    the row's float32 sum never reaches top_p; the reference gives the row's least probability).
    `pivots` a pass (a power of 2, 2 to 64), `passes` and `skip` are the search's shape
    (scripts/top_p_probe.py times the choices). They change the order of the float32 sums, so a row
    whose nucleus mass is within rounding of top_p may get a neighbouring threshold under another."""
    if probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError("top_p_threshold takes float32 probabilities with contiguous rows")
    if not 2 <= pivots <= 64 or pivots & (pivots - 1):
        raise ValueError(f"pivots must be a power of 2 from 2 to 64, not {pivots}")
    if (pivots + 1) ** passes < PATTERNS:
        raise ValueError(f"{passes} passes of {pivots} pivots do not narrow 2**30 bit patterns to one")
    # a top_p that rounded to 0 in float32 would keep nothing: the least positive float keeps the top token
    top_p = top_p.clamp(min=torch.finfo(torch.float32).tiny).contiguous()
    B, V = probs.shape
    out = torch.empty(B, dtype=torch.float32, device=probs.device)
    if B == 0:
        return out
    num_splits = -(-V // CHUNK)
    bounds = torch.empty(2, B, 2, dtype=torch.int32, device=probs.device)
    sums = torch.empty(2, B, num_splits, pivots, dtype=torch.float32, device=probs.device)
    for step in range(passes + 1):
        final = step == passes
        _top_p_pass[(B, 1 if final else num_splits)](
            probs, probs.stride(0), top_p, bounds, sums, out, B, V, num_splits, PASS=step, FINAL=final,
            NP=pivots, SPLITS=next_power_of_2(num_splits), CHUNK_SIZE=CHUNK, BLOCK=256, SKIP=skip)
    return out
