"""Overlap scheduling with speculative decoding (issue [8], item 5): a step that verifies drafts is
planned before the step before it is read back. Its first token, its drafts, and (when the step
before verified drafts) its positions, KV slots, context lengths and sampling keys are filled in on
the device (lanner/executor/deferred.py); the host's bookkeeping runs one step behind. Outputs are
token for token those of decoding without speculation; requests whose options need the host
(penalties, min_tokens, n-gram drafts, a prompt in the next step) are read back first."""
from __future__ import annotations

import asyncio

import pytest

from lanner.core.request import SamplingParams

CODE = ["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return",
        "import os\nimport sys\nimport json\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser()\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"]
# the shipped proposers: trained on lanner-tiny, so most drafts are accepted and a step's shift varies
METHODS = ["draft_model", "eagle3", "mtp"]


def llm(**kwargs):
    from lanner import LLM

    return LLM(device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def plain():
    return llm()


def spec(method: str, k: int = 3, adaptive: bool = True, **kwargs):
    return llm(speculative_config={"method": method, "num_speculative_tokens": k, "adaptive": adaptive}, **kwargs)


def same_outputs(want, got) -> None:
    for w, g in zip(want, got):
        for cw, cg in zip(w.outputs, g.outputs):
            assert cg.token_ids == cw.token_ids and cg.text == cw.text
            assert cg.finish_reason == cw.finish_reason and cg.stop_reason == cw.stop_reason
            if cw.logprobs is not None:
                assert [list(e) for e in cg.logprobs] == [list(e) for e in cw.logprobs]
                assert [e[t].logprob for e, t in zip(cg.logprobs, cg.token_ids)] == pytest.approx(
                    [e[t].logprob for e, t in zip(cw.logprobs, cw.token_ids)], abs=1e-4)


GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, n=2, max_tokens=40, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("method", METHODS)
def test_verify_steps_overlap_and_change_no_output(plain, method):
    params = [GREEDY, SEEDED, GREEDY]
    want = plain.generate(CODE, params, use_tqdm=False)
    engine = (s := spec(method, adaptive=False)).engine  # every step drafts
    got = s.generate(CODE, params, use_tqdm=False)
    same_outputs(want, got)
    stats = engine.speculator.stats
    assert stats.accepted > stats.verifications  # shifts of every size occur: many drafts accepted, some not
    assert stats.drafts > stats.accepted
    # nearly every step after the prompts verified drafts planned before its predecessor was read back
    assert engine.num_overlapped_verify_steps >= 0.8 * (engine.num_steps - 2)
    engine.kv_cache.check_invariants([])
    assert engine.kv_cache.stats().used_blocks == 0
    without = spec(method, overlap_scheduling=False)
    same_outputs(want, without.generate(CODE, params, use_tqdm=False))
    assert without.engine.num_overlapped_verify_steps == 0


def test_the_accepted_count_moves_the_next_step_on_the_device(plain):
    """Each overlapped step that follows one with rejected drafts had its positions moved back on
    the device by a - m: checked against the host's own count when that step is read back."""
    from lanner.executor.deferred import Deferred

    moved: dict = {}  # request -> shifts applied on the device, oldest first
    checked = []
    apply = Deferred.apply

    def recording(self, *args):
        apply(self, *args)
        if self.shifts:
            shift = self.shift.tolist()
            for req, (q, _) in self.bases.items():
                moved.setdefault(req, []).append(shift[q])

    s = spec("eagle3")
    append = s.engine._append_sampled

    def checking(req, rows, drafts):
        # the step after this one was planned (and moved) before this read-back
        if drafts and moved.get(req):
            accepted = next((i for i, (d, (t, _)) in enumerate(zip(drafts, rows)) if d != t), len(drafts))
            checked.append((moved[req].pop(0), accepted - len(drafts)))
        return append(req, rows, drafts)

    s.engine._append_sampled = checking
    Deferred.apply = recording
    try:
        got = s.generate(CODE, GREEDY, use_tqdm=False)
    finally:
        Deferred.apply = apply
    same_outputs(plain.generate(CODE, GREEDY, use_tqdm=False), got)
    assert all(device == host for device, host in checked)
    shifts = [host for _, host in checked]
    assert len(shifts) > 20 and min(shifts) < 0 and 0 in shifts  # some drafts rejected, some runs whole
    assert not any(moved.values())  # every move was checked


@pytest.mark.parametrize("method", ["draft_model", "mtp"])
def test_preemption_with_a_speculative_step_in_flight(plain, method):
    """A request preempted while its optimistic step runs recomputes from its tokens read back."""
    want = plain.generate(CODE, GREEDY, use_tqdm=False)
    s = spec(method, num_kv_blocks=12, block_size=16)
    got = s.generate(CODE, GREEDY, use_tqdm=False)
    same_outputs(want, got)
    assert s.engine.scheduler.num_preemptions > 0 and s.engine.num_overlapped_verify_steps > 10
    s.engine.kv_cache.check_invariants([])
    assert s.engine.kv_cache.stats().used_blocks == 0


def test_stops_inside_accepted_drafts_with_overlap(plain):
    """Stop strings, stop tokens and max_tokens that fall inside a run of accepted drafts end the
    request there, though the next step was already launched on the assumption it goes on."""
    base = plain.generate(CODE, GREEDY, use_tqdm=False)
    params = []
    for out in base:
        text, ids = out.outputs[0].text, out.outputs[0].token_ids
        params += [SamplingParams(temperature=0, max_tokens=48, stop=[text[len(text) // 2:len(text) // 2 + 3]]),
                   SamplingParams(temperature=0, max_tokens=48, stop_token_ids=[ids[17]]),
                   SamplingParams(temperature=0, max_tokens=13 + len(params) % 5, ignore_eos=True)]
    prompts = [p for p in CODE for _ in range(3)]
    want = plain.generate(prompts, params, use_tqdm=False)
    s = spec("draft_model", k=4)
    same_outputs(want, s.generate(prompts, params, use_tqdm=False))
    assert s.engine.num_overlapped_verify_steps > 0
    assert s.engine.kv_cache.stats().used_blocks == 0


def test_requests_that_need_the_host_are_read_back_first(plain):
    """Penalties and min_tokens (their rows would depend on drafts the host has not seen) and a
    prompt arriving while others verify: exact outputs, the others still overlap when they can."""
    params = [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, min_tokens=25),
              GREEDY]
    want = plain.generate(CODE, params, use_tqdm=False)
    s = spec("draft_model")
    same_outputs(want, s.generate(CODE, params, use_tqdm=False))
    alone = spec("draft_model")
    same_outputs(want[2:], alone.generate(CODE[2:], params[2:], use_tqdm=False))
    assert s.engine.num_overlapped_verify_steps < alone.engine.num_overlapped_verify_steps
    # chunked prompts admitted while others verify
    chunked = spec("eagle3", max_num_batched_tokens=16, max_num_seqs=4)
    many = [GREEDY] * 3 + [SEEDED]
    prompts = CODE + CODE[:1]
    same_outputs(plain.generate(prompts, many, use_tqdm=False), chunked.generate(prompts, many, use_tqdm=False))
    assert chunked.engine.num_overlapped_verify_steps > 0


def test_ngram_drafts_read_back_first(plain):
    s = llm(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    same_outputs(plain.generate(CODE, GREEDY, use_tqdm=False), s.generate(CODE, GREEDY, use_tqdm=False))
    assert s.engine.speculator.stats.verifications > 0 and s.engine.num_overlapped_verify_steps == 0


def test_a_failure_while_preparing_an_overlapped_step_fails_only_its_requests(plain):
    """RTP-LLM #936: an exception while a step is prepared from the step in flight reaches the
    caller (here the serving loop), fails the requests of both steps, and the engine goes on: a
    later request completes with the output of plain decoding; no deadlock, no leaked block."""
    from lanner.executor.deferred import Deferred
    from lanner.serving.async_engine import AsyncEngine, StepFailed

    s = spec("draft_model")
    engine = s.engine
    apply, failures = Deferred.apply, {"left": 0, "armed": False}

    def flaky(self, *args):
        if failures["left"] and self.shifts:
            failures["left"] -= 1
            raise RuntimeError("injected failure while preparing")
        return apply(self, *args)

    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def run(request_id: str, prompt: str):
        last = None
        async for out in async_engine.generate(request_id, prompt, GREEDY.clone()):
            if out.outputs[0].token_ids and request_id != "later" and not failures["armed"]:
                failures["left"], failures["armed"] = 1, True  # fail one step planned on the device
            last = out
        return last

    async def scenario():
        results = await asyncio.gather(run("a", CODE[0]), run("b", CODE[1]), return_exceptions=True)
        failures["left"] = 0  # (had it not fired)
        later = await asyncio.wait_for(run("later", CODE[2]), timeout=120)
        return results, later

    Deferred.apply = flaky
    try:
        results, later = asyncio.run(asyncio.wait_for(scenario(), timeout=300))
    finally:
        Deferred.apply = apply
        async_engine.shutdown()
    failed = [r for r in results if isinstance(r, StepFailed)]
    assert failed and all("injected failure while preparing" in str(r) for r in failed)
    assert later.finished and later.outputs[0].token_ids == plain.generate(
        CODE[2], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    engine.kv_cache.check_invariants([])
    assert engine.kv_cache.stats().used_blocks == 0 and not engine.has_unfinished_requests()


def test_a_draft_model_that_is_the_target_accepts_everything_with_overlap(plain):
    """The target as its own draft model: every draft is accepted, so each step moves by k + 1
    tokens, planned entirely on the device."""
    from lanner.default_model import DEFAULT_MODEL

    s = llm(speculative_config={"method": "draft_model", "num_speculative_tokens": 4, "model": DEFAULT_MODEL})
    got = s.generate(CODE, GREEDY, use_tqdm=False)
    same_outputs(plain.generate(CODE, GREEDY, use_tqdm=False), got)
    stats = s.engine.speculator.stats
    assert stats.accepted >= 0.95 * stats.drafts and s.engine.num_overlapped_verify_steps > 0
