"""vLLM's SamplingParams options that constrain the logits: logit_bias, allowed_token_ids,
bad_words, logits_processors; and truncate_prompt_tokens, clone(), finished(). Each must
change the output as it should, with overlap scheduling on and off."""
from __future__ import annotations

import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.errors import InvalidRequest

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=256)


@pytest.fixture(scope="module")
def llm_no_overlap():
    return LLM(num_kv_blocks=256, overlap_scheduling=False)


def run(llm, prompt=PROMPT, **params) -> list[int]:
    params = {"temperature": 0, "max_tokens": 12, "ignore_eos": True, **params}
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_pushes_and_pulls_tokens(llm):
    base = run(llm)
    assert run(llm, logit_bias={77: 100.0}) == [77] * 12
    pulled = run(llm, logit_bias={base[0]: -100.0})
    assert pulled[0] != base[0]
    sampled = run(llm, temperature=1.0, seed=3, logit_bias={77: 100.0})
    assert sampled == [77] * 12


def test_allowed_token_ids_restrict_every_token(llm):
    allowed = [10, 11, 12, 300, 301]
    for params in ({}, {"temperature": 1.0, "seed": 1}, {"temperature": 0.8, "top_p": 0.9, "seed": 2}):
        out = run(llm, allowed_token_ids=allowed, **params)
        assert set(out) <= set(allowed) and len(out) == 12
    assert not set(run(llm)) <= set(allowed)  # the constraint did something


def _a_multi_token_word(llm, token_ids: list[int]) -> str:
    """A word of the unconstrained output that the tokenizer splits into several tokens."""
    tok = llm.get_tokenizer()
    text = tok.decode(token_ids)
    for word in sorted(set(text.split()), key=len, reverse=True):
        if len(tok(" " + word, add_special_tokens=False)["input_ids"]) > 1 and word.isidentifier():
            return word
    pytest.fail(f"no multi-token word in {text!r}")


@pytest.mark.parametrize("overlap", [True, False])
def test_bad_words_are_never_generated(llm, llm_no_overlap, overlap):
    engine = llm if overlap else llm_no_overlap
    base = run(engine, max_tokens=40)
    word = _a_multi_token_word(engine, base)
    out = run(engine, max_tokens=40, bad_words=[word])
    assert word not in engine.get_tokenizer().decode(out) and out != base
    ids = engine.engine._bad_word_ids([word])
    assert any(len(w) > 1 for w in ids)
    for seq in ids:
        assert not any(out[i:i + len(seq)] == seq for i in range(len(out)))
    assert out == run(llm_no_overlap if overlap else llm, max_tokens=40, bad_words=[word])


def test_single_token_bad_words_keep_overlap(llm):
    """A one-token bad word is banned on the device side of sampling: no host history needed."""
    base = run(llm, max_tokens=20)
    tok = llm.get_tokenizer()
    for t in base:
        word = tok.decode([t]).strip()
        banned = llm.engine._bad_word_ids([word]) if word.isalpha() else []
        if banned and all(len(ids) == 1 for ids in banned):
            break
    else:
        pytest.fail("no single-token word in the output")
    before = llm.engine.num_overlapped_steps
    out = run(llm, bad_words=[word], max_tokens=20)
    assert not {ids[0] for ids in banned} & set(out) and out != base
    assert llm.engine.num_overlapped_steps >= before + 18


@pytest.mark.parametrize("overlap", [True, False])
def test_logits_processors_see_every_output_token(llm, llm_no_overlap, overlap):
    engine = llm if overlap else llm_no_overlap
    seen = []

    def force_after_three(output_ids, logits):
        seen.append(list(output_ids))
        if len(output_ids) >= 3:
            logits = torch.full_like(logits, -1e9)
            logits[42] = 0.0
        return logits

    def prompt_aware(prompt_ids, output_ids, logits):
        assert prompt_ids == engine.get_tokenizer()(PROMPT)["input_ids"]
        return logits

    out = run(engine, logits_processors=[force_after_three, prompt_aware])
    assert out[3:] == [42] * 9 and out[:3] == run(engine)[:3]
    assert seen == [out[:i] for i in range(12)]  # every call saw all earlier tokens, none pending


def test_truncate_prompt_tokens_keeps_the_tail(llm):
    prompt = list(range(100, 160))
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, truncate_prompt_tokens=10),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-10:]
    assert out.outputs[0].token_ids == run(llm, prompt[-10:], max_tokens=6)
    whole = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2, truncate_prompt_tokens=-1),
                         use_tqdm=False)[0]
    assert whole.prompt_token_ids == prompt


def test_clone_is_independent_but_shares_processors():
    def proc(ids, logits):
        return logits

    params = SamplingParams(stop=["a"], logit_bias={1: 2.0}, logits_processors=[proc])
    copy = params.clone()
    copy.stop.append("b")
    copy.logit_bias[3] = 1.0
    assert params.stop == ["a"] and params.logit_bias == {1: 2.0}
    assert copy.logits_processors[0] is proc and copy.logits_processors is not params.logits_processors


def test_completion_output_finished_is_a_method(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert out.finished() is True


@pytest.mark.parametrize("params", [
    {"logit_bias": {1: 101.0}}, {"logit_bias": {-1: 1.0}}, {"logit_bias": {"1": 1.0}},
    {"allowed_token_ids": []}, {"allowed_token_ids": [True]}, {"bad_words": [""]}, {"bad_words": "x"},
    {"truncate_prompt_tokens": 0}, {"logits_processors": [1]},
])
def test_bad_options_are_invalid_requests(params):
    with pytest.raises(InvalidRequest):
        SamplingParams(**params)


def test_token_ids_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.vocab_size
    for params in ({"logit_bias": {vocab: 1.0}}, {"allowed_token_ids": [vocab + 5]}):
        with pytest.raises(InvalidRequest, match="unknown token ids"):
            llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)
    assert llm.engine.kv_cache.stats().used_blocks == 0
