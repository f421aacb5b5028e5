"""Decode steps advanced on the device (executor/advance.py): the same tokens as steps staged from
the host, on exactly the steps that may advance, with the device inputs staging would leave."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, hf_model, make_llm, random_prompts

from lanner import SamplingParams
from lanner.executor import model_runner


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("backend,overlap", [("torch", True), ("torch", False), ("triton", True)],
                         ids=["torch-overlap", "torch-sync", "triton-overlap"])
def test_one_request_advances_every_decode_step_inside_a_block(qwen3_path, backend, overlap):
    """A lone request decodes 14 tokens after its 6-token prompt with blocks of 4: the steps at
    positions 7..18 follow a decode step, and all but those starting a block (8, 12, 16) advance,
    with transformers' tokens."""
    prompt = random_prompts(1, 6, 6, 200, seed=3)
    llm = make_llm(qwen3_path, attention_backend=backend, block_size=4, overlap_scheduling=overlap)
    out = llm.generate(prompt, greedy(14), use_tqdm=False)[0].outputs[0].token_ids
    assert [out] == hf_greedy(hf_model(qwen3_path), prompt, 14)
    assert llm.engine.runner.num_advanced_steps == len([p for p in range(7, 19) if p % 4])


def test_advancing_changes_no_token_or_logprob_while_the_batch_changes(qwen3_path):
    """Requests of different lengths join (a prompt chunked over steps among the decodes) and finish
    at different steps: every change of the batch stages it anew, and the outputs equal those of
    staging every step (the Triton backend's device state: the test below)."""
    prompts = random_prompts(4, 3, 30, 200, seed=5)
    params = [greedy(n, logprobs=2) for n in (9, 17, 4, 12)]
    runs = []
    for advance in (True, False):
        llm = make_llm(qwen3_path, block_size=4, max_num_batched_tokens=16)
        llm.engine.runner.advance_decodes = advance
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append(([o.outputs[0].token_ids for o in outs], [o.outputs[0].cumulative_logprob for o in outs],
                     llm.engine.runner.num_advanced_steps))
        llm.engine.kv_cache.check_invariants([])
    (tokens, logprobs, advanced), (staged_tokens, staged_logprobs, none) = runs
    assert tokens == staged_tokens and logprobs == pytest.approx(staged_logprobs, abs=1e-5)
    assert advanced > 0 and none == 0


def test_an_advanced_step_leaves_the_device_inputs_that_staging_would(qwen3_path, monkeypatch):
    """After each advanced step, the same step staged and planned from the host writes the very
    inputs and attention metadata the device holds (the Triton backend's buffers, in Triton's
    interpreter): tokens, positions, KV slots, logits rows, context lengths, block tables."""
    llm = make_llm(qwen3_path, attention_backend="triton", block_size=8)
    runner = llm.engine.runner
    backend = runner.backend
    advance_step, compared = model_runner.advance, []

    def compare(runner, sched):
        advanced = advance_step(runner, sched)
        if advanced is None:
            return None
        run, n = runner.decode_run, len(sched.scheduled)
        device = (runner.staged[:5, :run.rows].clone(), backend.lens.clone(), backend.block_tables[:n].clone())
        runner.decode_run = None  # stage and plan it from the host instead
        batch = runner.prepare(sched)[0]
        backend.plan(batch)
        host = (runner.staged[:5, :run.rows], backend.lens, backend.block_tables[:n])
        for got, want in zip(device, host):
            assert torch.equal(got, want)
        compared.append(n)
        return advanced

    monkeypatch.setattr(model_runner, "advance", compare)
    prompts = random_prompts(3, 2, 9, 200, seed=7)
    llm.generate(prompts, [greedy(n) for n in (20, 13, 17)], use_tqdm=False)
    assert len(compared) > 4 and max(compared) == 3
