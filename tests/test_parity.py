"""lanner against Hugging Face transformers on tiny random models, in float32:
logits of prefill and decode, and greedy generation token for token, also with
chunked prefill, prefix caching and preemption forced on."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, hf_model, make_llm, random_prompts
from lanner import SamplingParams

NEW_TOKENS = 12


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_logprobs_match_transformers_for_prefill_and_decode(model_path):
    llm = make_llm(model_path)
    hf = hf_model(model_path)
    prompt = random_prompts(1, 20, 20, hf.config.vocab_size, seed=1)[0]
    out = llm.generate([prompt], greedy(prompt_logprobs=0, logprobs=3))[0]
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)
    # prefill: each prompt token's logprob given its prefix
    ours_prompt = torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], prompt[1:])])
    torch.testing.assert_close(ours_prompt, ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])],
                               atol=1e-4, rtol=1e-4)
    # decode: every generated token's logprob, and the top-3 alternatives of each step
    for i, (token, lps) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert token == int(row.argmax())
        top = row.topk(3)
        for value, tid in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(lps[tid].logprob - value) < 1e-4


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 7},  # chunked prefill: every prompt is split, decodes mix with chunks
    {"num_kv_blocks": 12, "block_size": 4, "max_model_len": 64},  # preemption: too few blocks for the batch
], ids=["plain", "chunked", "preempt"])
def test_greedy_matches_transformers(model_path, options):
    hf = hf_model(model_path)
    prompts = random_prompts(6, 3, 30, hf.config.vocab_size)
    llm = make_llm(model_path, **options)
    outs = llm.generate(prompts, greedy())
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, NEW_TOKENS)
    engine = llm.engine
    if "num_kv_blocks" in options:
        assert engine.scheduler.num_preemptions > 0
    stats = engine.kv_cache.stats()
    assert stats.used_blocks == 0


def test_prefix_caching_reuses_blocks_and_keeps_outputs(model_path):
    hf = hf_model(model_path)
    shared = random_prompts(1, 40, 40, hf.config.vocab_size, seed=3)[0]
    tails = random_prompts(5, 1, 9, hf.config.vocab_size, seed=4)
    prompts = [shared + t for t in tails]
    llm = make_llm(model_path, block_size=8)
    first = llm.generate(prompts[:1], greedy())  # fills the cache with the shared prefix
    rest = llm.generate(prompts[1:], greedy())
    assert all(o.num_cached_tokens == 40 for o in rest)
    assert llm.engine.kv_cache.stats().hit_rate > 0.5
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    # the same prompt again hits on everything but its last token
    again = llm.generate(prompts[:1], greedy())[0]
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 8 * 8
    assert again.outputs[0].token_ids == expected[0]


def test_prefix_caching_within_one_batch_and_with_chunks(qwen3_path):
    hf = hf_model(qwen3_path)
    shared = random_prompts(1, 33, 33, hf.config.vocab_size, seed=5)[0]
    prompts = [shared + t for t in random_prompts(4, 2, 6, hf.config.vocab_size, seed=6)]
    llm = make_llm(qwen3_path, block_size=4, max_num_batched_tokens=16)
    outs = llm.generate(prompts, greedy())
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, NEW_TOKENS)


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 7, "block_size": 8}], ids=["plain", "chunked"])
def test_triton_backend_matches_transformers(qwen3_path, options):
    """The GPU attention backend (plan into device buffers, Triton kernels), here run by
    Triton's interpreter on the CPU, gives transformers' greedy tokens."""
    hf = hf_model(qwen3_path)
    prompts = random_prompts(3, 3, 20, hf.config.vocab_size, seed=9)
    llm = make_llm(qwen3_path, attention_backend="triton", **options)
    outs = llm.generate(prompts, greedy(6))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, 6)


def test_the_lm_head_outside_graphs_sees_row_counts_in_buckets(monkeypatch):
    """cuBLAS spends milliseconds of host time on each row count it has not seen; the eager LM head
    pads its rows to LOGITS_ROW_BUCKET (with row 0), and the padding changes no token or logprob."""
    from lanner import LLM, SamplingParams
    from lanner.executor import model_runner
    from lanner.executor.model_runner import LOGITS_ROW_BUCKET

    llm = LLM(device="cpu", dtype="float32")
    model, rows_seen = llm.engine.runner.model, []
    compute_logits = model.compute_logits

    def recording(hidden, out=None):
        rows_seen.append(hidden.shape[0])
        return compute_logits(hidden, out)

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompts = ["def f(x):", "import os", "class A:", "x = 1", "# note"]
    with monkeypatch.context() as unpadded:
        unpadded.setattr(model_runner, "LOGITS_ROW_BUCKET", 1)
        want = llm.generate(prompts, params, use_tqdm=False)
    model.compute_logits = recording
    got = llm.generate(prompts, params, use_tqdm=False)
    assert rows_seen and all(n % LOGITS_ROW_BUCKET == 0 for n in rows_seen)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):  # the same up to the GEMM's summation order for another row count
        for step_got, step_want in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert step_got.keys() == step_want.keys()
            assert all(abs(step_got[t].logprob - step_want[t].logprob) < 1e-4 for t in step_got)
