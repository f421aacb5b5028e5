"""Sampling: the distributions that temperature, top-k, top-p and min-p define,
penalties, min_tokens, per-request seeds, stop strings."""
from __future__ import annotations

import pytest
import torch

from conftest import make_llm
from lanner import SamplingParams
from lanner.core.request import Request
from lanner.sampling.sampler import (
    PenaltyCounts,
    RowLogprobs,
    Sampler,
    apply_penalties,
    prompt_logprob_entries,
    processed_probs,
    prompt_logprobs,
)

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


def expected_probs(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """An independent, one-row statement of the semantics (LOGITS is sorted)."""
    p = torch.softmax(LOGITS / temperature, dim=0)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    p = torch.where(keep, p, 0) / torch.where(keep, p, 0).sum()
    mass = 0.0
    for i in range(len(p)):
        if mass >= top_p:
            keep[i] = False
        mass += p[i].item()
    keep &= p >= min_p * p.max()
    p = torch.where(keep, p, 0)
    return p / p.sum()


def requests(n: int, params: SamplingParams, seed0: int = 0) -> list[Request]:
    return [Request(f"r{i}", None, [1], params, {0}, seed0 + i) for i in range(n)]


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.6),
    dict(min_p=0.2), dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)])
def test_sampling_distribution(kw):
    n = 20000
    params = SamplingParams(**kw)
    tokens = Sampler()(LOGITS.repeat(n, 1), requests(n, params)).tokens.tolist()
    freq = torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)).float() / n
    want = expected_probs(**kw)
    assert torch.all(freq[want == 0] == 0), (freq, want)
    assert (freq - want).abs().max() < 0.015, (freq, want)


def test_greedy_is_argmax_and_ignores_generator():
    tokens = Sampler()(torch.stack([LOGITS, LOGITS.flip(0)]), requests(2, SamplingParams(temperature=0))).tokens.tolist()
    assert tokens == [0, len(LOGITS) - 1]


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0)
    alone = [Sampler()(LOGITS[None], [r]).tokens.tolist()[0] for r in requests(1, params, seed0=42) * 1]
    batch = requests(5, params, seed0=40)  # row 2 has seed 42
    together = Sampler()(LOGITS.repeat(5, 1), batch).tokens.tolist()[2]
    assert alone[0] == together


def test_penalties_follow_their_definitions():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    req = Request("r", None, [0, 4], params, set())
    for t in (1, 1, 6):
        req.append_token(t)
    out = apply_penalties(LOGITS[None].clone(), [req])[0]
    want = LOGITS.clone()
    for t in {0, 4, 1, 6}:  # repetition: prompt and output, sign-aware
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    want[1] -= 0.5 + 2 * 0.25
    want[6] -= 0.5 + 0.25
    torch.testing.assert_close(out, want)


def test_penalties_count_the_pending_token_from_the_device():
    """Under overlap scheduling the newest token is still on the device when the next step samples."""
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25)
    req = Request("r", None, [0], params, set())
    req.append_token(1)
    req.num_pending, req.sample_row = 1, 2
    out = apply_penalties(LOGITS[None].clone(), [req], last_sampled=torch.tensor([7, 7, 6]))[0]
    want = LOGITS.clone()
    for t in (0, 1, 6):
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    want[1] -= 0.25
    want[6] -= 0.25
    torch.testing.assert_close(out, want)


def test_min_tokens_masks_stop_tokens():
    params = SamplingParams(temperature=0, min_tokens=2)
    req = Request("r", None, [1], params, {0})  # token 0 (the argmax) is EOS
    assert Sampler()(LOGITS[None].clone(), [req]).tokens.tolist() == [1]
    req.append_token(1)
    req.append_token(1)
    assert Sampler()(LOGITS[None].clone(), [req]).tokens.tolist() == [0]


def test_seed_reproducible_across_batch_compositions(qwen3_path):
    llm = make_llm(qwen3_path)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.9, max_tokens=14, ignore_eos=True)
    mixed = llm.generate([[9] * 17, [5, 6, 7, 8], [3, 4]], [others, seeded, others])
    assert mixed[1].outputs[0].token_ids == alone
    chunked = make_llm(qwen3_path, max_num_batched_tokens=3)
    assert chunked.generate([[9] * 17, [5, 6, 7, 8]], [others, seeded])[1].outputs[0].token_ids == alone


def test_n_samples_differ_and_are_reproducible(qwen3_path):
    llm = make_llm(qwen3_path)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], params)[0]
    b = llm.generate([[5, 6, 7]], params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_stop_strings_end_and_are_cut(qwen3_path):
    llm = make_llm(qwen3_path)
    base = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = base.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {text!r}"
    first = text.find(stop)
    out = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                       stop=[stop, "never-appears"]))[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                        include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:first + len(stop)]


def test_stop_token_ids_and_eos(qwen3_path):
    llm = make_llm(qwen3_path)
    base = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    target = base.outputs[0].token_ids[4]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[target]))[0]
    got = out.outputs[0]
    assert got.token_ids == base.outputs[0].token_ids[:base.outputs[0].token_ids.index(target) + 1]
    assert got.finish_reason == "stop" and got.stop_reason == target


@pytest.mark.parametrize("kind", ["greedy", "seeded", "stops", "penalties"])
def test_overlap_scheduling_changes_no_output(qwen3_path, kind):
    """Overlap scheduling launches step N before reading back N-1; outputs, finish
    reasons and freed blocks are the same as running steps in turn, with chunked
    prefill, prefix hits, n > 1, stops at every step, and preemption (few blocks)."""
    prompts = [[5, 6, 7, 8] * 5, [5, 6, 7, 8] * 5 + [9], [3] * 37, [11, 12]]
    base = dict(max_tokens=12, ignore_eos=True)
    params = {
        "greedy": [SamplingParams(temperature=0, **base)] * 4,
        "seeded": [SamplingParams(temperature=1.0, seed=i, n=1 + i % 2, **base) for i in range(4)],
        "stops": [SamplingParams(temperature=0, max_tokens=12, min_tokens=i) for i in range(4)],
        "penalties": [SamplingParams(temperature=0.8, seed=3, **base),
                      SamplingParams(temperature=0, repetition_penalty=1.3, **base),
                      SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5, **base),
                      SamplingParams(temperature=0, **base)],
    }[kind]
    results = []
    for overlap in (False, True):
        llm = make_llm(qwen3_path, num_kv_blocks=16, block_size=4, max_num_batched_tokens=16,
                       overlap_scheduling=overlap)
        outs = llm.generate(prompts, params)
        results.append([[(o.token_ids, o.finish_reason, o.text) for o in r.outputs] for r in outs])
        assert llm.engine.kv_cache.stats().used_blocks == 0 and llm.engine.in_flight is None
        overlapped = llm.engine.num_overlapped_steps
        assert overlapped == 0 if not overlap else overlapped > 0
        llm.engine.kv_cache.check_invariants([])
        if kind == "greedy":
            assert llm.engine.scheduler.num_preemptions > 0  # the case is meant to preempt
    assert results[0] == results[1]


def test_the_race_noise_is_positive_and_finite_at_the_extreme_hashes():
    """U = 1 would make E = 0: that token wins whatever its probability, and a masked-out token
    (probability 0) would race NaN, which argmax picks (found through structured outputs)."""
    from lanner.kernels.sampling_reference import race_sample_ref, uniform_of_hash

    u = uniform_of_hash(torch.tensor([0, 1, 0xFFFFFFFE, 0xFFFFFFFF], dtype=torch.long))
    assert (u > 0).all() and (u < 1).all() and torch.isfinite(-torch.log(u)).all()
    probs = torch.zeros(512, 8192)
    probs[:, 7] = 1.0  # every other token masked out
    keys = torch.randint(0, 1 << 32, (512, 2))
    assert (race_sample_ref(probs, keys) == 7).all()


def reference_entry(logprobs: torch.Tensor, token: int, n: int) -> dict:
    """One row's entry, stated directly: the chosen token's logprob and rank (1 + the tokens
    strictly more likely), then the n most likely tokens by rank."""
    entry = {token: (logprobs[token].item(), int((logprobs > logprobs[token]).sum()) + 1)}
    order = sorted(range(len(logprobs)), key=lambda t: -logprobs[t].item())
    for rank, t in enumerate(order[:n], start=1):
        entry.setdefault(t, (logprobs[t].item(), rank))
    return entry


def test_row_logprobs_match_their_definition_per_row():
    g = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(6, 50, generator=g), dim=-1)
    logprobs[2, 7] = logprobs[2, 9] = logprobs[2].max() + 0.1  # a tie at the top: both rank 1 when chosen
    tokens, counts = [3, 0, 7, 49, 5, 9], [0, 1, 5, 3, 2, 4]
    rows = RowLogprobs.of(logprobs, torch.tensor(tokens), max(counts)).to_host()
    entries = rows.entries(tokens, counts)
    for j, entry in enumerate(entries):
        got = [(t, round(lp.logprob, 5), lp.rank) for t, lp in entry.items()]
        want = [(t, round(v, 5), r) for t, (v, r) in reference_entry(logprobs[j], tokens[j], counts[j]).items()]
        if j == 2:  # the tied pair may come in either order among the top ones (tokens 7 and 9)
            got, want = [e for e in got if e[0] != 9], [e for e in want if e[0] != 9]
        assert got == want, j
    assert entries[2][7].rank == 1 and 9 in entries[2]


def test_prompt_logprobs_in_pieces_equal_one_piece():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 40, generator=g)
    rows = [(Request("a", None, [1], SamplingParams(prompt_logprobs=2), {0}, 0), 2, [5, 6, 7]),
            (Request("b", None, [1], SamplingParams(prompt_logprobs=0), {0}, 0), 5, [1, 2, 3, 4, 39])]
    whole = prompt_logprob_entries([p.to_host() for p in prompt_logprobs(logits, rows)], rows)
    pieces = prompt_logprobs(logits, rows, max_elements=2 * 40)
    assert len(pieces) == 4
    assert prompt_logprob_entries([p.to_host() for p in pieces], rows) == whole
    lp = torch.log_softmax(logits, dim=-1)
    assert [list(e) for e in whole["b"]] == [[t] for t in (1, 2, 3, 4, 39)]
    assert whole["a"][1][6].logprob == pytest.approx(lp[3, 6].item())
    assert len(whole["a"][0]) in (2, 3) and whole["b"][4][39].logprob == pytest.approx(lp[9, 39].item())


def test_reading_a_step_back_runs_no_device_work(qwen3_path, monkeypatch):
    """Logprobs are computed when the step is launched and copied back with its tokens; reading
    them row by row after the step (.item(), topk) cost device round trips and, under overlap
    scheduling, waited for the next step each time."""
    from lanner.executor import step_handle

    llm = make_llm(qwen3_path)
    result = step_handle.StepHandle.result

    def host_only(handle):
        with monkeypatch.context() as m:
            for name in ("topk", "item", "gather", "__getitem__"):
                m.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in result()"))
            m.setattr(torch, "log_softmax", lambda *a, **k: pytest.fail("log_softmax in result()"))
            return result(handle)

    monkeypatch.setattr(step_handle.StepHandle, "result", host_only)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs) == 5 and len(out.prompt_logprobs) == 5
    assert all(len(e) in (3, 4) for e in out.outputs[0].logprobs)


def test_penalty_counts_kept_across_steps_equal_counts_made_afresh(monkeypatch):
    """The sampler keeps each request's counts on the device and adds the tokens read back since
    its last step; a later step uploads those tokens only, not the request's whole history."""
    import lanner.sampling.penalties as penalties

    vocab, g = 50, torch.Generator().manual_seed(3)
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(presence_penalty=0.4, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.2), SamplingParams()]
    reqs = [Request(f"r{i}", None, torch.randint(0, vocab, (300,), generator=g).tolist(), p, set())
            for i, p in enumerate(params)]
    kept = PenaltyCounts(vocab, torch.device("cpu"))
    uploads = []
    to_device = penalties.to_device
    monkeypatch.setattr(penalties, "to_device", lambda values, *a: uploads.append(len(values)) or to_device(values, *a))
    for step in range(6):
        for r in reqs:  # each step reads back a token; every other step one more is pending
            r.append_token(int(torch.randint(0, vocab, (), generator=g)))
            r.num_pending, r.sample_row = step % 2, reqs.index(r)
        last = torch.randint(0, vocab, (len(reqs),), generator=g)
        logits = torch.randn(len(reqs), vocab, generator=g)
        uploads.clear()
        got = apply_penalties(logits.clone(), reqs, last, counts=kept)
        if step:
            assert max(uploads) <= len(reqs)  # the new tokens, not the 300-token prompts
        torch.testing.assert_close(got, apply_penalties(logits.clone(), reqs, last))


def test_a_finished_requests_penalty_row_is_reused():
    import gc

    counts = PenaltyCounts(20, torch.device("cpu"))
    reqs = [Request(f"r{i}", None, [1, 2], SamplingParams(repetition_penalty=1.5), set()) for i in range(8)]
    counts.rows_of(reqs)
    assert counts.output.shape[0] == 8 and not counts.free
    del reqs
    gc.collect()
    assert sorted(counts.free) == list(range(8))
    again = Request("again", None, [3], SamplingParams(repetition_penalty=1.5), set())
    again.append_token(4)
    row = counts.rows_of([again]).item()
    assert counts.output.shape[0] == 8  # a reused row, which starts clean
    assert counts.prompt[row].nonzero().flatten().tolist() == [3]
    assert counts.output[row].nonzero().flatten().tolist() == [4] and counts.output[row].sum() == 1


def test_rows_with_a_small_top_k_filter_topk_candidates_as_a_sort_would(monkeypatch):
    """Rows with top_k <= TOP_K_FIRST take their candidates with topk; the probabilities equal
    the sorted path's, and a row's are the same alone and in a batch that mixes both paths."""
    import lanner.sampling.sampler as sampler

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 4000, generator=g) * 3
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95), SamplingParams(temperature=1.0),
              SamplingParams(top_k=3000, top_p=0.5), SamplingParams(temperature=0.9, top_k=1, min_p=0.1),
              SamplingParams(top_k=200, top_p=0.99, min_p=0.01)]
    batch = processed_probs(logits, params)
    alone = torch.cat([processed_probs(logits[i:i + 1], [p]) for i, p in enumerate(params)])
    monkeypatch.setattr(sampler, "TOP_K_FIRST", 0)
    sorted_path = processed_probs(logits, params)
    torch.testing.assert_close(batch, alone)
    torch.testing.assert_close(batch, sorted_path)
    assert (batch[0] > 0).sum() <= 20 and (batch[3] > 0).sum() == 1 and (batch[1] > 0).sum() > 3900
    # neither top-k nor top-p: no order needed, and min-p alone cuts relative to the most likely
    torch.testing.assert_close(batch[1], torch.softmax(logits[1], dim=-1))
    probs = torch.softmax(logits[2:3] / 0.8, dim=-1)
    kept = torch.where(probs >= 0.05 * probs.max(), probs, 0)
    torch.testing.assert_close(processed_probs(logits[2:3], [SamplingParams(temperature=0.8, min_p=0.05)]),
                               kept / kept.sum())


def test_a_rows_top_k_candidates_do_not_depend_on_its_batch_when_logits_tie():
    """bf16 logits tie often; were the candidates the batch's largest top_k, the tokens tied at a
    row's k-th place would be kept or not depending on the rows beside it."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 20000, generator=g) * 2).to(torch.bfloat16).float()
    logits[:, 100:140] = logits[0].max() + 1  # 40 tokens tied at the top: top_k=20 cuts through them
    small, large = SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=0.8, top_k=700)
    alone = processed_probs(logits[:1], [small])
    beside = processed_probs(logits, [small, large])[:1]
    assert torch.equal(alone, beside) and (alone > 0).sum() == 20


def test_top_p_one_keeps_the_whole_tail():
    """top_p=1 drops nothing, though a float32 cumulative sum reaches 1 before the last tokens."""
    logits = torch.full((1, 60000), -30.0)
    logits[0, 0] = 0.0  # its probability rounds to 1: every other token's mass "before" it is 1
    probs = processed_probs(logits, [SamplingParams(top_k=50000, top_p=1.0)])
    assert (probs > 0).sum() == 50000


def test_top_p_alone_keeps_every_token_tied_at_its_threshold():
    """Top-p without top-k filters by a probability threshold (a search on the GPU, not a sort):
    tokens tied with the nucleus's least likely one are all kept, where the sort kept those its
    order put first; elsewhere the two keep the same tokens, and a row keeps the same alone."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 3000, generator=g)
    logits[0, :10] = 9.0  # ten tied tokens hold ~0.94 of the mass: top_p 0.5 cuts through them
    params = [SamplingParams(top_p=0.5), SamplingParams(temperature=0.7, top_p=0.8),
              SamplingParams(temperature=0.9, top_p=0.9, min_p=0.02)]
    batch = processed_probs(logits, params)
    alone = torch.cat([processed_probs(logits[i:i + 1], [p]) for i, p in enumerate(params)])
    assert torch.equal(batch, alone)
    assert (batch[0] > 0).sum() == 10 and torch.equal(batch[0, :10], torch.full((10,), 0.1))
    for row, p in enumerate(params[1:], start=1):
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < p.top_p
        keep &= ordered >= p.min_p * ordered[0]
        expected = torch.zeros_like(probs).scatter(0, order, torch.where(keep, ordered, 0.0))
        torch.testing.assert_close(batch[row], expected / expected.sum())


def test_top_p_search_kernel_in_the_sampler(monkeypatch):
    """The GPU path's filter, run here in Triton's interpreter in place of the reference, keeps the
    same tokens; a top_p that is 0 or 1 in float32 keeps the most likely token or every token."""
    import lanner.sampling.sampler as sampler
    from lanner.kernels.top_p import top_p_threshold

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 5000, generator=g) * 3
    logits[3] = -30.0
    logits[3, 0] = 0.0  # its probability rounds to 1: a float32 sum reaches 1 before the tail
    params = [SamplingParams(temperature=0.6, top_p=0.9), SamplingParams(top_p=0.5, min_p=0.05),
              SamplingParams(top_p=1e-50), SamplingParams(top_p=0.99999999)]
    want = processed_probs(logits, params)
    monkeypatch.setattr(sampler, "top_p_threshold_ref", top_p_threshold)
    got = processed_probs(logits, params)
    assert torch.equal(got > 0, want > 0) and not got.isnan().any()
    assert (got[2] > 0).sum() == 1 and (got[3] > 0).sum() == 5000
