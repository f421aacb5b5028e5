"""Structured outputs through the engine (xgrammar): every constrained output matches its spec,
over many seeds; the others in the batch are untouched; overlap scheduling, speculation,
chunking, prefix hits and preemption change no token; compilation runs off the step loop."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from lanner import LLM, SamplingParams
from lanner.core.structured import StructuredOutputsParams
from lanner.engine.grammar import MAX_WHITESPACE_RUN
from lanner.errors import InvalidRequest

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "# config\n", "x = [", "return {"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ._-]{0,10}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z ._-]{0,5}$"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "city": {"type": "string", "pattern": "^[A-Za-z ._-]{0,8}$"}},
                    "required": ["zip", "city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def llm(**kwargs) -> LLM:
    return LLM(device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def plain():
    return llm()


def constrained(spec: dict, seed: int = 0, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "n": n, "max_tokens": 160, **kw},
                          structured_outputs=spec)


def texts(outs) -> list[str]:
    return [c.text for o in outs for c in o.outputs]


def test_json_schema_outputs_validate_over_many_seeds(plain):
    spec = {"json": PERSON, "disable_any_whitespace": True}
    outs = plain.generate(PROMPTS * 4, [constrained(spec, seed=s) for s in range(24)], use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


def test_json_with_whitespace_and_json_object(plain):
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9,
                                                                              "minimum": 0}},
             "required": ["ok", "n"]}
    outs = plain.generate(PROMPTS, [constrained({"json": json.dumps(small)}, seed=s, max_tokens=None)
                                    for s in range(6)], use_tqdm=False)
    for text in texts(outs):
        jsonschema.validate(json.loads(text), small)
    outs = plain.generate(PROMPTS, [SamplingParams(temperature=0.7, seed=s, max_tokens=400,
                                                   structured_outputs={"json_object": True})
                                    for s in range(6)], use_tqdm=False)
    finished = [c.text for o in outs for c in o.outputs if c.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(t), dict) for t in finished)


def test_regex_choice_and_grammar(plain):
    regex = r"(Mon|Tue|Wed) [0-9]{1,2}:[0-5][0-9] (am|pm)"
    outs = plain.generate(PROMPTS, [constrained({"regex": regex}, seed=s) for s in range(6)], use_tqdm=False)
    assert all(re.fullmatch(regex, t) for t in texts(outs))
    choices = ["yes", "no", "maybe not", "naïve ✓"]
    outs = plain.generate(PROMPTS * 3, [constrained({"choice": choices}, seed=s) for s in range(18)], use_tqdm=False)
    got = texts(outs)
    assert set(got) <= set(choices) and len(set(got)) > 1
    grammar = 'root ::= "(" expr ")"\nexpr ::= num (("+" | "*") num)*\nnum ::= [1-9] [0-9]?'
    outs = plain.generate(PROMPTS, [constrained({"grammar": grammar}, seed=s, max_tokens=None) for s in range(6)],
                          use_tqdm=False)
    assert all(re.fullmatch(r"\([1-9][0-9]?([+*][1-9][0-9]?)*\)", t) for t in texts(outs))


def test_a_constrained_request_leaves_the_others_unchanged(plain):
    free = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.9, seed=4, max_tokens=24, ignore_eos=True, logprobs=2)]
    alone = plain.generate(PROMPTS[:2], free, use_tqdm=False)
    mixed = plain.generate(PROMPTS[:2] + PROMPTS[2:4],
                           free + [constrained({"json": PERSON, "disable_any_whitespace": True}, seed=1),
                                   constrained({"regex": "[a-z]{30}"}, seed=2)], use_tqdm=False)
    for a, m in zip(alone, mixed[:2]):
        assert m.outputs[0].token_ids == a.outputs[0].token_ids
        if a.outputs[0].logprobs is not None:
            assert [list(e) for e in m.outputs[0].logprobs] == [list(e) for e in a.outputs[0].logprobs]
    assert re.fullmatch("[a-z]{30}", mixed[3].outputs[0].text)


WORK_SPECS = [{"json": PERSON, "disable_any_whitespace": True}, {"regex": r"[a-f0-9]{4}(-[a-f0-9]{4}){3}"},
              {"choice": ["alpha", "beta", "gamma"]}]


def work(base_prompts: list[str] = PROMPTS):
    """Each prompt with each spec (seeded sampling, some n=2, some logprobs), and one greedy request a spec."""
    prompts = [p for p in base_prompts for _ in WORK_SPECS]
    params = [constrained(spec, seed=i, n=2 if i % 4 == 0 else 1, logprobs=1 if i % 5 == 0 else None)
              for i, spec in enumerate(WORK_SPECS * len(base_prompts))]
    greedy = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=spec) for spec in WORK_SPECS]
    return prompts + PROMPTS[:3], params + greedy


@pytest.mark.parametrize("engine_args", [
    {"overlap_scheduling": False},
    {"max_num_batched_tokens": 16, "max_num_seqs": 5, "enable_prefix_caching": True},  # chunks, prefix hits
    {"num_kv_blocks": 14, "block_size": 16},  # preemption
])
def test_same_tokens_under_every_schedule(plain, engine_args):
    prompts, params = work()
    want = plain.generate(prompts, params, use_tqdm=False)
    other = llm(**engine_args)
    got = other.generate(prompts, params, use_tqdm=False)
    assert texts(got) == texts(want)
    if "num_kv_blocks" in engine_args:
        assert other.engine.scheduler.num_preemptions > 0
    other.engine.kv_cache.check_invariants([])


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
                                  {"method": "eagle3", "num_speculative_tokens": 4},
                                  {"method": "draft_model", "num_speculative_tokens": 2}])
def test_speculation_changes_no_constrained_token(plain, spec):
    """Drafts are checked against the grammar: a draft it refuses is never accepted, and the
    matcher rolls back the drafts it took to fill the verify rows. (Two of the prompts: a speculating
    engine on the CPU runs the draft's passes too, and the full work took minutes in CI.)"""
    prompts, params = work(PROMPTS[:2])
    want = plain.generate(prompts, params, use_tqdm=False)
    spec_llm = llm(speculative_config=spec)
    got = spec_llm.generate(prompts, params, use_tqdm=False)
    assert texts(got) == texts(want)
    stats = spec_llm.engine.speculator.stats
    assert stats.accepted > 0 and stats.drafts > stats.accepted


@pytest.fixture(scope="module")
def whitespace_only(plain) -> dict[int, int]:
    """token id -> length, for the tokens made only of JSON whitespace"""
    tokenizer = plain.engine.tokenizer
    texts_ = {t: tokenizer.decode([t]) for t in range(len(tokenizer))}
    return {t: len(text) for t, text in texts_.items() if text and not text.strip(" \t\n\r")}


def test_json_whitespace_runs_are_capped(plain, whitespace_only):
    """A model pulled towards whitespace (here by logit_bias) cannot pad a JSON output forever:
    once a run reaches MAX_WHITESPACE_RUN characters, whitespace-only tokens are refused, and the
    drafts of a speculating request are checked the same way."""
    params = SamplingParams(temperature=0, max_tokens=200, logit_bias={t: 100 for t in whitespace_only},
                            structured_outputs={"json_object": True})
    out = plain.generate(["x = "], params, use_tqdm=False)[0].outputs[0]
    tokenizer, run, capped = plain.engine.tokenizer, 0, 0
    for token in out.token_ids:
        if token in whitespace_only:
            assert run < MAX_WHITESPACE_RUN, out.text
            run += whitespace_only[token]
        else:
            text = tokenizer.decode([token])
            run = len(text) - len(text.rstrip(" \t\n\r"))
        capped += run >= MAX_WHITESPACE_RUN
    assert capped and out.finish_reason == "stop" and json.loads(out.text) == {}, out.text
    speculating = llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2})
    assert speculating.generate(["x = "], params, use_tqdm=False)[0].outputs[0].token_ids == out.token_ids
    assert speculating.engine.speculator.stats.accepted > 0


def test_compilation_runs_off_the_step_loop(plain, monkeypatch):
    """A grammar that takes long to compile does not hold up the other requests."""
    grammars = plain.engine.grammars
    release = threading.Event()
    original = grammars._compile

    def slow(grammar):
        assert release.wait(30)
        return original(grammar)

    monkeypatch.setattr(grammars, "_compile", slow)
    engine = plain.engine
    engine.add_request("slow", "x = ", constrained({"regex": "[0-9]{7}z"}))
    engine.add_request("free", "y = ", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                release.set()
    assert finished == ["free", "slow"]
    assert engine.scheduler.num_preemptions == 0 and not engine.compiling


def test_compiled_grammars_are_cached_by_spec(plain):
    plain.generate(["a"], constrained({"regex": "[0-9]{3}q"}), use_tqdm=False)  # builds the cache entry
    before = plain.engine.grammars.num_compiled
    plain.generate(["b", "c"], [constrained({"regex": "[0-9]{3}q"}), constrained({"regex": "[0-9]{3}q"}, seed=2)],
                   use_tqdm=False)
    assert plain.engine.grammars.num_compiled == before
    plain.generate(["d"], constrained({"regex": "[0-9]{4}q"}), use_tqdm=False)
    assert plain.engine.grammars.num_compiled == before + 1


def test_without_stop_tokens_the_grammar_ends_the_request(plain):
    out = plain.generate(["x"], constrained({"regex": "[0-9]{4}"}, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("[0-9]{4}", out.text) and out.finish_reason == "stop"


def test_abort_while_compiling(plain, monkeypatch):
    release = threading.Event()
    original = plain.engine.grammars._compile
    monkeypatch.setattr(plain.engine.grammars, "_compile", lambda g: (release.wait(30), original(g))[1])
    engine = plain.engine
    engine.add_request("gone", "x", constrained({"regex": "[a-z]{9}!"}))
    assert engine.has_unfinished_requests()
    out = engine.abort_request("gone")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    release.set()


@pytest.mark.parametrize("spec, message", [
    ({"json": {"type": "object", "properties": 5}}, "properties must be an object"),
    ({"json": "{not json"}, "Failed to parse JSON"),
    ({"regex": "(ab"}, "parenthesis"),
    ({"grammar": "root ::= missing"}, "not defined"),
    ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ({}, "exactly one"),
    ({"choice": []}, "non-empty list"),
    ({"json": 5}, "JSON schema"),
    ({"regex": "a", "colour": "red"}, "unknown fields"),
    ({"regex": "a" * 300_000}, "longer than"),
])
def test_bad_specs_are_refused_by_name(plain, spec, message):
    with pytest.raises(InvalidRequest, match=message):
        plain.engine.add_request("bad", "x", SamplingParams(structured_outputs=spec))
    assert "bad" not in plain.engine.groups and not plain.engine.compiling


def test_the_params_object_and_the_cli_flag(tmp_path):
    from lanner.cli import build_parser

    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    assert params.structured_outputs.kind == "choice"
    args = build_parser().parse_args(["generate", "x", "--structured-outputs", '{"regex": "[0-9]+"}'])
    assert args.structured_outputs == {"regex": "[0-9]+"}
