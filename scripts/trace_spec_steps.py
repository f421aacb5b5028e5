"""The GPU timeline of speculative steps at a small batch on a model shape with dummy weights, in
replay mode (issue [8], 7b): where the device idles between kernels, and which kernels run
between the target's verify graph and the draft's graphs. Writes a chrome trace and a text
summary (GPU busy time, the gaps, one step's kernel sequence) for the run with and without
speculation. Usage: python scripts/trace_spec_steps.py [--batch 1] [--k 4] [--p 0.76] [--out DIR]"""
from __future__ import annotations

import argparse
import os
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lanner import LLM
from lanner.bench.speculative import release, replay_drafts
from lanner.core.request import SamplingParams
from lanner.executor import step_handle
from lanner.executor.graphs import SizeLadder

HOST = defaultdict(float)  # host seconds per part, without the profiler
CALLS = defaultdict(int)


def timed(owner, name: str, key=None) -> None:
    """Wrap owner.name to add its host seconds to HOST (per class when `key` is None)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            part = key or f"{type(args[0]).__name__}.{name}"
            HOST[part] += time.perf_counter() - start
            CALLS[part] += 1
    setattr(owner, name, wrapper)


def time_host(llm) -> None:
    engine, runner = llm.engine, llm.engine.runner
    for owner, name in [(engine, "step"), (engine.scheduler, "schedule"), (runner, "prepare"), (runner, "run_model"),
                        (runner, "sampler"), (runner, "launch")] + (
            [(runner.drafter, "stage"), (runner.drafter, "propose")] if runner.drafter else []):
        timed(owner, name, f"{type(owner).__name__}.{name}")


def kernels(prof) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every device activity, in start order."""
    out = [(e.time_range.start, e.time_range.end - e.time_range.start, e.name) for e in prof.events()
           if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(out)


def summary(name: str, events: list, steps: int) -> list[str]:
    first, last = events[0][0], max(s + d for s, d, _ in events)
    busy = sum(d for _, d, _ in events)
    gaps = [(events[i + 1][0] - (events[i][0] + events[i][1]), events[i][2], events[i + 1][2])
            for i in range(len(events) - 1)]
    lines = [f"== {name}: {len(events)} kernels, window {(last - first) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, "
             f"idle {(last - first - busy) / 1e3:.2f} ms over {steps} steps"]
    big = sorted((g for g in gaps if g[0] > 5), reverse=True)[:25]
    lines += [f"  gap {g:8.1f} us after {a[:60]} before {b[:60]}" for g, a, b in big]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.76)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--config", default="benchmarks/configs/qwen3-8b.json")
    ap.add_argument("--head-config", default="benchmarks/configs/qwen3-8b-eagle3.json")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    prompts = [list(range(100 + i, 228 + i)) for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    lines, recorded = [], None
    timed(SizeLadder, "replay_graph")
    timed(step_handle.StepHandle, "result")
    for spec in (None, {"method": "eagle3", "num_speculative_tokens": args.k, "model": args.head_config}):
        llm = LLM(model=args.config, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.85,
                  max_num_seqs=max(8, args.batch), max_model_len=2048, speculative_config=spec)
        llm.engine.runner.model.model.embed_tokens.weight.mul_(10000.0)  # as the bench: stable greedy runs
        if recorded is not None:
            rng = random.Random(7)
            keep = {k: [rng.random() < args.p for _ in range(args.output_len + args.k)] for k in recorded}
            replay_drafts(llm, recorded, keep, True)
        run = [{"prompt_token_ids": p} for p in prompts]
        outs = llm.generate(run, params, use_tqdm=False)
        llm.reset_prefix_cache()
        time_host(llm)
        HOST.clear()
        CALLS.clear()
        llm.engine.runner.step_times = times = step_handle.StepTimes(each=[])
        start = time.perf_counter()
        outs = llm.generate(run, params, use_tqdm=False)
        lines.append(f"{'eagle3' if spec else 'plain'}: {(time.perf_counter() - start) * 1e3:.1f} ms wall, "
                     f"{times.steps} steps, GPU ms/step target {times.target_ms / times.steps:.3f} "
                     f"draft {times.draft_ms / times.steps:.3f}; each (target, draft): {times.each}")
        llm.engine.runner.step_times = None
        lines.append(f"{'eagle3' if spec else 'plain'} host ms (calls): " + ", ".join(
            f"{k} {v * 1e3:.1f} ({CALLS[k]})" for k, v in sorted(HOST.items())))
        llm.reset_prefix_cache()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            outs = llm.generate(run, params, use_tqdm=False)
            torch.cuda.synchronize()
        name = "eagle3" if spec else "plain"
        prof.export_chrome_trace(os.path.join(args.out, f"trace-{name}-b{args.batch}.json"))
        steps = sum(1 for e in prof.events() if e.name == "model")
        lines += summary(name, kernels(prof), steps)
        if recorded is None:
            recorded = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, outs)}
        print("\n".join(lines), flush=True)
        release(llm)
    with open(os.path.join(args.out, f"trace-spec-b{args.batch}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
