"""The public surfaces: LLM.generate/chat outputs, loading formats, the CLI and its flags."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import _save, hf_greedy, hf_model, make_llm, random_prompts
from lanner import RequestOutputKind, SamplingParams
from lanner.cli import NO_SAMPLING_FLAG, build_parser
from lanner.config import EngineConfig, _leaf_fields


def test_generate_outputs_are_complete(qwen3_path):
    llm = make_llm(qwen3_path)
    outs = llm.generate(["def add(a, b):", "import sys"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    tok = llm.get_tokenizer()
    for prompt, out in zip(["def add(a, b):", "import sys"], outs):
        o = out.outputs[0]
        assert out.prompt == prompt and out.prompt_token_ids == tok(prompt)["input_ids"]
        assert len(o.token_ids) == 5 and o.finish_reason == "length" and out.finished
        assert o.text == tok.decode(o.token_ids)
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_the_engine_times_its_steps_and_the_gaps_between_them(qwen3_path):
    """step_seconds: inside step(); between_steps_seconds: from one step's end to the next one's start
    while requests were unfinished, so an idle engine adds nothing."""
    engine = make_llm(qwen3_path).engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.step()
    time.sleep(0.2)  # busy: counted
    while engine.has_unfinished_requests():
        engine.step()
    busy_gap = engine.between_steps_seconds
    assert busy_gap >= 0.2 and engine.step_seconds > 0
    time.sleep(0.2)  # idle: not counted
    engine.add_request("b", [5, 6, 7], params)
    engine.step()
    assert engine.between_steps_seconds == busy_gap
    engine.abort_request("b")  # idle after an abort too (a client that left)
    time.sleep(0.2)
    engine.add_request("c", [5, 6, 7], params)
    engine.step()
    assert engine.between_steps_seconds == busy_gap


def test_chat_uses_the_template(qwen3_path):
    llm = make_llm(qwen3_path)
    messages = [{"role": "user", "content": "hello"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
    two = llm.chat([messages, messages + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]],
                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert two[0].outputs[0].token_ids == out.outputs[0].token_ids and len(two) == 2


def test_sharded_checkpoint_loads_the_same(qwen3_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen3_path)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(qwen3_path).save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = make_llm(qwen3_path).generate([[4, 5, 6]], params)[0].outputs[0].token_ids
    b = make_llm(str(tmp_path)).generate([[4, 5, 6]], params)[0].outputs[0].token_ids
    assert a == b


def test_dummy_weights_from_a_config_json(qwen3_path, tmp_path):
    cfg = json.loads(open(os.path.join(qwen3_path, "config.json")).read())
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(cfg))
    llm = make_llm(str(path), load_format="dummy")
    assert llm.get_tokenizer() is None
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
    norm = llm.engine.runner.model.model.norm.weight
    assert torch.all(norm == 1)


def test_qwen2_greedy_matches(tmp_path_factory, tokenizer):
    from transformers import Qwen2Config

    from conftest import COMMON
    path = _save(tmp_path_factory, tokenizer, "qwen2", Qwen2Config(vocab_size=len(tokenizer), **COMMON))
    prompts = random_prompts(3, 4, 20, len(tokenizer))
    outs = make_llm(path).generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf_model(path), prompts, 8)


def test_every_engine_option_is_a_flag():
    parser = build_parser()
    args = parser.parse_args(["generate", "x", "--max-num-seqs", "3", "--no-enable-prefix-caching",
                              "--dtype", "float32", "--stop", "a", "b", "--max-tokens", "9"])
    assert args.max_num_seqs == 3 and args.enable_prefix_caching is False and args.stop == ["a", "b"]
    help_text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    for _, name, _ in _leaf_fields(EngineConfig):
        assert "--" + name.replace("_", "-") in help_text
    for f in dataclasses.fields(SamplingParams):
        if f.name not in NO_SAMPLING_FLAG:
            assert "--" + f.name.replace("_", "-") in help_text


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lanner.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_streams_the_completion(qwen3_path):
    llm = make_llm(qwen3_path)
    want = llm.generate(["def f(x):"], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    run = _cli("generate", "def f(x):", "--model", qwen3_path, "--temperature", "0", "--max-tokens", "8",
               "--device", "cpu", "--num-kv-blocks", "64")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "def f(x):" + want + "\n"


def test_cli_chat_multi_turn_and_errors(qwen3_path):
    run = _cli("chat", "--model", qwen3_path, "--temperature", "0", "--max-tokens", "4", "--device", "cpu",
               "--num-kv-blocks", "64", stdin="hello\nagain\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("> ") == 3  # two turns, then the prompt that reads end of input
    bad = _cli("generate", "x", "--model", qwen3_path, "--top-p", "0", "--device", "cpu")
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr
    for sub in ("generate", "chat"):
        assert "--max-num-batched-tokens" in _cli(sub, "--help").stdout


def test_generation_config_sets_default_sampling(qwen3_path, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(qwen3_path, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0}))
    llm = make_llm(str(folder))
    assert llm.engine.default_sampling_params().temperature == 0.0
    implicit = [o.outputs[0].token_ids for o in llm.generate([[4, 5, 6], [7, 8]])]  # default: max_tokens 16
    explicit = [o.outputs[0].token_ids for o in llm.generate([[4, 5, 6], [7, 8]], SamplingParams(temperature=0))]
    assert implicit == explicit


def test_cli_works_without_the_server_extra(qwen3_path):
    # `pip install lanner` has no FastAPI/uvicorn: every command but `serve` must still run
    block = "import sys; sys.modules.update(fastapi=None, uvicorn=None); from lanner.cli import main; "

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", block + f"sys.exit(main({list(args)!r}))"],
                              capture_output=True, text=True, timeout=300)

    gen = run("generate", "def f(x):", "--model", qwen3_path, "--max-tokens", "2", "--device", "cpu",
              "--num-kv-blocks", "64")
    assert gen.returncode == 0 and gen.stdout.startswith("def f(x):"), gen.stderr
    serve = run("serve", "--model", qwen3_path, "--device", "cpu")
    assert serve.returncode == 2 and "pip install 'lanner[server]'" in serve.stderr, serve.stderr


def test_chat_options_as_vllm_takes_them(qwen3_path):
    llm = make_llm(qwen3_path)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    joined = llm.chat(parts, params, use_tqdm=False)[0]
    plain = llm.chat([{"role": "user", "content": "hel\nlo"}], params, use_tqdm=False)[0]
    assert joined.prompt_token_ids == plain.prompt_token_ids and joined.prompt.endswith("<|im_start|>assistant\n")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f"}]
    cont = llm.chat(history, params, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)[0]
    assert cont.prompt.endswith("assistant\ndef f")
    custom = llm.chat(history[:1], params, chat_template="<{{ messages[0].content }}>", use_tqdm=False)[0]
    assert custom.prompt == "<hi>"
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    shown = llm.chat(history[:1], params, tools=tools, use_tqdm=False,
                     chat_template="{{ tools[0].function.name }}:{{ messages[0].content }}")[0]
    assert shown.prompt == "lookup:hi"
    assert tok.decode(shown.prompt_token_ids) == "lookup:hi"


def test_default_params_and_prefix_cache_reset(qwen3_path):
    llm = make_llm(qwen3_path)
    defaults = llm.get_default_sampling_params()
    assert isinstance(defaults, SamplingParams) and defaults == llm.engine.default_sampling_params()
    prompt = list(range(3, 3 + 40))
    params = SamplingParams(temperature=0, max_tokens=2)
    llm.generate([prompt], params, use_tqdm=False)
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    assert llm.reset_prefix_cache() is True
    assert llm.engine.kv_cache.stats().cached_blocks == 0
    fresh = llm.generate([prompt], params, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0 and fresh.outputs[0].token_ids == again.outputs[0].token_ids
    llm.engine.add_request("busy", prompt, params)
    llm.engine.step()
    assert llm.reset_prefix_cache() is False  # a request holds blocks
    llm.engine.abort_request("busy")
    assert llm.reset_prefix_cache() is True


def test_output_kinds_carry_the_same_request(qwen3_path):
    """CUMULATIVE outputs hold everything so far, DELTA outputs join to the same (the prompt in
    the first only), FINAL_ONLY sends one output; the same seed samples the same tokens."""
    engine = make_llm(qwen3_path).engine
    for kind in RequestOutputKind:
        engine.add_request(kind.name, "def add(a, b):", SamplingParams(
            n=2, temperature=0.9, seed=1, max_tokens=8, ignore_eos=True, logprobs=1, output_kind=kind))
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    cumulative, delta, final = seen["CUMULATIVE"], seen["DELTA"], seen["FINAL_ONLY"]
    assert len(final) == 1 and final[0].finished and len(cumulative) == len(delta) == 8
    assert delta[0].prompt_token_ids == cumulative[0].prompt_token_ids != []
    assert all(o.prompt_token_ids == [] and o.prompt is None for o in delta[1:])
    for i in range(2):
        whole = cumulative[-1].outputs[i]
        assert len(cumulative[3].outputs[i].token_ids) == 4
        got = final[0].outputs[i]  # another request of the batch: the same tokens, logprobs up to float noise
        assert (got.text, got.token_ids) == (whole.text, whole.token_ids)
        assert_close_logprobs(got.logprobs, whole.logprobs)
        parts = [o.outputs[i] for o in delta]
        assert "".join(p.text for p in parts) == whole.text and whole.text
        assert sum((p.token_ids for p in parts), []) == whole.token_ids
        assert_close_logprobs(sum((p.logprobs for p in parts), []), whole.logprobs)


def assert_close_logprobs(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-3 for t in a)


def test_two_engines_generate_on_two_threads_at_once(qwen3_path, llama_path):
    """The attention backend of a running forward is the thread's own: an engine on another thread
    (a server's engine thread beside an LLM, two models in one process) runs its forwards meanwhile."""
    import threading

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    jobs = [(make_llm(path), random_prompts(4, 5, 30, 500, seed=i)) for i, path in enumerate([qwen3_path, llama_path])]
    alone = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
             for llm, prompts in jobs]
    together, errors, start = [None, None], [], threading.Barrier(2)

    def run(i: int) -> None:
        llm, prompts = jobs[i]
        try:
            start.wait()
            together[i] = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                           for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(runs == [alone[i]] * 3 for i, runs in enumerate(together))


def test_outputs_pickle_and_copy_by_their_fields():
    """RequestOutput and what it holds cross the engine process's pipe as (class, fields): the same
    values come back, nested objects rebuilt, shared ones shared; copies are as before."""
    import copy
    import pickle

    from lanner.core.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput

    metrics = RequestMetrics(1.0, 3, 2.0, 3.0, None, [2])
    logprobs = [{7: Logprob(-0.5, 1, "a", b"a"), 9: Logprob(-1.5, 2)}]
    out = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "a", [7], -0.5, logprobs, "length")], True,
                        metrics=metrics, extra={"k": 1})
    back, twin = pickle.loads(pickle.dumps([out, out]))
    assert back == out and back is twin and back.metrics is not metrics
    assert isinstance(back.outputs[0].logprobs[0][7], Logprob) and back.extra == {"k": 1}
    shallow, deep = copy.copy(out), copy.deepcopy(out)
    assert shallow == deep == out and shallow.outputs is out.outputs and deep.outputs is not out.outputs


def test_a_frozen_heap_goes_back_to_the_collector_after_the_block():
    import gc

    from lanner.core.heap import frozen_heap

    before = gc.get_freeze_count()
    with frozen_heap():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before


def test_bench_step_on_the_cpu_times_eager_steps_and_no_device_time(qwen3_path):
    """On the CPU there are no graphs and no CUDA events: wall times alone."""
    from lanner.bench.steps import step_times

    llm = make_llm(qwen3_path, overlap_scheduling=False)
    with pytest.raises(ValueError, match="over 16"):  # a mixed step would have no prompt
        step_times(llm, [16], repeats=1)
    rows = step_times(llm, [32], repeats=1)
    assert [row["kind"] for row in rows] == ["prefill", "mixed"]
    assert all(row["eager_ms"] > 0 and not any(k.endswith("_gpu_ms") or k.startswith("whole") for k in row)
               for row in rows), rows
    assert llm.engine.runner.step_times is None


def test_bench_step_with_overlap_times_a_stream_of_prompts_one_a_step(qwen3_path):
    """With overlap scheduling `lanner bench step` times back-to-back prompt steps: each step takes
    the one prompt added before it (the ones before only await their read-back), and every request
    ends with its blocks freed."""
    from lanner.bench.steps import step_times

    llm = make_llm(qwen3_path)
    engine = llm.engine
    steps, tokens = engine.num_steps, engine.num_tokens_computed
    rows = step_times(llm, [24], repeats=1)
    assert [(row["tokens"], row["kind"]) for row in rows] == [(24, "prefill, back to back")]
    assert rows[0]["back_to_back_ms"] > 0
    assert engine.num_steps - steps == 3 * (4 + 2)  # three runs of four timed steps between two untimed
    assert engine.num_tokens_computed - tokens == 3 * 6 * 24
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.stats().used_blocks == 0
    budget = engine.config.scheduler.max_num_batched_tokens
    with pytest.raises(ValueError, match="budget"):  # chunks of one prompt over several steps
        step_times(llm, [budget + 1], repeats=1)
