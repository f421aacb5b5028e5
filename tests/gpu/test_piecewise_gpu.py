"""Piecewise and whole-forward CUDA graphs on the GPU: identical greedy outputs with and
without them on mixed workloads, padding rows zeroed, the oversized-step fallback, no host
syncs in a graphed step, capture failures reported with size and piece, no kernel compiled
after the start by greedy or sampled steps."""
from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch

from lanner import LLM, SamplingParams


def mixed_prompts(n: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 3000, (48,), generator=g).tolist()
    return [(shared if i % 3 == 0 else []) + torch.randint(3, 3000, (int(m),), generator=g).tolist()
            for i, m in enumerate(torch.randint(1, 300, (n,), generator=g))]


def run(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def release_memory():
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("whole", [0, 512], ids=["pieces", "whole-forward"])
def test_greedy_outputs_identical_with_and_without_graphs(dtype, whole):
    """Prompt and mixed steps through the piecewise graphs (whole=0) or the whole-forward graphs
    (every step up to 512 tokens): the outputs of the eager forward, bit for bit."""
    prompts = mixed_prompts()
    eager = LLM(dtype=dtype, gpu_memory_utilization=0.3, piecewise_graphs=False, max_num_batched_tokens=512)
    assert eager.engine.runner.piecewise is None
    want = run(eager, prompts[:4]) + run(eager, prompts[4:])  # the second call hits the prefix cache
    del eager
    release_memory()
    llm = LLM(dtype=dtype, gpu_memory_utilization=0.3, max_num_batched_tokens=512, prefill_graph_max_tokens=whole)
    pw = llm.engine.runner.piecewise
    assert pw is not None and pw.report.sizes[-1] == 512 and pw.report.num_pieces == pw.model.num_pieces
    assert sorted(pw.full_graphs) == pw.full_sizes == ([] if whole == 0 else pw.sizes)
    got = run(llm, prompts[:4]) + run(llm, prompts[4:])
    assert pw.num_eager_steps == 0
    if whole:
        assert pw.num_full_graph_steps > 0 and pw.num_graph_steps == 0
    else:
        assert pw.num_graph_steps > 0 and pw.num_full_graph_steps == 0
    assert llm.engine.kv_cache.stats().prefix_hits > 0
    assert got == want


# run in a fresh process: kernels an earlier test of this process compiled would hide a missing warm-up.
# Whole-forward graphs to 128 tokens: the prefill tile of 144-1,024 tokens is then launched by piece steps only
_COMPILES_AFTER_START = """
import inspect, json, sys, torch
from triton.runtime.jit import JITFunction
from lanner import LLM, SamplingParams
draft = {"method": sys.argv[2], "num_speculative_tokens": 2} if sys.argv[2] != "none" else None
llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3, max_num_batched_tokens=2048, prefill_graph_max_tokens=128,
          kv_cache_dtype=sys.argv[1], speculative_config=draft, **json.loads(sys.argv[3]))
compiled = []
do_compile = JITFunction._do_compile
def recording(self, *args, **kwargs):  # names what each compilation specialized on, should one happen
    bound = inspect.signature(do_compile).bind(self, *args, **kwargs).arguments
    compiled.append(f"{self.fn.__name__} {bound.get('signature')} {bound.get('attrs')}")
    return do_compile(self, *args, **kwargs)
JITFunction._do_compile = recording
g = torch.Generator().manual_seed(2)
prompts = [torch.randint(3, 3000, (int(n),), generator=g).tolist() for n in torch.randint(1, 300, (16,), generator=g)]
prompts += [torch.randint(3, 3000, (n,), generator=g).tolist() for n in (700, 1000, 1500)]
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
greedy = list(compiled)
# sampled rows in batches of 1, 5 and 16 (top-p's search specialized on them): temperature alone, top-p
# alone, Qwen3's preset, min-p, penalties and logprobs
presets = [dict(top_p=0.9), dict(), dict(top_k=20, top_p=0.95), dict(min_p=0.1), dict(top_p=0.8, logprobs=3),
           dict(top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5)]
for n in (1, 5, 16):
    for preset in presets:
        llm.generate(prompts[:n], [SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True, seed=i, **preset)
                                   for i in range(n)], use_tqdm=False)
pw = llm.engine.runner.piecewise
print(json.dumps({"greedy": greedy, "sampled": compiled[len(greedy):], "piece_steps": pw.num_graph_steps,
                  "whole_steps": pw.num_full_graph_steps}))
"""


@pytest.mark.parametrize("kv_cache_dtype, draft, engine", [("auto", "none", {}), ("fp8", "none", {}),
                                                            ("auto", "draft_model", {}),
                                                            ("auto", "none", {"cuda_graph_sizes": [1, 2, 4, 8]})])
def test_a_started_engine_compiles_no_kernel_for_greedy_or_sampled_steps(kv_cache_dtype, draft, engine):
    """The engine's start compiles every Triton kernel a step launches, the eager attention between
    replayed pieces and the sampling kernels included: otherwise the first prompt longer than the
    whole-forward graphs compiled the KV store while every running request waited (0.4 s at W-8B's
    first 8,192-token step on a fresh machine), and the first sampled requests compiled the race draw
    and top-p's search, again for each new kind of batch size. With a draft LM (its heads differ from the
    target's), its eager prompt chunks over its prefill graphs compiled their prefill tile, its eager
    decode steps after them a split count no graph had, and its staged rows, views into one copy at
    any offset, a variant of each kernel for pointers not 16-byte aligned. Decode steps of more requests
    than the largest decode graph (a short cuda_graph_sizes) ran decode attention eagerly with split
    counts no graph had."""
    done = subprocess.run([sys.executable, "-c", _COMPILES_AFTER_START, kv_cache_dtype, draft, json.dumps(engine)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["piece_steps"] > 0 and got["whole_steps"] > 0
    assert got["greedy"] == [] and got["sampled"] == []


def test_padding_rows_are_zero_and_oversized_steps_fall_back():
    prompts = mixed_prompts(8, seed=1)
    want_llm = LLM(dtype="float32", gpu_memory_utilization=0.3, piecewise_graphs=False, max_num_batched_tokens=256)
    want = run(want_llm, prompts)
    del want_llm
    release_memory()
    llm = LLM(dtype="float32", gpu_memory_utilization=0.3, max_num_batched_tokens=256, piecewise_max_tokens=100,
              prefill_graph_max_tokens=48)
    pw = llm.engine.runner.piecewise
    assert pw.max_size == 100 and pw.full_sizes[-1] == 48
    assert run(llm, prompts) == want
    assert pw.num_eager_steps > 0  # steps of 256 tokens are over the largest graph (100)
    # steps of 37 and 57 tokens: padded to 48 and 64 rows (a whole-forward graph, pieces), whose
    # attention rows stay zero
    for n, whole, pieces in ((37, 1, 0), (57, 0, 1)):
        before = pw.num_full_graph_steps, pw.num_graph_steps
        prompt = list(range(50 * n, 51 * n))  # no prefix shared with anything before
        llm.engine.add_request(f"pad{n}", prompt, SamplingParams(temperature=0, max_tokens=1))
        llm.engine.step()
        assert (pw.num_full_graph_steps - before[0], pw.num_graph_steps - before[1]) == (whole, pieces)
        rows = pw.bufs.attn_out[n:pw.padded_size(n)]
        assert rows.shape[0] > 0 and torch.equal(rows, torch.zeros_like(rows))


def test_no_host_sync_in_a_piecewise_step():
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3, max_num_batched_tokens=512)
    runner = llm.engine.runner
    launch = runner.launch

    def strict_launch(sched, **kw):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(sched, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.launch = strict_launch
    run(llm, mixed_prompts(6, seed=2))
    assert runner.piecewise.num_full_graph_steps > 0
    runner.piecewise.full_graphs.clear()  # the pieces, with attention between them
    run(llm, mixed_prompts(6, seed=3))
    assert runner.piecewise.num_graph_steps > 0


def test_capture_failure_names_size_and_piece(monkeypatch):
    from lanner.models.llama import DecoderForCausalLM

    real = DecoderForCausalLM.run_piece

    def failing(self, j, input_ids, positions, bufs):
        if j == 2 and torch.cuda.is_current_stream_capturing() and input_ids.shape[0] == 32:
            raise ValueError("boom")
        return real(self, j, input_ids, positions, bufs)

    monkeypatch.setattr(DecoderForCausalLM, "run_piece", failing)
    with pytest.raises(RuntimeError, match=r"32 tokens, piece 2 of"):
        LLM(dtype="bfloat16", gpu_memory_utilization=0.3, max_num_batched_tokens=64)
