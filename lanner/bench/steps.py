"""`lanner bench step`: the time of one prefill or mixed step of N tokens, through the
whole-forward CUDA graphs (where N has one), the piecewise graphs alone, and eagerly, in
the same process on the same weights."""
from __future__ import annotations

import statistics
import time

import torch

from lanner.bench.common import sync
from lanner.core.request import SamplingParams

NUM_DECODES = 16  # running requests that decode alongside the prefill chunk in a mixed step


def _time_step(engine, num_tokens: int, kind: str, seed: int) -> float:
    """Seconds for one synchronous engine step of `num_tokens` tokens: a fresh prompt
    (`prefill`), or NUM_DECODES decoding requests plus a fresh prompt (`mixed`)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.vocab_size
    ids = []
    if kind == "mixed":
        for i in range(NUM_DECODES):
            ids.append(f"d{seed}-{i}")
            engine.add_request(ids[-1], torch.randint(0, vocab, (32,), generator=g).tolist(),
                               SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        engine.step()  # their prefill; afterwards each decodes one token per step
    prompt_len = num_tokens - (NUM_DECODES if kind == "mixed" else 0)
    ids.append(f"p{seed}")
    engine.add_request(ids[-1], torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    sync()
    start = time.perf_counter()
    engine.step()
    sync()
    seconds = time.perf_counter() - start
    for request_id in ids:
        engine.abort_request(request_id)
    return seconds


def step_times(llm, token_counts: list[int], repeats: int) -> list[dict]:
    engine = llm.engine
    runner = engine.runner
    if engine.config.scheduler.overlap_scheduling:
        raise ValueError("lanner bench step times synchronous steps: pass --no-overlap-scheduling")
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
                    times = [_time_step(engine, n, kind, seed) for seed in seeds][1:]
                    row[f"{mode}_ms"] = round(statistics.median(times) * 1e3, 3)
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
