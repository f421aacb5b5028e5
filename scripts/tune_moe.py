"""Tune fused_moe's tile configs on this GPU and write the tables lanner/kernels/moe/configs.py reads:
lanner/kernels/moe/configs/<GPU name>/E=<E>,H=<H>,I=<I>,<layout>.json, {"<token count>": config}.

    python scripts/tune_moe.py                    # Qwen3-30B-A3B experts (E=128, K=8, H=2048, I=768), bf16
    python scripts/tune_moe.py --layouts masked --token-counts 1 2 4 8 16 32 64

(lanner importable: installed, or PYTHONPATH=. from the repository root.)

Per layout and token count, on random routing, each config is timed as CUDA graph replays of the
whole fused_moe call (layout, both GEMMs, combine: what a step runs). The search is in two rounds
to stay within minutes: tile shapes at 4 warps and 3 stages, then warps and stages for the three
fastest shapes. Tables are keyed by shape, not dtype: tune in the dtype the models run (bf16).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.runtime.errors import OutOfResources, PTXASError

from lanner.bench.common import time_ms
from lanner.bench.moe import random_routing
from lanner.kernels.moe.configs import LAYOUTS, table_path
from lanner.kernels.moe.fused import fused_moe

SHARED_MEMORY = 220 * 1024  # H100/H200: 227 KB per block, less a margin


def tile_shapes(tokens: int, top_k: int, experts: int) -> list[dict]:
    """Round one: row blocks no taller than twice the mean tokens per expert (taller ones only pad)."""
    per_expert = tokens * top_k / experts
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * per_expert)]
    return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8 if m >= 64 else 1, "num_warps": 4, "num_stages": 3}
            for m, n, k in itertools.product(block_ms, (32, 64, 128), (64, 128))]


def schedules(shape: dict, elem_bytes: int) -> list[dict]:
    """Round two: warps and pipeline depth for one tile shape, where the stages fit in shared memory
    (the gate/up GEMM holds an A tile and two weight tiles per stage)."""
    stage_bytes = (shape["BLOCK_M"] + 2 * shape["BLOCK_N"]) * shape["BLOCK_K"] * elem_bytes
    return [{**shape, "num_warps": w, "num_stages": s} for w, s in itertools.product((4, 8), (2, 3, 4, 5))
            if s * stage_bytes <= SHARED_MEMORY and (w == 4 or shape["BLOCK_M"] * shape["BLOCK_N"] >= 64 * 64)]


def measure(config: dict, inputs: tuple, layout: str, repeats: int) -> float:
    try:
        return time_ms(lambda: fused_moe(*inputs, layout, config), repeats, graph=True)
    except (OutOfResources, PTXASError) as e:  # the compiler refuses it (shared memory, registers)
        print(f"  skipped {config}: {type(e).__name__}", flush=True)
        return float("inf")


def tune(layout: str, tokens: int, args, w13: torch.Tensor, w2: torch.Tensor, g: torch.Generator) -> tuple[dict, float]:
    x = torch.randn(tokens, args.hidden, generator=g, device="cuda").to(w13.dtype)
    inputs = (x, w13, w2, *random_routing(tokens, args.experts, args.top_k, "cuda", g))
    timed = sorted(((measure(c, inputs, layout, args.repeats), i, c)
                    for i, c in enumerate(tile_shapes(tokens, args.top_k, args.experts))), key=lambda r: r[:2])
    finalists = [c for _, _, shape in timed[:3] for c in schedules(shape, w13.element_size())]
    best_ms, _, best = min((measure(c, inputs, layout, args.repeats), i, c) for i, c in enumerate(finalists))
    return best, best_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--token-counts", type=int, nargs="+",
                   default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output-root", default=None, help="write the tables under this folder instead of the package's")
    args = p.parse_args()

    E, H, I = args.experts, args.hidden, args.intermediate
    g = torch.Generator("cuda").manual_seed(0)
    dtype = getattr(torch, args.dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device="cuda") / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device="cuda") / I ** 0.5).to(dtype)
    device_name = torch.cuda.get_device_name()
    root = {"root": args.output_root} if args.output_root else {}
    for layout in args.layouts:
        path = table_path(E, H, I, layout, device_name, **root)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {}
        for tokens in args.token_counts:
            best, ms = tune(layout, tokens, args, w13, w2, g)
            table[str(tokens)] = best
            path.write_text(json.dumps(table, indent=1) + "\n")  # after each count: a cut-off run keeps its results
            print(f"{layout} T={tokens}: {ms * 1e3:.1f} us {best}", flush=True)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
