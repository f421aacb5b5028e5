"""`lanner bench step`: the time of one prefill or mixed step of N tokens, through the
whole-forward CUDA graphs (where N has one), the piecewise graphs alone, and eagerly, in
the same process on the same weights; on a GPU also its device time from the forward's start
to the sampled tokens (`<mode>_gpu_ms`, CUDA events): the rest of `<mode>_ms` is host work
before the launch and after the read-back. Those steps are synchronous (--no-overlap-scheduling).
With overlap scheduling instead, the time a step of a stream of fresh N-token prompts, one
arriving each step (`back_to_back_ms`): the host schedules, stages and launches each step while
the device runs the one before, as a server does when prompts queue, so a step costs the longer
of its host work and its device work rather than their sum."""
from __future__ import annotations

import statistics
import time

import torch

from lanner.bench.common import sync
from lanner.core.request import SamplingParams
from lanner.executor.step_handle import StepTimes

NUM_DECODES = 16  # running requests that decode alongside the prefill chunk in a mixed step
BACK_TO_BACK_STEPS = 4  # timed steps of a back-to-back run, per --repeats
BACK_TO_BACK_RUNS = 3  # runs of fresh prompts; their median is reported


def _time_step(engine, num_tokens: int, kind: str, seed: int) -> tuple[float, float | None]:
    """Seconds for one synchronous engine step of `num_tokens` tokens: a fresh prompt
    (`prefill`), or NUM_DECODES decoding requests plus a fresh prompt (`mixed`); and on a GPU the
    step's device time in milliseconds (StepTimes: the forward's start to sampling), else None."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.vocab_size
    ids = []
    if kind == "mixed":
        for i in range(NUM_DECODES):
            ids.append(f"d{seed}-{i}")
            engine.add_request(ids[-1], _random_prompt(g, vocab, 32),
                               SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        engine.step()  # their prefill; afterwards each decodes one token per step
    prompt_len = num_tokens - (NUM_DECODES if kind == "mixed" else 0)
    ids.append(f"p{seed}")
    engine.add_request(ids[-1], _random_prompt(g, vocab, prompt_len),
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    runner = engine.runner
    kept, times = runner.step_times, StepTimes(each=[])  # it records only on a GPU
    runner.step_times = times
    sync()
    start = time.perf_counter()
    try:
        engine.step()
        sync()
    finally:
        runner.step_times = kept
    seconds = time.perf_counter() - start
    for request_id in ids:
        engine.abort_request(request_id)
    return seconds, times.each[-1][0] if times.each else None


def back_to_back_ms(engine, num_tokens: int, steps: int, seed: int) -> float:
    """The steady-state milliseconds a step of a stream of fresh `num_tokens`-token prompts, one
    added before each step (the ones before await only their read-back, so a step takes that one
    prompt): from the return of the second step, when the device is already running it, to the
    return of the `steps`-th after, when it runs that one; neither the stream's start (the host
    staging a step while the device idles) nor its drain counts."""
    scheduler = engine.config.scheduler
    if num_tokens > scheduler.max_num_batched_tokens:
        raise ValueError(f"lanner bench step: a {num_tokens}-token prompt does not fit one step's budget of "
                         f"{scheduler.max_num_batched_tokens} tokens (--max-num-batched-tokens)")
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    before = engine.num_steps
    for i in range(steps + 2):
        engine.add_request(f"b{seed}-{i}", _random_prompt(g, engine.vocab_size, num_tokens), params)
        engine.step()
        if i == 1:
            start = time.perf_counter()
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    if engine.num_steps - before != steps + 2:
        raise ValueError(f"lanner bench step: {steps + 2} prompts took {engine.num_steps - before} steps, not one "
                         "a step (--max-num-seqs 1 leaves no room for a prompt beside one awaiting its read-back)")
    return seconds * 1e3 / steps


def _back_to_back_rows(engine, token_counts: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in token_counts:
        # fresh prompts in every run (a prefix-cache hit would skip the work); the median of the runs
        runs = [back_to_back_ms(engine, n, BACK_TO_BACK_STEPS * repeats, seed=n * 1000 + r)
                for r in range(BACK_TO_BACK_RUNS)]
        rows.append({"tokens": n, "kind": "prefill, back to back", "back_to_back_ms": round(statistics.median(runs), 3)})
        print(rows[-1], flush=True)
    return rows


def _random_prompt(g: torch.Generator, vocab: int, length: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def step_times(llm, token_counts: list[int], repeats: int) -> list[dict]:
    engine = llm.engine
    runner = engine.runner
    if engine.config.scheduler.overlap_scheduling:
        return _back_to_back_rows(engine, token_counts, repeats)
    if min(token_counts) <= NUM_DECODES:
        raise ValueError(f"lanner bench step: a mixed step holds {NUM_DECODES} decode rows and a prompt, so every "
                         f"token count must be over {NUM_DECODES}")
    piecewise = runner.piecewise
    whole = piecewise.full_graphs if piecewise is not None else {}
    modes = ({"whole": (piecewise, whole)} if whole else {}) | \
        ({"piecewise": (piecewise, {})} if piecewise is not None else {}) | {"eager": (None, {})}
    rows = []
    for n in token_counts:
        for kind in ("prefill", "mixed"):
            row = {"tokens": n, "kind": kind}
            try:
                for m, (mode, (graphs, full)) in enumerate(modes.items()):
                    if mode == "whole" and piecewise.padded_size(n) not in whole:
                        continue  # no whole-forward graph of this size: the pieces run
                    runner.piecewise = graphs  # None: the unsplit forward, no padding
                    if graphs is not None:
                        graphs.full_graphs = full
                    # distinct prompts for every step: a prefix-cache hit would skip the work
                    seeds = [(n * 2 + (kind == "mixed")) * 1000 + m * 100 + r for r in range(repeats + 1)]
                    seconds, gpu_ms = zip(*[_time_step(engine, n, kind, seed) for seed in seeds][1:])
                    row[f"{mode}_ms"] = round(statistics.median(seconds) * 1e3, 3)
                    if None not in gpu_ms:
                        row[f"{mode}_gpu_ms"] = round(statistics.median(gpu_ms), 3)
            finally:
                runner.piecewise = piecewise
                if piecewise is not None:
                    piecewise.full_graphs = whole
            for mode in ("whole", "piecewise"):
                if f"{mode}_ms" in row:
                    row[f"{mode}_vs_eager"] = round(row[f"{mode}_ms"] / row["eager_ms"], 3)
            print(row, flush=True)
            rows.append(row)
    return rows
