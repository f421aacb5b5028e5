"""The shipped lanner-tiny models: they load in lanner and in transformers, agree
token for token, have a held-out perplexity that random weights cannot reach,
and the draft predicts the target well (the basis of speculative decoding)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import hf_greedy, hf_model
from lanner import LLM, SamplingParams
from lanner.default_model import DRAFT_MODEL, default_model_path
from lanner.models.tiny import corpus_name, is_heldout, read_text, stdlib_files

# Measured on held-out snippets of CPython 3.11's standard library: see docs/lanner-tiny.md.
MAX_PERPLEXITY = 20.0  # measured 7.7 (2026-11-24 models); random weights of the same shape: about 8,200
MIN_DRAFT_AGREEMENT = 0.5  # chance: about 1/8192


@pytest.fixture(scope="module")
def target():
    return LLM(device="cpu", dtype="float32", num_kv_blocks=512)


@pytest.fixture(scope="module")
def draft():
    return LLM(model=DRAFT_MODEL, device="cpu", dtype="float32", num_kv_blocks=512)


@pytest.fixture(scope="module")
def snippets(target):
    """Token ids of the start of held-out standard-library files (never trained on)."""
    tokenizer = target.get_tokenizer()
    root, files = stdlib_files()
    held = [f for f in files if is_heldout(corpus_name(root, f))]  # the training run's naming
    out = []
    for f in held:
        ids = tokenizer(read_text(root, f), add_special_tokens=False)["input_ids"]
        if len(ids) >= 256:
            out.append(ids[:256])
    assert len(out) >= 8
    return out[:8]


def test_default_model_is_the_shipped_one(target):
    assert default_model_path().endswith(os.path.join("assets", "lanner-tiny"))
    assert target.engine.hf_config.architectures == ["Qwen3ForCausalLM"]


def test_greedy_matches_transformers(target, snippets):
    prompts = [s[:64] for s in snippets[:6]]
    ours = target.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in ours] == hf_greedy(hf_model(default_model_path()), prompts, 16)


def _perplexity(llm, snippets) -> float:
    outs = llm.generate(snippets, SamplingParams(max_tokens=1, prompt_logprobs=0))
    logprobs = [lp[t].logprob for o, s in zip(outs, snippets) for lp, t in zip(o.prompt_logprobs[1:], s[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


def test_heldout_perplexity_matches_transformers_and_is_low(target, snippets):
    ours = _perplexity(target, snippets)
    hf = hf_model(default_model_path())
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(hf(torch.tensor([s])).logits[0, :-1], torch.tensor(s[1:]))
                  for s in snippets]
    theirs = math.exp(torch.stack(losses).mean().item())
    print(f"held-out perplexity {ours:.3f}")
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)
    assert ours < MAX_PERPLEXITY, ours


def _greedy_next(llm, snippets) -> list[int]:
    outs = llm.generate(snippets, SamplingParams(max_tokens=1, prompt_logprobs=1))
    return [min(lp, key=lambda t: lp[t].rank) for o in outs for lp in o.prompt_logprobs[1:]]


def test_draft_agrees_with_target(target, draft, snippets):
    a, b = _greedy_next(target, snippets), _greedy_next(draft, snippets)
    agreement = sum(x == y for x, y in zip(a, b)) / len(a)
    print(f"draft agreement {agreement:.4f}")
    assert agreement > MIN_DRAFT_AGREEMENT, agreement
