"""Every bad input gets a typed error and leaves the engine and other requests untouched."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import make_llm
from lanner import SamplingParams
from lanner.config import EngineConfig
from lanner.errors import CapacityExceeded, ConfigError, InvalidRequest, UnsupportedModel


@pytest.mark.parametrize("kw", [
    dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2), dict(n=0),
    dict(max_tokens=0), dict(min_tokens=5, max_tokens=2), dict(presence_penalty=3), dict(frequency_penalty=-3),
    dict(repetition_penalty=0), dict(logprobs=-1), dict(logprobs=True), dict(stop=[""]),
    dict(stop_token_ids=[-1]), dict(seed="x")])
def test_bad_sampling_params(kw):
    with pytest.raises(InvalidRequest):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def llm(qwen3_path):
    return make_llm(qwen3_path, max_model_len=64, num_kv_blocks=8, block_size=16)


@pytest.mark.parametrize("prompt,error", [
    ("", InvalidRequest), ([], InvalidRequest), ([1, 2, 10**6], InvalidRequest), ([-1], InvalidRequest),
    ([1] * 64, InvalidRequest), ([1] * 200, InvalidRequest), ({"nothing": 1}, InvalidRequest),
    ([1.5, 2], InvalidRequest), (None, InvalidRequest)])
def test_bad_prompts(llm, prompt, error):
    with pytest.raises(error):
        llm.engine.add_request("bad", prompt, SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests() and "bad" not in llm.engine.groups


def test_request_that_can_never_fit_is_rejected(qwen3_path):
    small = make_llm(qwen3_path, max_model_len=256, num_kv_blocks=4, block_size=16)
    with pytest.raises(CapacityExceeded):
        small.generate([[1] * 40], SamplingParams(max_tokens=100))
    assert small.generate([[1] * 40], SamplingParams(max_tokens=10, ignore_eos=True))[0].outputs[0].finish_reason == "length"


def test_bad_request_does_not_disturb_running_ones(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = llm.generate([[3, 4, 5]], params)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("good", [3, 4, 5], params)
    engine.step()
    for bad in ([], [10**7], [1] * 500):
        with pytest.raises(InvalidRequest):
            engine.add_request("bad", bad, params)
    with pytest.raises(InvalidRequest):
        engine.add_request("good", [1], params)  # duplicate id
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].outputs[0].token_ids == want
    assert engine.kv_cache.stats().used_blocks == 0


def test_one_bad_prompt_fails_generate_cleanly(llm):
    with pytest.raises(InvalidRequest):
        llm.generate([[1, 2], [], [3]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests() and not llm.engine.groups


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("b", [4, 5, 6], SamplingParams(max_tokens=30, ignore_eos=True, n=2))
    engine.step()
    engine.step()
    out = engine.abort_request("b")
    assert out.finished and all(o.finish_reason == "abort" for o in out.outputs)
    assert engine.abort_request("b") is None
    engine.abort_request("a")
    assert not engine.has_unfinished_requests() and engine.kv_cache.stats().used_blocks == 0
    engine.kv_cache.check_invariants([])


def test_unknown_architecture(qwen3_path, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(qwen3_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="Qwen3ForCausalLM"):
        make_llm(str(folder))


def test_missing_model_and_bad_options(tmp_path):
    with pytest.raises(ConfigError):
        make_llm(str(tmp_path / "does-not-exist"))
    with pytest.raises(ConfigError, match="unknown engine option"):
        EngineConfig.from_kwargs(max_num_seq=3)
    with pytest.raises(ConfigError):
        EngineConfig.from_kwargs(block_size=12)
    with pytest.raises(ConfigError):
        EngineConfig.from_kwargs(gpu_memory_utilization=1.5)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError):
        make_llm(str(tmp_path / "empty"))


@pytest.mark.parametrize("overlap", [False, True])
def test_length_limit_is_the_context_with_and_without_overlap(qwen3_path, overlap):
    llm = make_llm(qwen3_path, max_model_len=40, overlap_scheduling=overlap)
    out = llm.generate([list(range(3, 13))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 30 and out.outputs[0].finish_reason == "length"


def test_fail_step_releases_requests_of_a_step_whose_read_back_raised(qwen3_path):
    from lanner.executor.step_handle import StepHandle

    engine = make_llm(qwen3_path).engine
    engine.add_request("A", [3, 4, 5], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    engine.add_request("B", [6, 7, 8], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.step()  # launches the prefill of both (overlap: not read back yet)
    real = StepHandle.result
    StepHandle.result = lambda self: (_ for _ in ()).throw(RuntimeError("read-back failed"))
    try:
        with pytest.raises(RuntimeError):
            engine.step()
    finally:
        StepHandle.result = real
    assert sorted(engine.fail_step()) == ["A", "B"]
    assert not engine.has_unfinished_requests() and engine.kv_cache.stats().used_blocks == 0


def test_tiny_temperature_is_greedy(qwen3_path):
    llm = make_llm(qwen3_path)
    greedy = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    tiny = llm.generate([[5, 6, 7]], SamplingParams(temperature=1e-50, max_tokens=8, ignore_eos=True))[0]
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_fail_step_releases_requests_finished_in_the_failed_read_back(qwen3_path):
    """Overlap: A finishes while step N-1 is read back, then B's postprocessing raises; A's
    group was never reported, so fail_step must release it too."""
    engine = make_llm(qwen3_path).engine
    engine.add_request("A", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("B", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    append = engine._append

    def failing(req, token, logprobs):
        if req.request_id == "B" and len(req.output_token_ids) == 1:
            raise RuntimeError("postprocess failed")
        append(req, token, logprobs)

    engine._append = failing
    with pytest.raises(RuntimeError):
        for _ in range(10):
            engine.step()
    assert sorted(engine.fail_step()) == ["A", "B"]
    assert not engine.groups and not engine.has_unfinished_requests()
    assert engine.kv_cache.stats().used_blocks == 0
