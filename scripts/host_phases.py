"""Host time of each phase of an engine step (issue [12]'s "staging under 100 us" and the 512-token
step's host part): a synchronous N-token prompt step through the whole-forward graph, and batch-1
decode with overlap scheduling, each phase timed with perf_counter around the engine's own calls;
for decode also the decode graph's GPU time a replay (CUDA events), to set against the step's, and
one step's staging repeated back to back, and for the prompt step a fresh prompt's (warm caches:
how much of the in-step figure is the caches the forward evicted).
Usage: python scripts/host_phases.py [--config benchmarks/configs/qwen3-0.6b.json] [--tokens 512]
Prints JSON; CPU runs work too (no graphs: the phases are then eager; `--attention-backend triton`
plans as on a GPU, the kernels in Triton's interpreter: the host phases of the GPU path, measured
on a machine without one)."""
from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

from lanner import LLM
from lanner.core.request import SamplingParams


class Phases:
    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.paused = False  # while set, wrapped calls are not added to the step

    def wrap(self, obj, name: str, label: str) -> None:
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.steps and not self.paused:
                    step = self.steps[-1]
                    step[label] = step.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)

    def step(self, engine) -> None:
        self.steps.append({})
        start = time.perf_counter()
        engine.step()
        self.steps[-1]["step"] = time.perf_counter() - start

    def medians_us(self, skip: int) -> dict[str, float]:
        steps = self.steps[skip:]
        labels = dict.fromkeys(k for s in steps for k in s)
        return {k: round(statistics.median(s.get(k, 0.0) for s in steps) * 1e6, 1) for k in labels}


def instrument(engine) -> Phases:
    phases, runner = Phases(), engine.runner
    phases.wrap(engine.scheduler, "schedule", "schedule")
    phases.wrap(runner, "prepare", "prepare")
    phases.wrap(runner, "_stage", "prepare.stage")
    phases.wrap(runner.backend, "plan", "plan")
    phases.wrap(runner, "run_model", "run_model (plan, launch, LM head)")
    phases.wrap(torch.cuda.CUDAGraph, "replay", "graph launch")  # decode and whole-forward graphs
    phases.wrap(runner, "sample", "sample")
    phases.wrap(engine, "_read_back", "read_back (wait, postprocess)")
    phases.wrap(engine, "_postprocess", "postprocess")
    return phases


def top_functions(profiler: cProfile.Profile, count: int) -> list[str]:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(count)
    return [line for line in text.getvalue().splitlines() if line.strip()][-count - 1:]


def prompt_steps(llm, tokens: int, steps: int, profiler: cProfile.Profile | None = None) -> dict:
    engine = llm.engine
    phases = instrument(engine)
    for s in range(steps + 3):
        if profiler is not None and s == 3:
            profiler.enable()
        g = torch.Generator().manual_seed(s)
        engine.add_request(f"p{s}", torch.randint(0, engine.vocab_size, (tokens,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phases.step(engine)
        engine.abort_request(f"p{s}")
    if profiler is not None:
        profiler.disable()
    report = phases.medians_us(3)
    phases.paused = True  # outside the steps' phases
    report["schedule + prepare + plan of a fresh prompt, back to back (warm caches)"] = warm_prompt_us(engine, tokens)
    return report


def warm_prompt_us(engine, tokens: int, reps: int = 100) -> float:
    """Median host time of scheduling, staging and planning a fresh prompt (as its step plans it:
    for its whole-forward graph when it has one), repeated back to back with nothing run between:
    the prompt step's staging with its code and data in the caches. Each request is aborted before
    it runs, and the prefix cache emptied after (its blocks were offered to it unwritten)."""
    runner, times = engine.runner, []
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(reps):
        ids = torch.randint(0, engine.vocab_size, (tokens,), generator=torch.Generator().manual_seed(10_000 + i))
        engine.add_request(f"w{i}", ids.tolist(), params)
        start = time.perf_counter()
        batch = runner.prepare(engine.scheduler.schedule())[0]
        size = batch.input_ids.shape[0]
        full = runner.piecewise is not None and size in runner.piecewise.full_graphs
        runner.backend.plan(batch, graph_tokens=size if full else None)
        times.append(time.perf_counter() - start)
        engine.abort_request(f"w{i}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert engine.kv_cache.reset_prefix_cache()
    return round(statistics.median(times[reps // 3:]) * 1e6, 1)


def decode_steps(llm, steps: int, profiler: cProfile.Profile | None = None) -> dict:
    engine = llm.engine
    phases = instrument(engine)
    engine.add_request("d", list(range(1, 129)), SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    launched = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, *a, **k: launched.append(sched) or launch(sched, *a, **k)
    warm = None
    while engine.has_unfinished_requests():
        if profiler is not None and len(phases.steps) == 8:
            profiler.enable()
        phases.step(engine)
        if len(phases.steps) == 20:  # outside the step's phases and the profile
            phases.paused = True
            if profiler is not None:
                profiler.disable()
            warm = warm_staging_us(engine.runner, launched[-1])
            if profiler is not None:
                profiler.enable()
            phases.paused = False
    if profiler is not None:
        profiler.disable()
    report = phases.medians_us(8)
    report["prepare + plan repeated on one step, back to back (warm caches)"] = warm
    graphs = engine.runner.graphs
    if graphs is not None and torch.cuda.is_available():
        graph, _ = graphs.graphs[graphs.padded_size(1)]
        for _ in range(5):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            graph.replay()
        end.record()
        end.synchronize()
        report["decode graph GPU time a replay"] = round(start.elapsed_time(end) * 10, 1)
    return report


def warm_staging_us(runner, sched, reps: int = 300) -> float:
    """Median host time of staging one decode step (prepare, then the plan a decode graph's replay
    makes) repeated back to back: what staging costs with its code and data in the caches, against
    the in-step figure, where the forward before it has evicted them. The schedule is the last
    step's (the request has moved on one position since: the staging is the same work); the repeats
    rewrite the static inputs the next real step stages again. Steps that advance on the device
    skip staging: the in-step `prepare` is theirs, and `plan` is absent from them."""
    size = runner.graphs.padded_size(len(sched.scheduled)) if runner.graphs is not None else None
    times = []
    for _ in range(reps):
        # staged from the host every time: a step advanced on the device (executor/advance.py) is
        # not repeatable, and the next real step must not advance from the repeats' inputs
        runner.decode_run = None
        start = time.perf_counter()
        batch = runner.prepare(sched)[0]
        runner.backend.plan(batch, num_padded_seqs=size)
        times.append(time.perf_counter() - start)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(statistics.median(times[reps // 3:]) * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="a model config (dummy weights); the embedded model if omitted")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", type=int, default=0, help="also list this many functions by own time (cProfile)")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    args = ap.parse_args()
    kw = {"model": args.config, "load_format": "dummy"} if args.config else {}
    kw["attention_backend"] = args.attention_backend
    if torch.cuda.is_available():
        kw |= {"dtype": "bfloat16", "gpu_memory_utilization": 0.4}
    sync = LLM(overlap_scheduling=False, **kw)
    profilers = [cProfile.Profile() for _ in range(2)] if args.profile else [None, None]
    report = {"prompt step, us": prompt_steps(sync, args.tokens, args.steps, profilers[0])}
    print(json.dumps(report), flush=True)
    del sync
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report["batch-1 decode step (overlap), us"] = decode_steps(LLM(**kw), 128, profilers[1])
    if args.profile:
        report["prompt step, top functions"] = top_functions(profilers[0], args.profile)
        report["decode step, top functions"] = top_functions(profilers[1], args.profile)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"command": "python " + " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__,
                      "config": args.config, "tokens": args.tokens,
                      "attention_backend": args.attention_backend, **report}, indent=1))


if __name__ == "__main__":
    main()
