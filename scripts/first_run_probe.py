# W-8B (or WORKLOAD) run several times in one engine, new prompts each run (SEEDS, default "0 1 2"): is the
# first timed run slower than the next (issue [12]: the throughput bench times one run after a 16-token
# warm-up)? Per run: wall, tok/s, prompt- and decode-step wall and GPU time, and the steps whose wall
# time differs most from the same step of the last run. CFG, KV (fp8/auto), WORKLOAD; PROFILE=1: cProfile
# of the first run's first step (the functions with the most time). Triton compilations after the warm-up
# (memory or disk cache misses) are listed with the kernel, its specialization key and the lanner caller.
import cProfile
import dataclasses
import json
import os
import pstats
import time

from lanner import LLM, SamplingParams
from lanner.bench.common import WORKLOADS
from lanner.executor.step_handle import StepTimes


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


llm = LLM(model=os.environ.get("CFG", "benchmarks/configs/qwen3-8b.json"), load_format="dummy",
          kv_cache_dtype=os.environ.get("KV", "fp8"))
llm.generate([[1] * 16], greedy(4), use_tqdm=False)
try:
    import traceback

    from triton.runtime.jit import JITFunction

    do_compile = JITFunction._do_compile

    def noted_compile(self, key, *args, **kw):
        t = time.perf_counter()
        out = do_compile(self, key, *args, **kw)
        caller = [f"{f.filename.split('lanner/')[-1]}:{f.lineno}" for f in traceback.extract_stack() if "/lanner/" in f.filename]
        print(f"compile {self.fn.__name__} {(time.perf_counter() - t) * 1e3:.0f} ms key={key} from {caller[-3:]}", flush=True)
        return out

    JITFunction._do_compile = noted_compile
except ImportError:  # no triton (the CPU)
    pass
engine, runner = llm.engine, llm.engine.runner
base = WORKLOADS[os.environ.get("WORKLOAD", "W-8B")]
runs = []
for seed in [int(s) for s in os.environ.get("SEEDS", "0 1 2").split()]:
    reqs = dataclasses.replace(base, seed=seed).requests(engine.vocab_size)
    tokens, launch = [], runner.launch

    def launch_and_note(sched, *args, tokens=tokens, launch=launch, **kw):
        tokens.append(sum(n for _, n in sched.scheduled))
        return launch(sched, *args, **kw)

    step, walls = engine.step, []

    def timed_step(step=step, walls=walls):
        t = time.perf_counter()
        if not walls and not runs and os.environ.get("PROFILE"):
            with cProfile.Profile() as prof:
                out = step()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        else:
            out = step()
        walls.append(time.perf_counter() - t)
        return out

    runner.launch, runner.step_times, engine.step = launch_and_note, StepTimes(each=[]), timed_step
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], [greedy(m) for _, m in reqs], use_tqdm=False)
    wall = time.perf_counter() - t
    gpu = [sum(x) * 1e-3 for x in runner.step_times.each]
    del runner.launch, engine.step
    runner.step_times = None
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt = [i for i, n in enumerate(tokens) if n > 256]
    runs.append({"seed": seed, "wall_s": round(wall, 3), "tok_per_s": round(out_tokens / wall, 1),
                 "steps": len(walls), "step_wall_s": round(sum(walls), 3),
                 "prompt_steps_wall_s": round(sum(walls[i] for i in prompt if i < len(walls)), 3),
                 "prompt_steps_gpu_s": round(sum(gpu[i] for i in prompt if i < len(gpu)), 3),
                 "gpu_s": round(sum(gpu), 3), "first_steps_ms": [round(w * 1e3, 1) for w in walls[:14]],
                 "tokens": tokens[:14], "_walls": walls})
    print(json.dumps({k: v for k, v in runs[-1].items() if k != "_walls"}), flush=True)
last = runs[-1]["_walls"]
for r in runs[:-1]:
    diff = sorted(range(min(len(last), len(r["_walls"]))), key=lambda i: last[i] - r["_walls"][i])[:8]
    print(f"seed {r['seed']}: steps slower than seed {runs[-1]['seed']}'s:",
          [(i, round(r["_walls"][i] * 1e3, 1), round(last[i] * 1e3, 1)) for i in diff])
