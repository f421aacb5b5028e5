"""Speculative decoding's building blocks: exact verification of drafts, and the n-gram proposer."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lanner.core.request import SamplingParams
from lanner.kernels.sampling_reference import race_sample_ref, row_key
from lanner.sampling.rejection import verify_greedy_drafts, verify_sampled_drafts
from lanner.sampling.sampler import processed_probs
from lanner.config import SpeculativeConfig
from lanner.errors import ConfigError
from lanner.sampling.speculative.ngram import NgramProposer


def ngram(k: int, lo: int, hi: int) -> NgramProposer:
    return NgramProposer(SpeculativeConfig("ngram", k, prompt_lookup_min=lo, prompt_lookup_max=hi))

# ---- verification ---------------------------------------------------------------------------------


def test_greedy_drafts_keep_the_target_samples_up_to_the_first_difference():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7], [1, 2, 3]])
    target = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [4, 6, 7, 8], [1, 2, 3, 4]])
    out = verify_greedy_drafts(drafts, target)
    assert out.num_accepted.tolist() == [3, 1, 0, 3]
    emitted = [row[:n + 1] for row, n in zip(out.tokens.tolist(), out.num_accepted.tolist())]
    assert emitted == [[5, 6, 7, 8], [5, 9], [4], [1, 2, 3, 4]]


SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8),
            dict(temperature=0.9, min_p=0.1, top_k=5)]
V, K, N = 6, 2, 20_000
CHI2_LIMIT = 30.0  # df <= 5: a chance of about 1e-5 for an exact sampler; the seeds are fixed anyway


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of `tokens` against `probs`; a token of probability 0 must never appear."""
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[probs == 0].sum() == 0, "a token the target rules out was emitted"
    expected = probs.double() * len(tokens)
    keep = probs > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def keyed(seeds: range, offset: int, salt: int = 0) -> torch.Tensor:
    return torch.tensor([[row_key(s ^ salt, offset + i) for i in range(K + 1)] for s in seeds], dtype=torch.long)


def distributions() -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits for k+1 positions, and a draft that resembles the target without being it."""
    gen = torch.Generator().manual_seed(7)
    target_logits = torch.randn(K + 1, V, generator=gen) * 1.5
    noise = torch.softmax(torch.randn(K, V, generator=gen) * 1.5, dim=-1)
    return target_logits, 0.6 * torch.softmax(target_logits[:K], dim=-1) + 0.4 * noise


def run_verification(settings: dict, verify) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N requests that share the target and draft distributions but not their seeds: the emitted
    tokens, the number accepted, and the target's probabilities per position."""
    target_logits, draft_probs = distributions()
    params = SamplingParams(**settings)
    p = processed_probs(target_logits, [params] * (K + 1))
    seeds = range(N)
    draft_keys = keyed(seeds, 0, salt=0x5EED)  # the draft's own noise
    drafts = race_sample_ref(draft_probs.repeat(N, 1), draft_keys[:, :K].reshape(N * K, 2)).reshape(N, K)
    out = verify(drafts, draft_probs.expand(N, K, V), p.expand(N, K + 1, V),
                 keyed(seeds, 0, salt=0xACCE)[:, :K], keyed(seeds, 0))
    return out.tokens, out.num_accepted, p


@pytest.mark.parametrize("settings", SETTINGS)
def test_rejection_sampling_emits_the_target_distribution(settings):
    """At every position a token is emitted at, it follows the target's processed distribution
    (temperature, top-k, top-p, min-p), whatever the draft proposed."""
    tokens, accepted, p = run_verification(settings, verify_sampled_drafts)
    for position in range(K + 1):
        reached = accepted >= position  # rows that emit a token at this position
        assert reached.sum() > 1000
        assert chi_square(tokens[reached, position], p[position]) < CHI2_LIMIT, position
    # and the draft helps: more than the first token per verification on average
    assert accepted.float().mean() > 0.3


def resample_from_target(drafts, draft_probs, target_probs, accept_keys, sample_keys):
    """An inexact rule that looks plausible: on a rejection, draw from p instead of the residual
    (the rejected mass goes back to tokens the draft already favoured)."""
    out = verify_sampled_drafts(drafts, draft_probs, target_probs, accept_keys, sample_keys)
    B = drafts.shape[0]
    redraw = race_sample_ref(target_probs[:, 0], sample_keys[:, 0])
    first = torch.where(out.num_accepted > 0, out.tokens[:, 0], redraw)
    out.tokens = torch.cat([first[:, None], out.tokens[:, 1:]], dim=1)
    assert out.tokens.shape[0] == B
    return out


def test_the_statistical_test_catches_an_inexact_rule():
    tokens, accepted, p = run_verification(SETTINGS[0], resample_from_target)
    assert chi_square(tokens[:, 0], p[0]) > 5 * CHI2_LIMIT


def test_sampled_verification_is_batch_independent():
    """A request's outcome depends on its own keys only: the same rows in another batch agree."""
    tokens, accepted, _ = run_verification(SETTINGS[1], verify_sampled_drafts)
    target_logits, draft_probs = distributions()
    p = processed_probs(target_logits, [SamplingParams(**SETTINGS[1])] * (K + 1))
    rows = range(100, 110)
    draft_keys = keyed(rows, 0, salt=0x5EED)
    drafts = race_sample_ref(draft_probs.repeat(10, 1), draft_keys[:, :K].reshape(10 * K, 2)).reshape(10, K)
    alone = verify_sampled_drafts(drafts, draft_probs.expand(10, K, V), p.expand(10, K + 1, V),
                                  keyed(rows, 0, salt=0xACCE)[:, :K], keyed(rows, 0))
    assert torch.equal(alone.num_accepted, accepted[100:110])
    for i, n in enumerate(alone.num_accepted.tolist()):
        assert alone.tokens[i, :n + 1].tolist() == tokens[100 + i, :n + 1].tolist()


# ---- the n-gram proposer ----------------------------------------------------------------------------


@pytest.mark.parametrize("history,k,want", [
    ([1, 2, 3, 1, 2, 3, 1, 2], 3, [3, 1, 2]),  # a repeating stretch continues
    ([7, 1, 2, 9, 5, 1, 2, 8, 7, 1, 2], 3, [9, 5, 1]),  # the longest recurring ending wins
    ([1, 2, 8, 1, 2, 9, 1, 2], 3, [9, 1, 2]),  # among equals, the most recent occurrence
    ([5, 5, 5], 4, [5]),  # an occurrence overlapping the ending; fewer than k tokens follow it
    ([4, 5, 6, 7], 3, []),  # nothing recurs
])
def test_ngram_proposals(history, k, want):
    assert ngram(k, 1, 3).propose(history) == want


def test_ngram_respects_the_shortest_ending():
    assert ngram(2, 2, 4).propose([1, 9, 1]) == []
    assert ngram(2, 2, 4).propose([1, 9, 3, 1, 9]) == [3, 1]
    with pytest.raises(ConfigError):
        ngram(2, 3, 2)


def reference_ngram(history: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(min(hi, len(history) - 1), lo - 1, -1):
        ending = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == ending:
                return history[start + n:start + n + k]
    return []


def test_ngram_matches_a_plain_reference_on_random_histories():
    rng = random.Random(0)
    proposer = ngram(4, 2, 5)
    for _ in range(500):
        history = [rng.randrange(4) for _ in range(rng.randrange(2, 60))]
        assert proposer.propose(history) == reference_ngram(history, 4, 2, 5), history


# ---- the engine with n-gram speculation -------------------------------------------------------------

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
CODE = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
        "import os\nimport sys\nimport os\nimport sys\n", "class A:\n    pass\n\n\nclass B:\n    pass\n\n\nclass"]


def llm(**kwargs):
    from lanner import LLM

    return LLM(device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def plain():
    return llm()


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 24, "max_num_seqs": 4},  # chunked prompts, drafts cut by the token budget
    {"num_kv_blocks": 12, "block_size": 16},  # preemption: drafts of a preempted request are dropped
])
def test_ngram_speculation_changes_no_output(plain, engine_args):
    """Greedy and seeded sampling (n=2), with a penalised and a min_tokens request in the same
    batch (decoded without drafts, and with them): the same tokens as without speculation."""
    kinds = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=40, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=20),
             SamplingParams(temperature=0.7, seed=5, min_tokens=12, max_tokens=30)]
    work = [(p, k) for p in CODE for k in kinds]
    want = plain.generate([p for p, _ in work], [k for _, k in work], use_tqdm=False)
    spec = llm(speculative_config=SPEC, **engine_args)
    got = spec.generate([p for p, _ in work], [k for _, k in work], use_tqdm=False)
    for w, g in zip(want, got):
        for cw, cg in zip(w.outputs, g.outputs):
            assert cg.token_ids == cw.token_ids and cg.text == cw.text
            if cw.logprobs is not None:  # the target's logprobs, from the verifying rows
                assert [list(e) for e in cg.logprobs] == [list(e) for e in cw.logprobs]
    stats = spec.engine.speculator.stats
    assert stats.accepted > 20 and stats.drafts > stats.accepted  # it speculated, and was sometimes wrong
    spec.engine.kv_cache.check_invariants([])
    assert spec.engine.kv_cache.stats().used_blocks == 0
    if engine_args.get("num_kv_blocks"):
        assert spec.engine.scheduler.num_preemptions > 0


def test_penalised_requests_speculate_with_the_same_output(plain):
    """Penalties count the drafts before each verified position, so these requests take drafts
    too (the model's own generation_config asks for a repetition penalty)."""
    kinds = [SamplingParams(temperature=0, repetition_penalty=1.2, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=9, presence_penalty=0.5, frequency_penalty=0.3, max_tokens=40,
                            ignore_eos=True),
             plain.engine.default_sampling_params(seed=11, max_tokens=40)]  # the model's own, seeded
    work = [(p, k) for p in CODE for k in kinds]
    want = plain.generate([p for p, _ in work], [k for _, k in work], use_tqdm=False)
    spec = llm(speculative_config=SPEC)
    got = spec.generate([p for p, _ in work], [k for _, k in work], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert spec.engine.speculator.stats.accepted > 10


def test_blocks_written_by_drafts_serve_prefix_hits_correctly(plain):
    """Rejected drafts leave no KV behind: prompts that extend earlier outputs hit blocks the
    speculating run filled, and still give the outputs of an engine that never speculated."""
    spec = llm(speculative_config=SPEC)
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    first = spec.generate(CODE, greedy, use_tqdm=False)
    longer = [p + o.outputs[0].text for p, o in zip(CODE, first)]
    hits_before = spec.engine.kv_cache.prefix_hits
    got = [o.outputs[0].token_ids for o in spec.generate(longer, greedy, use_tqdm=False)]
    assert spec.engine.kv_cache.prefix_hits - hits_before >= 3 * 16  # the cached blocks were used
    assert got == [o.outputs[0].token_ids for o in plain.generate(longer, greedy, use_tqdm=False)]


def test_speculation_metrics_equal_independent_counts():
    spec = llm(speculative_config=SPEC)
    engine = spec.engine
    proposed, events = [], []
    propose, append = engine.speculator.proposer.propose, engine._append_sampled
    engine.speculator.proposer.propose = lambda ids, k=None: proposed.append(propose(ids, k)) or proposed[-1]
    engine._append_sampled = lambda req, rows, drafts: (events.append(len(rows)), append(req, rows, drafts))[1]
    outs = spec.generate(CODE, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    stats = engine.speculator.stats
    emitted = sum(len(o.outputs[0].token_ids) for o in outs)
    # no stop can cut a verification short here (ignore_eos, drafts never pass max_tokens), so each
    # sampling event emits its accepted drafts and one token of the target's
    assert stats.drafts == sum(len(d) for d in proposed)
    assert stats.accepted == emitted - len(events) and stats.accepted > 0
    assert stats.verifications == sum(1 for rows in events if rows > 1)
    assert sum(stats.accepted_at) == stats.accepted and stats.accepted_at == sorted(stats.accepted_at, reverse=True)


@pytest.mark.parametrize("value,message", [
    ({"method": "medusa", "num_speculative_tokens": 3}, "one of"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "[1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "<="),
])
def test_speculative_config_is_applied_or_refused(value, message):
    from lanner.config import EngineConfig
    from lanner.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        EngineConfig.from_kwargs(speculative_config=value)


def test_speculative_config_flag():
    from lanner.cli import build_parser
    from lanner.config import EngineConfig, kwargs_from_args

    args = build_parser().parse_args(["generate", "x", "--speculative-config", json.dumps(SPEC)])
    assert EngineConfig.from_kwargs(**kwargs_from_args(args, EngineConfig)).speculative_config == SPEC
    serve = build_parser().parse_args(["serve", "--speculative-config", json.dumps(SPEC)])
    assert serve.speculative_config == SPEC


@pytest.mark.parametrize("config", [SPEC, {"method": "eagle3", "num_speculative_tokens": 3}],
                         ids=["ngram", "eagle3"])
def test_the_server_speculates_with_the_same_output(plain, config):
    from fastapi.testclient import TestClient

    from lanner.config import EngineConfig, ServerConfig
    from lanner.engine.engine import LLMEngine
    from lanner.server.app import build_app
    from lanner.serving.async_engine import AsyncEngine

    from lanner.server.metrics import ServerMetrics
    from test_hardening import wait_for

    engine = LLMEngine(EngineConfig.from_kwargs(device="cpu", dtype="float32", speculative_config=config))
    metrics = ServerMetrics()
    app = build_app(AsyncEngine(engine, observer=metrics), ServerConfig(served_model_name=["m"]), metrics)
    want = [o.outputs[0].text for o in plain.generate(CODE, SamplingParams(temperature=0, max_tokens=32,
                                                                           ignore_eos=True), use_tqdm=False)]
    with TestClient(app) as c:
        for prompt, text in zip(CODE, want):
            # the model's generation_config asks for a repetition penalty: the offline run above has none
            body = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": 32, "ignore_eos": True,
                    "repetition_penalty": 1.0}
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == text
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                parts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                         if line.startswith("data: {")]
            assert "".join(parts) == text
        stats = engine.speculator.stats

        def metric(name: str) -> float:
            lines = c.get("/metrics").text.splitlines()
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                       if line.startswith(name + " ") or line.startswith(name + "{"))

        # /metrics reports the engine's counts (sampled after the step that left it idle)
        wait_for(lambda: metric("lanner_spec_decode_draft_tokens_total") == stats.drafts)
        assert metric("lanner_spec_decode_accepted_tokens_total") == stats.accepted > 0
        assert metric("lanner_spec_decode_verifications_total") == stats.verifications
        assert metric("lanner_spec_decode_accepted_tokens_per_pos_total") == stats.accepted
        assert metric('lanner_spec_decode_accepted_tokens_per_pos_total{position="0"}') == stats.accepted_at[0]


def test_get_metrics_and_bench_facts_report_speculation():
    from lanner.bench.runs import _engine_facts

    spec = llm(speculative_config=SPEC)
    spec.generate(CODE, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    stats, got = spec.engine.speculator.stats, spec.get_metrics()
    assert got["spec_draft_tokens"] == stats.drafts > 0 and got["spec_accepted_tokens"] == stats.accepted
    assert got["spec_accepted_per_position"] == stats.accepted_at
    assert got["num_tokens_generated"] == 3 * 24
    assert _engine_facts(spec)["spec_mean_acceptance_length"] == round(stats.mean_acceptance_length, 3) > 1


def test_bench_code_edits_workload(tmp_path):
    """`lanner bench speculative --workload edits` (7c): each prompt holds a held-out window, then
    a header announcing the same code with its most frequent identifier renamed and the edited
    copy's first lines; the n-gram proposer finds most of the answer in the prompt."""
    import json

    from lanner import LLM
    from lanner.bench.speculative import prompts_for_code_edits
    from lanner.cli import main

    tokenizer = LLM(device="cpu").get_tokenizer()
    prompts = prompts_for_code_edits(tokenizer, 2, 128)
    for ids in prompts:
        text = tokenizer.decode(ids)
        code, header = text.split("\n\n# ---- the same code, with `")
        old, rest = header.split("` renamed to `")
        new, begun = rest.split("` ----\n")
        assert new == old + "_v2" and old in code and begun.strip()
        assert code.startswith(begun.replace(new, old).rstrip("\n").split("\n")[0])  # the copy's first lines
    out = tmp_path / "edits.json"
    assert main(["bench", "speculative", "--workload", "edits", "--methods", "ngram", "--k", "4", "--batch-sizes", "1",
                 "--num-prompts", "2", "--input-len", "128", "--output-len", "24", "--repeats", "1", "--device", "cpu",
                 "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["workload"]["workload"] == "edits"
    run = record["results"]["runs"][0]
    assert run["outputs_identical"] == "2/2" and run["mean_acceptance_length"] > 2
