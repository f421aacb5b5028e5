"""Structured outputs on the GPU (bf16, decode and piecewise graphs, overlap scheduling): every
output matches its schema, the bitmask reaches the device without a host sync in the sampler,
and overlap on and off give the same tokens."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lanner import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z ]{0,10}$"},
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "kind": {"enum": ["a", "b", "c"]},
    "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
    "required": ["name", "n", "kind", "items"], "additionalProperties": False}
PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "# config\n"] * 4


def params(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                          structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})


@pytest.fixture(scope="module")
def outputs():
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
    got = llm.generate(PROMPTS, [params(s) for s in range(len(PROMPTS))], use_tqdm=False)
    del llm
    return got


def test_outputs_validate(outputs):
    for out in outputs:
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_overlap_changes_no_token(outputs):
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3, overlap_scheduling=False)
    got = llm.generate(PROMPTS, [params(s) for s in range(len(PROMPTS))], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in outputs]


def test_masked_sampling_does_not_sync():
    from lanner.sampling.sampler import apply_bitmask

    logits = torch.randn(64, 151936, device="cuda")
    bitmask = torch.randint(-(1 << 31), 1 << 31, (32, 4748), dtype=torch.int32, device="cuda")
    rows = torch.arange(0, 64, 2, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = apply_bitmask(logits.clone(), bitmask, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, device="cuda", dtype=torch.int32)) & 1).flatten(1)
    assert torch.equal(torch.isinf(out[rows]), bits[:, :151936] == 0)
    assert not torch.isinf(out[1::2]).any()


def test_no_host_sync_when_launching_or_sampling_constrained_steps():
    """The forward's launch and the masked sampling (the bitmask's copy to the device included)
    never wait for the GPU: the host fills the next mask while the forward runs."""
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
    runner, calls = llm.engine.runner, []

    def strict(fn):
        def call(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                calls.append(fn.__name__)
        return call

    runner.launch, runner.sample = strict(runner.launch), strict(runner.sample)
    outs = llm.generate(PROMPTS[:4], [params(s) for s in range(4)], use_tqdm=False)
    assert calls.count("sample") >= 10 and all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert llm.engine.num_overlapped_steps > 0
