"""The engine on the GPU: greedy parity with the CPU reference path, CUDA graphs
on/off, no host syncs in graph replay or eager forward, no memory growth."""
from __future__ import annotations

import gc

import pytest
import torch

from lanner import LLM, SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "# Parse the command line\n", "def __repr__(self):", "try:\n    import json",
           "with open(path) as f:", "if __name__ == '__main__':", "return self._", "raise ValueError(",
           "@property\ndef name(self):"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_gpu_matches_cpu_reference_path():
    cpu = tokens(LLM(device="cpu", dtype="float32", num_kv_blocks=512))
    gpu = tokens(LLM(device="cuda", dtype="float32", gpu_memory_utilization=0.3))
    assert gpu == cpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graphs_on_and_off_give_identical_outputs(dtype):
    eager = LLM(dtype=dtype, enforce_eager=True, gpu_memory_utilization=0.3)
    assert eager.engine.runner.graphs is None
    want = tokens(eager)
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    graphs = LLM(dtype=dtype, gpu_memory_utilization=0.3)
    assert graphs.engine.runner.graphs.report.sizes[0] == 1
    assert tokens(graphs) == want


def test_no_host_sync_in_replay_or_eager_forward():
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
    engine, runner = llm.engine, llm.engine.runner
    for i, p in enumerate(PROMPTS[:5]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for step in range(3):  # step 0: prefill (eager); then decode steps (graph replay of size 8)
        sched = engine.scheduler.schedule()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batch, _, _ = runner.prepare(sched)
            hidden = runner.run_model(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert hidden.shape[0] == batch.num_real_tokens
        for req, n in sched.scheduled:  # finish the step the normal way
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.append_token(1)
    for i in range(5):
        engine.abort_request(f"r{i}")


def test_no_memory_growth_over_many_requests():
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True, seed=3)
    marks = []
    for _ in range(4):
        llm.generate(PROMPTS * 8, params, use_tqdm=False)
        torch.cuda.synchronize()
        marks.append(torch.cuda.memory_allocated())
    assert marks[1] == marks[2] == marks[3], marks
    assert llm.engine.kv_cache.stats().used_blocks == 0


def test_kv_cache_is_sized_from_memory():
    free, total = torch.cuda.mem_get_info()
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.5)
    runner = llm.engine.runner
    kv_bytes = 2 * sum(k.numel() * k.element_size() for k, _ in runner.kv_caches)
    assert runner.num_blocks > 1000
    assert torch.cuda.memory_allocated() <= 0.5 * total
    assert kv_bytes > 0.3 * total  # a tiny model leaves nearly all of the budget to the cache
