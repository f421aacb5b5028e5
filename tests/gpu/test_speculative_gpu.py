"""Speculative verification on the GPU: the same accepted tokens as the CPU reference (the race
kernel's noise is bit-identical), and no host sync."""
from __future__ import annotations

import pytest
import torch

from lanner.core.request import SamplingParams
from lanner.kernels.sampling_reference import race_sample_ref
from lanner.sampling.rejection import verify_greedy_drafts, verify_sampled_drafts
from lanner.sampling.sampler import processed_probs
from test_speculative import K, N, SETTINGS, V, distributions, keyed


def inputs(device: str):
    target_logits, draft_probs = distributions()
    p = processed_probs(target_logits, [SamplingParams(**SETTINGS[2])] * (K + 1))
    seeds = range(N)
    draft_keys = keyed(seeds, 0, salt=0x5EED)
    drafts = race_sample_ref(draft_probs.repeat(N, 1), draft_keys[:, :K].reshape(N * K, 2)).reshape(N, K)
    args = (drafts, draft_probs.expand(N, K, V).contiguous(), p.expand(N, K + 1, V).contiguous(),
            keyed(seeds, 0, salt=0xACCE)[:, :K].contiguous(), keyed(seeds, 0))
    return [a.to(device) for a in args]


def test_verification_on_the_gpu_matches_the_cpu_without_a_sync():
    want = verify_sampled_drafts(*inputs("cpu"))
    args = inputs("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = verify_sampled_drafts(*args)
        greedy = verify_greedy_drafts(args[0], got.tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.num_accepted.cpu(), want.num_accepted)
    keep = torch.arange(K + 1)[None, :] <= want.num_accepted[:, None]
    assert torch.equal(got.tokens.cpu()[keep], want.tokens[keep])
    # a rejected draft is never emitted in its place (the residual excludes it)
    assert torch.equal(greedy.num_accepted.cpu(), want.num_accepted)


def assert_identical_up_to_bf16_ties(plain, prompts, kinds, want, got, bound: float = 0.25) -> int:
    """Greedy outputs with speculation equal those without, except where bf16 rounding can decide:
    a verify step's GEMMs over k+1 rows per request and a decode step's over one row round
    differently, so where the target's two best tokens are within a bf16 rounding of each other the
    argmax may flip. At each output's first difference, both tokens must be among the target's top
    logprobs there and within `bound` nats of each other. Returns how many outputs differ."""
    differ = 0
    for prompt, kind, w, g in zip(prompts, kinds, want, got):
        if w == g:
            continue
        differ += 1
        i = next(j for j, (a, b) in enumerate(zip(w, g)) if a != b)
        ids = plain.get_tokenizer()(prompt, add_special_tokens=False)["input_ids"] + w[:i]
        probe = SamplingParams(temperature=0, max_tokens=1, logprobs=5, repetition_penalty=kind.repetition_penalty)
        top = plain.generate([{"prompt_token_ids": ids}], probe, use_tqdm=False)[0].outputs[0].logprobs[0]
        assert {w[i], g[i]} <= set(top), (i, w[i], g[i], top)
        assert abs(top[w[i]].logprob - top[g[i]].logprob) < bound * (1 if kind.repetition_penalty == 1 else 4), \
            (i, top[w[i]].logprob, top[g[i]].logprob)
    assert differ <= len(want) // 4, f"{differ} of {len(want)} outputs differ"
    return differ


def test_ngram_speculation_in_bf16_with_graphs_keeps_greedy_output():
    """Verify steps (k+1 tokens per request, each a decode row) and decode steps replay the full
    decode graphs: greedy outputs, with and without a repetition penalty, are those of the same engine
    without speculation, up to bf16 ties (assert_identical_up_to_bf16_ties). (Seeded sampling is
    exact in distribution, but a close draw can differ likewise: not asserted token for token here.)"""
    from lanner import LLM
    from test_speculative import CODE, SPEC

    prompts = CODE + ["for i in range(10):\n    print(i)\nfor i in range(10):\n", "x = [1, 2, 3]\ny = [1, 2, 3]\nz = ["]
    kinds = [SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
             SamplingParams(temperature=0, repetition_penalty=1.2, max_tokens=64, ignore_eos=True)]
    work = [(p, k) for p in prompts for k in kinds]
    # a fixed KV size: the memory profile of a second engine in one process counts the first's cache
    plain = LLM(dtype="bfloat16", num_kv_blocks=1024)
    spec = LLM(dtype="bfloat16", num_kv_blocks=1024, speculative_config=SPEC)
    want, got = ([o.outputs[0].token_ids for o in llm.generate([p for p, _ in work], [k for _, k in work],
                                                                use_tqdm=False)] for llm in (plain, spec))
    differ = assert_identical_up_to_bf16_ties(plain, [p for p, _ in work], [k for _, k in work], want, got)
    stats = spec.engine.speculator.stats
    assert stats.accepted > 0 and spec.engine.runner.num_verify_graph_steps > 0
    print(f"bf16 greedy: {differ} of {len(work)} outputs differ at a bf16 tie; {stats.accepted} of {stats.drafts} "
          f"drafts accepted, mean acceptance length {stats.mean_acceptance_length:.2f}")


def test_model_proposers_in_bf16_with_graphs_keep_greedy_output():
    """The shipped proposers of lanner-tiny (draft model, EAGLE-3 head, MTP layer), with decode
    graphs and piecewise graphs on, chunked prompts (so the draft's first pass is chunked too) and
    prefix hits: greedy outputs equal the engine's without speculation (up to bf16 ties), and drafts
    are accepted; verify steps replayed the target's decode graphs, and the draft's first pass and
    decode steps its own graphs."""
    import gc

    from lanner import LLM
    from test_speculative_models import CODE

    prompts = CODE + [c + "\n    # again\n" + c for c in CODE]
    greedy = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    plain = LLM(dtype="bfloat16", num_kv_blocks=1024, max_num_batched_tokens=64)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]
    accepted = {}
    for method in ("draft_model", "eagle3", "mtp"):
        llm = LLM(dtype="bfloat16", num_kv_blocks=1024, max_num_batched_tokens=64,
                  speculative_config={"method": method, "num_speculative_tokens": 4})
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert_identical_up_to_bf16_ties(plain, prompts, [greedy] * len(prompts), want, got)
        accepted[method] = llm.engine.speculator.stats.mean_acceptance_length
        assert accepted[method] > 1.3, (method, accepted[method])
        assert llm.engine.kv_cache.stats().used_blocks == 0
        runner = llm.engine.runner
        assert runner.num_verify_graph_steps > 0
        assert llm.engine.num_overlapped_verify_steps > 0  # planned before the step before was read back
        assert sum(runner.drafter.first_pass_graphs.replays.values()) > 0
        assert sum(runner.drafter.graphs.replays.values()) > 0
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print("bf16 mean acceptance lengths at k=4:", {m: round(a, 2) for m, a in accepted.items()})


def test_no_host_sync_in_a_step_that_verifies_and_drafts():
    """Verification, the draft's first pass, acceptance and the k-1 draft steps are all enqueued
    without waiting for the GPU: the only sync is the read-back of the step's tokens. Steps that
    verify drafts overlap: their inputs, positions and slots are moved on the device by the
    drafts the step before accepted, with no sync between that verify and the next draft."""
    from lanner import LLM
    from test_engine_gpu import strict_launches

    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3,
              speculative_config={"method": "eagle3", "num_speculative_tokens": 3})
    launched = strict_launches(llm.engine.runner, lambda sched: any(req.draft_token_ids for req, _ in sched.scheduled))
    llm.generate(["def add(a, b):\n    return a + b\n", "class A:\n    pass\n"],
                 SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert sum(launched) >= 4  # steps that verified drafts ran under the check
    assert llm.engine.num_overlapped_verify_steps >= 4


@pytest.mark.parametrize("method", ["eagle3", "mtp", "draft_model"])
def test_the_kv_fill_graphs_write_the_first_pass_kv(method):
    """The graphs of a step after which nobody drafts (`fill_kv`: a head's k and v projections
    alone) write the KV that the first pass's graphs write for the same rows."""
    import gc
    from types import SimpleNamespace

    from lanner import LLM

    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3, max_num_seqs=8,
              speculative_config={"method": method, "num_speculative_tokens": 3})
    drafter = llm.engine.runner.drafter
    rows, bs = 12, drafter.block_size
    positions = torch.arange(5, 5 + rows, device="cuda")
    table = list(range(-(-(5 + rows) // bs)))
    staged = SimpleNamespace(positions=positions, slots=positions.clone(), query_lens=[1] * rows,
                             seq_lens=[p + 1 for p in range(5, 5 + rows)], block_tables=[table] * rows,
                             device_seq_lens=None)
    ids = torch.randint(0, llm.engine.vocab_size, (rows,), device="cuda")
    hidden = None
    if drafter.proposer.target_hidden == "aux":
        hidden = drafter.aux_hidden[:rows].normal_()
    elif drafter.proposer.target_hidden == "final":
        hidden = torch.randn(rows, llm.engine.runner.model.spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    written = []
    for graphs in (drafter.first_pass_graphs, drafter.kv_fill_graphs):
        for k, v in drafter.kv_caches:
            k.zero_()
            v.zero_()
        graphs.replay(staged, graphs.padded_size(rows), ids, hidden)
        written.append([(k.clone(), v.clone()) for k, v in drafter.kv_caches])
    assert sum(drafter.kv_fill_graphs.replays.values()) == 1
    assert any(k.abs().sum() > 0 for k, _ in written[0])
    for (k, v), (k_fill, v_fill) in zip(*written):
        torch.testing.assert_close(k_fill, k, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(v_fill, v, rtol=2e-2, atol=2e-2)
    del llm, drafter, written
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("where,message", [
    ("lanner.executor.drafter:Drafter._decode_steps", "draft decode batch size 4"),
    ("lanner.models.mtp:MtpLayer.forward", "draft first pass rows 16"),  # captured before the decode steps
    ("lanner.models.mtp:MtpLayer.fill_kv", "draft KV fill rows 16"),
])
def test_a_draft_graph_capture_failure_names_the_mode_and_size(monkeypatch, where, message):
    import importlib

    from lanner import LLM

    module, attr = where.split(":")
    owner_name, name = attr.split(".")
    owner = getattr(importlib.import_module(module), owner_name)
    original = getattr(owner, name)

    def syncing(self, *args):
        out = original(self, *args)
        torch.ones(1, device="cuda").item()  # a host sync: illegal while capturing
        return out

    monkeypatch.setattr(owner, name, syncing)
    with pytest.raises(RuntimeError, match=message):
        LLM(dtype="bfloat16", gpu_memory_utilization=0.3, max_num_seqs=4,
            speculative_config={"method": "mtp", "num_speculative_tokens": 3})
