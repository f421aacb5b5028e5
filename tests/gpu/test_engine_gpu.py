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


def strict_launches(runner, record=lambda sched: sched.num_tokens) -> list:
    """Make every launch of `runner` fail on a host sync (sync debug mode); returns a list that
    gets `record(sched)` of each step as it launches."""
    launch, launched = runner.launch, []

    def strict_launch(sched, **kw):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle = launch(sched, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        launched.append(record(sched))
        return handle

    runner.launch = strict_launch
    return launched


def test_no_host_sync_when_launching_steps():
    """Launching a step (staging, plan, eager prefill or graph replay, logits, sampling of
    every kind) never waits for the GPU; only reading results back does. Overlap
    scheduling depends on it."""
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
    engine = llm.engine
    launched = strict_launches(engine.runner)
    kinds = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=1, max_tokens=12),
             SamplingParams(temperature=0, min_tokens=4, max_tokens=12),
             SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0, repetition_penalty=1.2, presence_penalty=0.3, max_tokens=3),
             SamplingParams(temperature=0, logit_bias={77: 5.0, 12: -3.0}, max_tokens=12),
             SamplingParams(temperature=0.9, seed=4, allowed_token_ids=[10, 11, 12, 300], max_tokens=12),
             SamplingParams(temperature=0, logprobs=5, prompt_logprobs=3, max_tokens=12),
             SamplingParams(temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.05, seed=2, logprobs=2,
                            max_tokens=12),
             SamplingParams(temperature=0.6, top_p=0.9, seed=3, max_tokens=12)]  # top-p alone: the search kernel
    outs = llm.generate(PROMPTS[:10], kinds, use_tqdm=False)
    assert len(launched) >= 12 and all(len(o.outputs[0].token_ids) > 0 for o in outs)
    assert len(outs[7].outputs[0].logprobs) == len(outs[7].outputs[0].token_ids) and outs[7].prompt_logprobs
    assert set(outs[6].outputs[0].token_ids) <= {10, 11, 12, 300}
    assert engine.num_overlapped_steps > 0 and engine.kv_cache.stats().used_blocks == 0


def test_overlap_scheduling_on_and_off_identical_on_gpu():
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=40, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[13, 198])] * 4
    results = []
    for overlap in (False, True):
        llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3, overlap_scheduling=overlap,
                  max_num_batched_tokens=64)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        results.append([[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs])
        assert (llm.engine.num_overlapped_steps > 0) == overlap
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert results[0] == results[1]


def test_an_fp8_kv_cache_on_the_gpu():
    """kv_cache_dtype=fp8 through the Triton kernels (decode, prefill, the fused projection store,
    graphs on): in float32 the tokens are the torch backend's over the same fp8 cache; in bf16 graphs
    change nothing, the same memory holds twice the bf16 cache's blocks, and the first tokens are
    mostly the bf16 cache's (later ones drift apart after any near-tie)."""
    def run(**kw):
        llm = LLM(gpu_memory_utilization=0.3, **kw)
        out, blocks = tokens(llm), llm.engine.runner.num_blocks
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return out, blocks

    triton_fp32, _ = run(dtype="float32", kv_cache_dtype="fp8")
    torch_fp32, _ = run(dtype="float32", kv_cache_dtype="fp8", enforce_eager=True, attention_backend="torch")
    assert triton_fp32 == torch_fp32
    graphs, fp8_blocks = run(dtype="bfloat16", kv_cache_dtype="fp8")
    eager, _ = run(dtype="bfloat16", kv_cache_dtype="fp8", enforce_eager=True)
    bf16, bf16_blocks = run(dtype="bfloat16")
    assert graphs == eager
    assert fp8_blocks >= 1.9 * bf16_blocks
    assert sum(x[0] == y[0] for x, y in zip(graphs, bf16)) >= 10


def test_checkpoint_kv_scales_through_the_triton_kernels(kv_scaled_model):
    """A checkpoint's k_scale / v_scale reach the Triton store, the fused norm + rotary store and both
    attention kernels (graphs on): the first layer's cache holds exactly 2x K and V / 4 of the unscaled
    fp8 run's wherever both are normal e4m3 numbers (so the stores scale), and in float32 the tokens
    are the torch backend's over the same scaled cache (whose reads scale back, tests/test_kernels.py),
    and the first ones the unscaled run's."""
    path, layers = kv_scaled_model

    def run(model=None, **kw):
        llm = LLM(model=model, dtype="float32", kv_cache_dtype="fp8", gpu_memory_utilization=0.3, **kw)
        assert llm.engine.runner.backend.kv_scales == ([(0.5, 4.0)] * layers if model else [(1.0, 1.0)] * layers)
        # the runs size their caches a little differently; the prompts' blocks come first (the free
        # list hands out the lowest ids), and a whole cache in float32 on the host would be ~10 GB
        out, first = tokens(llm), [c[:4096].float().cpu() for c in llm.engine.runner.kv_caches[0]]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return out, first

    (scaled, (k2, v2)), (plain, (k, v)) = run(path), run()
    reference = run(path, enforce_eager=True, attention_backend="torch")[0]
    # a scale applied wrongly changes the first tokens; float32 sums in another order can flip a
    # near-tie later (one of 12 prompts did at its 17th token on an H200)
    assert [x[:8] for x in scaled] == [y[:8] for y in reference]
    assert sum(x == y for x, y in zip(scaled, reference)) >= 10
    assert sum(x[0] == y[0] for x, y in zip(scaled, plain)) >= 10  # subnormal e4m3 rounding differs a little
    normal = (k.abs() >= 2 ** -5) & (v.abs() >= 2 ** -4)
    assert normal.sum() > 1000 and torch.equal(k2[normal], 2 * k[normal]) and torch.equal(v2[normal], v[normal] / 4)


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


def test_gpu_memory_utilization_bounds_the_piecewise_graphs_too():
    """The cache is sized after the piecewise graphs' pool and buffers and the decode graphs' logits
    buffer (74 MiB here) exist, and the decode and whole-forward graphs, captured after it, share the
    pieces' pool: the process stays within gpu_memory_utilization."""
    config = __file__.rsplit("/tests/", 1)[0] + "/benchmarks/configs/qwen3-0.6b.json"
    llm = LLM(model=config, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.5)
    llm.generate([[5] * 700] * 12, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    free, total = torch.cuda.mem_get_info()
    runner = llm.engine.runner
    assert runner.piecewise.report.pool_bytes > 128 << 20  # enough to overshoot without the fix
    assert runner.graphs.graphs[1][0].pool() == runner.piecewise.pool
    assert runner.graphs.pool_growth <= 16 << 20 and runner.piecewise.full_pool_growth <= 16 << 20
    assert total - free <= 0.5 * total + (32 << 20), (total - free) / 2**30


def test_logit_constraints_match_the_cpu_path():
    """logit_bias, allowed_token_ids and bad words give the same greedy tokens on the GPU
    (batched device ops, overlap) as on the CPU reference path."""
    kinds = [SamplingParams(temperature=0, logit_bias={77: 3.0}, max_tokens=16, ignore_eos=True),
             SamplingParams(temperature=0, allowed_token_ids=list(range(10, 400)), max_tokens=16, ignore_eos=True),
             SamplingParams(temperature=0, bad_words=["self", "return"], max_tokens=16, ignore_eos=True)]
    cpu = LLM(device="cpu", dtype="float32", num_kv_blocks=512).generate(PROMPTS[:3], kinds, use_tqdm=False)
    gpu = LLM(device="cuda", dtype="float32", gpu_memory_utilization=0.3).generate(PROMPTS[:3], kinds,
                                                                                  use_tqdm=False)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_logprobs_and_penalties_match_the_cpu_path():
    """Logprobs and prompt logprobs (computed on the device at launch, read back with the tokens)
    and penalties (counts kept on the device across steps) under overlap scheduling on the GPU
    give the CPU reference path's tokens and values."""
    kinds = [SamplingParams(temperature=0, logprobs=4, prompt_logprobs=2, max_tokens=16, ignore_eos=True),
             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True),
             SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.4, max_tokens=16, ignore_eos=True)]
    cpu = LLM(device="cpu", dtype="float32", num_kv_blocks=512).generate(PROMPTS[:3], kinds, use_tqdm=False)
    gpu = LLM(device="cuda", dtype="float32", gpu_memory_utilization=0.3).generate(PROMPTS[:3], kinds,
                                                                                  use_tqdm=False)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    for got, want in ((gpu[0].outputs[0].logprobs, cpu[0].outputs[0].logprobs),
                      (gpu[0].prompt_logprobs[1:], cpu[0].prompt_logprobs[1:])):
        assert [list(e) for e in got] == [list(e) for e in want]
        assert all(abs(g[t].logprob - w[t].logprob) < 1e-3 and g[t].rank == w[t].rank
                   for g, w in zip(got, want) for t in g)


def test_dependent_launch_changes_no_output(tmp_path, monkeypatch):
    """Programmatic dependent launch changes only when kernels are scheduled: with it and without,
    the Triton GEMV in every linear (forced: split-K, fused norms and activations), the norms, the
    rotary and decode attention give the same tokens and log-probabilities bit for bit, at batch 1
    and 5, in CUDA graphs and eagerly."""
    from lanner.executor import gemv_table
    from lanner.kernels import dependent_launch

    monkeypatch.setenv("LANNER_CACHE_DIR", str(tmp_path))
    # one GEMV table for both (its key has the launch mode): the same configurations, the same sums
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "one table")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    runs = {}
    for on in (True, False):
        for eager in (False, True):
            llm = LLM(dtype="bfloat16", gemv_kernels="triton", dependent_launch=on, enforce_eager=eager,
                      gpu_memory_utilization=0.3)
            assert dependent_launch()["PDL"] == on
            runs[on, eager] = [[(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                                for o in llm.generate(PROMPTS[:b], params, use_tqdm=False)] for b in (1, 5)]
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    assert runs[True, False] == runs[False, False] and runs[True, True] == runs[False, True], runs


def test_bench_step_splits_the_steps_device_time_from_its_wall_time():
    """`lanner bench step` reports each mode's device time (CUDA events from the forward's start to
    sampling) beside its wall time: a positive share of it, so the rest is host work."""
    from lanner.bench.steps import step_times

    llm = LLM(dtype="bfloat16", overlap_scheduling=False, gpu_memory_utilization=0.3)
    for row in step_times(llm, [64], repeats=2):
        modes = [mode for mode in ("whole", "piecewise", "eager") if f"{mode}_ms" in row]
        assert "whole" in modes and "eager" in modes, row
        for mode in modes:
            assert 0 < row[f"{mode}_gpu_ms"] <= row[f"{mode}_ms"], row
    assert llm.engine.runner.step_times is None


def test_advanced_decode_steps_change_no_output():
    """Decode steps advanced on the device (executor/advance.py) give the tokens and log-probabilities
    of steps staged from the host, bit for bit, in decode graphs and eagerly, while requests join
    (a prompt chunked among the decodes) and finish; a lone request advances all its decode steps
    but the first and those that start a KV block."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1) for n in (40, 25, 33, 7, 18)]
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True)
    runs = {}
    for eager in (False, True):
        for advance in (True, False):
            llm = LLM(dtype="bfloat16", enforce_eager=eager, gpu_memory_utilization=0.3, max_num_batched_tokens=64)
            runner = llm.engine.runner
            runner.advance_decodes = advance
            outs = llm.generate(PROMPTS[:5], params, use_tqdm=False)
            batch_steps = runner.num_advanced_steps
            outs += llm.generate(PROMPTS[5:6], params[0], use_tqdm=False)
            lone = runner.num_advanced_steps - batch_steps
            outs += llm.generate(PROMPTS[6:9], sampled, use_tqdm=False)
            runs[eager, advance] = ([(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in outs],
                                    batch_steps, lone)
            del llm, runner  # the runner holds the model and its KV cache
            gc.collect()
            torch.cuda.empty_cache()
    for eager in (False, True):
        assert runs[eager, True][0] == runs[eager, False][0], eager
        assert runs[eager, False][1:] == (0, 0)
        assert runs[eager, True][1] > 0 and 39 - 4 <= runs[eager, True][2] < 39, runs[eager, True][1:]
