"""Where the time of one synchronous prompt step goes (issue [12]'s "512-token prefill step"):
host time from the step's start to its graph launch, inside the launch calls, and after the GPU
finishes, against the GPU's kernel time, for the whole-forward graph and for the pieces.
Usage: python scripts/prefill_step_profile.py [--config benchmarks/configs/qwen3-0.6b.json] [--tokens 512]"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lanner import LLM
from lanner.bench.breakdown import kernel_times
from lanner.layers.attention import forward_context
from lanner.core.request import SamplingParams


def one_step(engine, tokens: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    engine.add_request(f"p{seed}", torch.randint(0, engine.vocab_size, (tokens,), generator=g).tolist(),
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_gpu_ms(engine, tokens: int, mode: str) -> float:
    """GPU time (CUDA events, no profiler) of the model forward alone, replayed on the last step's
    plan: the whole-forward graph, or the pieces with attention launched between them."""
    runner = engine.runner
    pw = runner.piecewise
    size = pw.padded_size(tokens)
    if mode == "whole":
        forward = pw.full_graphs[size].replay
    else:
        graphs = pw.graphs[size]

        def forward():
            with forward_context(runner.backend):
                runner.model.forward_pieces(runner.input_ids[:size], runner.positions[:size], pw.bufs.rows(size),
                                            lambda j: graphs[j].replay())
    for _ in range(3):
        forward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        forward()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="benchmarks/configs/qwen3-0.6b.json")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    llm = LLM(model=args.config, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.5,
              overlap_scheduling=False, max_num_batched_tokens=2048)
    engine, pw = llm.engine, llm.engine.runner.piecewise
    whole = pw.full_graphs
    report = {}
    for mode, full in (("whole", whole), ("pieces", {})):
        pw.full_graphs = full
        for s in range(3):
            one_step(engine, args.tokens, 1000 + s)
        wall = sorted(one_step(engine, args.tokens, 2000 + s) for s in range(args.steps))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(args.steps):
                one_step(engine, args.tokens, 3000 + s)
        rows = {}
        for e in prof.key_averages():
            rows[e.key] = (e.count, e.cpu_time_total / args.steps / 1e3, e.device_time_total / args.steps / 1e3)
        kernels = kernel_times(prof, per=args.steps)
        top_cpu = sorted(((k, round(v[1], 3), v[0] // args.steps) for k, v in rows.items()), key=lambda r: -r[1])[:12]
        report[mode] = {"wall_ms_median": round(wall[len(wall) // 2] * 1e3, 3), "wall_ms_min": round(wall[0] * 1e3, 3),
                        "gpu_ms_per_step": round(sum(kernels["kernels_ms"].values()), 3), **kernels,
                        "cpu_ms_per_step_top (name, ms, calls)": top_cpu}
        report[mode]["forward_gpu_ms_events"] = round(forward_gpu_ms(engine, args.tokens, mode), 3)
        print(mode, json.dumps(report[mode], indent=1), flush=True)
    pw.full_graphs = whole
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill-step-profile.json"), "w") as f:
        json.dump({"config": args.config, "tokens": args.tokens, "report": report}, f, indent=1)


if __name__ == "__main__":
    main()
