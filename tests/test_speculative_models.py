"""Model proposers (draft_model, eagle3, mtp) on lanner-tiny: outputs identical to decoding
without speculation under chunking, prefix hits and preemption; drafts equal to a plain
full-sequence reference (HF transformers for the target's states, lanner.models.tiny's
unrolled heads); KV invariants; metrics; refused configs; a failing drafter."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lanner.core.request import SamplingParams
from lanner.default_model import DEFAULT_MODEL, DRAFT_MODEL
from lanner.errors import ConfigError
from lanner.models import tiny
from lanner.models.eagle3 import read_config

K = 3
CODE = ["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    \"\"\"Multiply.\"\"\"\n"
        "    return",
        "import os\nimport sys\nimport json\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser()\n"
        "    parser.add_argument('--out')\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
        "        self.items.append(item)\n\n    def pop(self):"]


def llm(**kwargs):
    from lanner import LLM

    return LLM(device="cpu", dtype="float32", **kwargs)


def spec_config(method: str, heads: dict, k: int = K) -> dict:
    return {"method": method, "num_speculative_tokens": k, "model": heads[method]}


@pytest.fixture(scope="module")
def plain():
    return llm()


KINDS = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
         SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=32, ignore_eos=True, logprobs=2),
         SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=24)]


@pytest.mark.parametrize("method", ["draft_model", "eagle3", "mtp"])
@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 16, "max_num_seqs": 4},  # chunked prompts, the draft's first pass chunked too
    {"num_kv_blocks": 14, "block_size": 16},  # preemption
])
def test_model_proposers_change_no_output(plain, heads, method, engine_args):
    spec = llm(speculative_config=spec_config(method, heads), **engine_args)
    _assert_same_outputs(plain, spec)
    if method == "draft_model":  # the trained draft agrees with the target often; random heads seldom do
        assert spec.engine.speculator.stats.accepted > 30
    if engine_args.get("num_kv_blocks"):
        assert spec.engine.scheduler.num_preemptions > 0


def test_a_draft_model_over_an_fp8_target_cache_changes_no_output(heads):
    """kv_cache_dtype=fp8 quantizes the target's cache (the draft's stays in the model's dtype): the
    verify steps read the same fp8 values as plain decoding, so the outputs are plain fp8 decoding's."""
    spec = llm(kv_cache_dtype="fp8", speculative_config=spec_config("draft_model", heads))
    _assert_same_outputs(llm(kv_cache_dtype="fp8"), spec)
    assert spec.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert spec.engine.speculator.stats.accepted > 30


def _assert_same_outputs(plain, spec):
    work = [(p, k) for p in CODE for k in KINDS]
    want = plain.generate([p for p, _ in work], [k for _, k in work], use_tqdm=False)
    got = spec.generate([p for p, _ in work], [k for _, k in work], use_tqdm=False)
    for w, g in zip(want, got):
        for cw, cg in zip(w.outputs, g.outputs):
            assert cg.token_ids == cw.token_ids and cg.text == cw.text
            if cw.logprobs is not None:
                assert [list(e) for e in cg.logprobs] == [list(e) for e in cw.logprobs]
    stats = spec.engine.speculator.stats
    assert stats.verifications > 20 and stats.drafts > stats.accepted
    spec.engine.kv_cache.check_invariants([])
    assert spec.engine.kv_cache.stats().used_blocks == 0


# ---- drafts against a plain reference -----------------------------------------------------------

class Reference:
    """What each proposer should draft after a context, recomputed from scratch."""

    def __init__(self, heads: dict):
        from conftest import hf_model

        self.target = hf_model(DEFAULT_MODEL)
        self.draft = hf_model(DRAFT_MODEL)
        self.heads = {m: (load_file(os.path.join(heads[m], "model.safetensors")), read_config(heads[m]))
                      for m in ("eagle3", "mtp")}

    @torch.no_grad()
    def drafts(self, method: str, context: list[int], k: int) -> list[int]:
        if method == "draft_model":
            from conftest import hf_greedy

            return hf_greedy(self.draft, [context], k)[0]
        params, cfg = self.heads[method]
        params = {n: t.float() for n, t in params.items()}
        n = len(context) - 1
        states = self.target(torch.tensor([context]), output_hidden_states=True).hidden_states
        if method == "eagle3":
            layers = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
            hidden = torch.cat([states[i][:, :n] for i in layers], -1)
            head = params["lm_head.weight"]
        else:
            hidden, head = states[-1][:, :n], self.target.lm_head.weight
        embed = self.target.model.embed_tokens.weight
        tokens, out = [torch.tensor([context[1:]])], []
        for s in range(k):
            normed = tiny.unrolled_head(method, params, cfg, embed, tokens, hidden)[s]
            token = int((normed[0, n - 1] @ head.t()).argmax())
            if method == "eagle3":
                token += int(params["d2t"][token])
            out.append(token)
            nxt = tokens[0].clone()
            nxt[0, n - 1] = token
            tokens.append(nxt)
        return out


def recorded_proposals(engine) -> list[tuple[list[int], list[int]]]:
    """(the request's tokens, the proposals read back after them), as each request's proposals
    are read back."""
    seen, read_back = [], engine._fill_unread_drafts
    engine._fill_unread_drafts = lambda req: (
        seen.append((list(req.all_token_ids), list(req.proposed_token_ids))) if req.proposed_token_ids else None,
        read_back(req))[1]
    return seen


@pytest.mark.parametrize("method", ["draft_model", "eagle3", "mtp"])
def test_drafts_equal_a_plain_reference(heads, method):
    """With chunked prompts and prefix hits on blocks that an earlier, speculating run filled
    (their draft KV must be right too), every proposal equals the reference's."""
    spec = llm(speculative_config=spec_config(method, heads), max_num_batched_tokens=16, max_num_seqs=4)
    seen = recorded_proposals(spec.engine)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = spec.generate(CODE, greedy, use_tqdm=False)
    hits = spec.engine.kv_cache.prefix_hits
    # the first two blocks of each earlier prompt then other tokens: a head's KV at the end of a
    # cached block depends on the token after it, which differs now
    ids = [o.prompt_token_ids[:32] + o.prompt_token_ids[40:] + o.outputs[0].token_ids for o in first]
    spec.generate([{"prompt_token_ids": p} for p in ids], greedy, use_tqdm=False)
    assert spec.engine.kv_cache.prefix_hits > hits
    ref = Reference(heads)
    checked = seen[::3] + seen[-6:]  # a sample, and the second run's last proposals
    assert len(checked) > 10
    for context, proposed in checked:  # (one draft while a request probes: engine/speculation.py)
        assert proposed == ref.drafts(method, context, K)[:len(proposed)], f"after {len(context)} tokens"
    assert sum(len(proposed) == K for _, proposed in checked) > 10


@pytest.mark.parametrize("method", ["draft_model", "eagle3", "mtp"])
def test_drafts_after_kv_only_passes_equal_a_plain_reference(heads, method, monkeypatch):
    """Every third verification pauses the request for 3 steps, two of which run only the draft's
    `fill_kv`: the proposals after each pause still equal the reference's (the KV-only passes
    wrote the KV the full pass would have; with a no-op fill_kv the random heads' proposals
    differ)."""
    from lanner.engine.speculation import Speculator

    spec = llm(speculative_config={**spec_config(method, heads), "adaptive": False})
    fills, record = [0], Speculator.record
    net = spec.engine.runner.drafter.net
    fill_kv = net.fill_kv
    monkeypatch.setattr(net, "fill_kv", lambda *a: (fills.__setitem__(0, fills[0] + 1), fill_kv(*a))[1])

    def pausing(self, req, drafts, samples):
        accepted = record(self, req, drafts, samples)
        if self.stats.verifications % 3 == 0:
            req.spec_pause = 3
        return accepted

    monkeypatch.setattr(Speculator, "record", pausing)
    monkeypatch.setattr(Speculator, "PAUSE_FROM_BATCH", 1)
    seen = recorded_proposals(spec.engine)
    spec.generate(CODE[:1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert fills[0] >= 4  # two KV-only steps a pause (the third is planned as it ends)
    ref = Reference(heads)
    assert len(seen) > 5
    for context, proposed in seen:
        assert proposed == ref.drafts(method, context, K), f"after {len(context)} tokens"


def test_the_embedded_model_has_its_own_draft_by_default(plain):
    spec = llm(speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    out = spec.generate(CODE[:1], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert out[0].outputs[0].token_ids == plain.generate(CODE[:1], SamplingParams(temperature=0, max_tokens=16),
                                                         use_tqdm=False)[0].outputs[0].token_ids
    assert spec.engine.speculator.stats.accepted > 0


def test_model_proposer_metrics_equal_independent_counts(heads):
    spec = llm(speculative_config=spec_config("draft_model", heads))
    engine = spec.engine
    verified = []
    append = engine._append_sampled
    engine._append_sampled = lambda req, rows, drafts: (verified.append((list(drafts), [t for t, _ in rows])),
                                                        append(req, rows, drafts))[1]
    spec.generate(CODE, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    stats = engine.speculator.stats
    with_drafts = [(d, s) for d, s in verified if d]
    accepted = [next((i for i, (a, b) in enumerate(zip(d, s)) if a != b), len(d)) for d, s in with_drafts]
    assert stats.verifications == len(with_drafts) and stats.drafts == sum(len(d) for d, _ in with_drafts)
    assert stats.accepted == sum(accepted) > 0
    assert stats.accepted_at == [sum(a > j for a in accepted) for j in range(K)]


def test_a_failing_drafter_fails_its_step_and_the_engine_goes_on(plain, heads):
    spec = llm(speculative_config=spec_config("eagle3", heads))
    engine = spec.engine
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", CODE[0], greedy)
    engine.step()
    propose = engine.runner.drafter.propose

    def broken(*args):
        engine.runner.drafter.propose = propose
        raise RuntimeError("drafter failed")

    engine.runner.drafter.propose = broken
    with pytest.raises(RuntimeError, match="drafter failed"):
        engine.step()
    assert engine.fail_step() == ["a"]
    engine.add_request("b", CODE[1], greedy)
    finish_alone(engine, "b", plain, greedy)


def finish_alone(engine, request_id: str, plain, params: SamplingParams) -> None:
    """Step the engine to the end: only `request_id` (prompt CODE[1]) finishes, with the output of
    an engine that never speculated, and no block stays used."""
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == [request_id]
    assert outs[0].outputs[0].token_ids == plain.generate(CODE[1], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.kv_cache.check_invariants([])
    assert engine.kv_cache.stats().used_blocks == 0


def test_aborting_a_speculating_request_frees_its_blocks_and_spares_the_others(plain, heads):
    spec = llm(speculative_config=spec_config("mtp", heads))
    engine = spec.engine
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", CODE[0], greedy)
    engine.add_request("b", CODE[1], greedy)
    for _ in range(4):
        engine.step()
    assert engine.abort_request("a").finished
    finish_alone(engine, "b", plain, greedy)


@pytest.mark.parametrize("value,message", [
    ({"method": "eagle3", "num_speculative_tokens": 2, "model": "/nonexistent/head"}, "neither a local folder"),
    ({"method": "mtp", "num_speculative_tokens": 2, "model": DRAFT_MODEL}, "no MTP layer"),
    ({"method": "eagle3", "num_speculative_tokens": 2, "model": DRAFT_MODEL}, "num_hidden_layers must be 1"),
])
def test_model_proposer_configs_are_refused_clearly(value, message):
    with pytest.raises(ConfigError, match=message):
        llm(speculative_config=value)


def test_a_draft_model_must_share_the_tokenizer(qwen3_path):
    with pytest.raises(ConfigError, match="vocabulary"):
        llm(model=qwen3_path, speculative_config={"method": "draft_model", "num_speculative_tokens": 2,
                                                  "model": DRAFT_MODEL})
    with pytest.raises(ConfigError, match="needs \"model\""):
        llm(model=qwen3_path, speculative_config={"method": "eagle3", "num_speculative_tokens": 2})


@pytest.mark.parametrize("samples", [[], ["--no-replay-samples"]])
def test_bench_replay_mode_sets_the_acceptance_length(tmp_path, samples):
    """`lanner bench speculative --replay`: the head runs, its drafts are the recorded greedy
    continuation kept with probability p: p=1 accepts every draft, p=0 none, and the outputs equal
    the run without speculation (with --no-replay-samples, from the target's own samples)."""
    from lanner.cli import main
    from lanner.models.tiny import eagle3_config

    with open(os.path.join(DEFAULT_MODEL, "config.json")) as f:
        head = tmp_path / "head.json"
        head.write_text(json.dumps(eagle3_config(json.load(f), 1024, 128)))
    out = tmp_path / "replay.json"
    assert main(["bench", "speculative", "--replay", "1.0", "0.0", "--k", "3", "2", "--batch-sizes", "1", "3",
                 "--output-len", "13", "--input-len", "16", "--config", os.path.join(DEFAULT_MODEL, "config.json"),
                 "--head-config", str(head), "--output-json", str(out), *samples]) == 0
    runs = json.loads(out.read_text())["results"]["runs"]
    assert [(r["k"], r["batch"]) for r in runs] == [(3, 1), (3, 3), (2, 1), (2, 3)]
    assert all(r["outputs_identical"] == f"{r['batch']}/{r['batch']}" for r in runs)
    assert [r["mean_acceptance_length"] for r in runs if r["p"] == 1.0] == [4.0, 4.0]  # 13 = 1 + 3 x 4 tokens
    assert [r["mean_acceptance_length"] for r in runs if r["p"] == 0.0] == [1.0, 1.0]


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_speculation_up_to_the_context_end(heads, method):
    """Requests that run into max_model_len: drafts are cut to the room left, the drafter's
    positions past the last allocated block write nothing, and the outputs (and their length) are
    those of the engine without speculation."""
    import random

    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 8000) for _ in range(n)]} for n in (20, 41, 47, 50, 62)]
    greedy = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    want = llm(max_model_len=64, block_size=16).generate(prompts, greedy, use_tqdm=False)
    spec = llm(max_model_len=64, block_size=16, num_kv_blocks=12, speculative_config=spec_config(method, heads, k=5))
    got = spec.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 64 for o in got)
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    spec.engine.kv_cache.check_invariants([])
    assert spec.engine.kv_cache.stats().used_blocks == 0
