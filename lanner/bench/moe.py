"""`lanner bench moe`: fused_moe (both layouts) against the torch reference and against the
hardware's bounds, per token count, on random weights of an expert shape and random routing.
No engine is built. On the GPU the fused layouts are timed as CUDA graph replays (how decode runs
them; eager launches are reported too), the reference eagerly (its host syncs keep it out of
graphs). On the CPU it runs under TRITON_INTERPRET=1, slowly: tiny shapes only (a smoke test).

Per token count: ms of each; GB touched (the weights of the distinct experts hit, x read and out
written); the bandwidth bound (those bytes over the measured copy bandwidth) and the compute bound
(the GEMMs' FLOPs over the measured dense matmul rate); the fraction of the larger bound reached;
the speedup over the reference and the largest difference from it.
"""
from __future__ import annotations

import argparse
import functools

import torch

from lanner.bench import common


def device_ceilings(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting bytes read and written; dense matmul FLOP/s in dtype)."""
    big = device.type == "cuda"
    src = torch.empty((2**30 if big else 2**24) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (common.time_ms(lambda: dst.copy_(src), 20 if big else 3) / 1e3)
    n = 8192 if big else 256
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3 / (common.time_ms(lambda: a @ b, 10 if big else 3) / 1e3)
    return bandwidth, flops


def random_routing(tokens: int, experts: int, top_k: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token picks top_k distinct experts at random; weights renormalized over its picks."""
    scores = torch.rand(tokens, experts, generator=generator, device=device).softmax(-1)
    weights, ids = scores.topk(top_k, dim=-1)
    return ids.to(torch.int32), (weights / weights.sum(-1, keepdim=True)).float()


def main(args: argparse.Namespace) -> None:
    from lanner.kernels.moe.fused import fused_moe
    from lanner.kernels.moe.reference import moe_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    E, K, H, I = args.experts, args.top_k, args.hidden, args.intermediate
    g = torch.Generator(device).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=device) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=device) / I ** 0.5).to(dtype)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    bandwidth, flop_rate = device_ceilings(device, dtype)
    rows = []
    for T in args.token_counts:
        x = torch.randn(T, H, generator=g, device=device).to(dtype)
        ids, weights = random_routing(T, E, K, device, g)
        experts_hit = torch.unique(ids).numel()
        touched = experts_hit * expert_bytes + 2 * x.numel() * x.element_size()
        bound_ms = max(touched / bandwidth, 2 * T * K * 3 * H * I / flop_rate) * 1e3
        row = {"tokens": T, "experts_hit": experts_hit, "gb_touched": round(touched / 1e9, 4),
               "bandwidth_bound_ms": round(touched / bandwidth * 1e3, 4), "bound_ms": round(bound_ms, 4)}
        ref = None
        if T <= args.reference_max_tokens:
            ref = moe_reference(x, w13, w2, ids, weights)
            row["reference_ms"] = round(common.time_ms(functools.partial(moe_reference, x, w13, w2, ids, weights),
                                                args.repeats), 4)
        for layout in ("contiguous", "masked"):
            run = functools.partial(fused_moe, x, w13, w2, ids, weights, layout)
            ms = common.time_ms(run, args.repeats, graph=device.type == "cuda")
            row[f"{layout}_ms"] = round(ms, 4)
            if device.type == "cuda":
                row[f"{layout}_eager_ms"] = round(common.time_ms(run, args.repeats), 4)
            row[f"{layout}_fraction_of_bound"] = round(bound_ms / ms, 3)
            if ref is not None:
                row[f"{layout}_speedup"] = round(row["reference_ms"] / ms, 2)
                row[f"{layout}_max_abs_diff"] = (run().float() - ref.float()).abs().max().item() if T else 0.0
        rows.append(row)
        print(row, flush=True)
    shape = {"experts": E, "top_k": K, "hidden": H, "intermediate": I, "dtype": dtype_name}
    workload = {"token_counts": args.token_counts, "routing": "random: top-k of uniform scores, seed 0",
                "repeats": args.repeats, "bytes": "distinct experts' w13 + w2, x read, out written",
                "fused_timing": "CUDA graph replays (and eager)" if device.type == "cuda" else "Triton interpreter",
                "reference": f"moe_reference (torch, a loop over experts), eager, skipped above "
                             f"{args.reference_max_tokens} tokens (too slow)"}
    results = {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "matmul_tflop_s": round(flop_rate / 1e12, 1),
               "runs": rows}
    common.emit(common.record("moe", shape, workload, results), args.output_json)


def add_parser(kinds) -> None:
    p = kinds.add_parser("moe", help="fused MoE kernels vs the torch reference and the bandwidth bound")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on the GPU, float32 on the CPU (the Triton interpreter's bf16 dot is wrong)")
    p.add_argument("--token-counts", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--reference-max-tokens", type=int, default=4096,
                   help="skip the torch reference above this many tokens (a Python loop over experts: slow)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output-json", default=None)
