"""The OpenAI-compatible server with the embedded model on 127.0.0.1: the real
`openai` client, every error path, a fuzz pass, load, disconnects, engine
failures and SIGTERM."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanner import LLM, SamplingParams
from lanner.config import EngineConfig, ServerConfig
from lanner.engine.engine import LLMEngine
from lanner.errors import InvalidRequest, LannerError
from lanner.server.app import build_app
from lanner.server.metrics import ServerMetrics
from lanner.serving.async_engine import AsyncEngine, engine_stats
from lanner.serving.engine_process import PipeSender

MODEL = "lanner-tiny"
# a short context bounds what one fuzzed request (no max_tokens, ignore_eos) can cost on a CPU
ENGINE_ARGS = dict(device="cpu", dtype="float32", num_kv_blocks=512, max_num_seqs=64, max_model_len=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_app(metrics=None, **server_kwargs):
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(**ENGINE_ARGS)),
                         server_kwargs.get("max_waiting_requests"), observer=metrics)
    return build_app(engine, ServerConfig(**{"served_model_name": [MODEL], **server_kwargs}), metrics), engine


def engine_state(engine: AsyncEngine) -> tuple[int, bool]:
    stats = engine.call(engine_stats).result(10)  # a module-level function: it also reaches an engine process
    return stats.used_blocks, stats.busy


def wait_idle(engine: AsyncEngine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while engine_state(engine) != (0, False):
        assert time.monotonic() < deadline, f"still busy: {engine_state(engine)}"
        time.sleep(0.05)


def serve_in_thread(app, **uvicorn_options):
    """uvicorn on a free port in a thread; yields the base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options, "host": "127.0.0.1", "port": port,
                                                "log_level": "warning"}))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def server():
    app, engine = make_app()
    for base in serve_in_thread(app):
        yield base, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline():
    return LLM(**ENGINE_ARGS)


GREEDY = dict(temperature=0, max_tokens=12)


def test_completions_match_offline_and_count_usage(client, offline):
    out = client.completions.create(model=MODEL, prompt="def add(a, b):", **GREEDY)
    want = offline.generate("def add(a, b):", SamplingParams(**GREEDY, repetition_penalty=1.1), use_tqdm=False)[0]
    assert out.choices[0].text == want.outputs[0].text
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt="def add(a, b):", stream=True,
                                         stream_options={"include_usage": True}, **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens and not chunks[-1].choices
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"


def test_chat_streaming_and_not(client, server):
    messages = [{"role": "user", "content": "Write a loop."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("length", "stop")
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_stop_logprobs_seed(client):
    many = client.completions.create(model=MODEL, prompt="import os\n", n=3, temperature=1.0, seed=5, max_tokens=8)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt="import os\n", n=3, temperature=1.0, seed=5, max_tokens=8)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeds reproduce
    fixed = client.completions.create(model=MODEL, prompt="import os\n", n=3, temperature=1.0, seed=5, max_tokens=8,
                                      extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 3 * 8  # usage counts every choice's tokens
    base = client.completions.create(model=MODEL, prompt="def main():", **GREEDY).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(model=MODEL, prompt="def main():", stop=[stop], **GREEDY).choices[0]
        assert cut.text == base[:base.find(stop)] and cut.finish_reason == "stop"
    lp = client.completions.create(model=MODEL, prompt="x = ", logprobs=2, **GREEDY).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    assert all(len(top) == 2 and max(top.values()) >= value - 1e-6
               for top, value in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                          top_logprobs=3, **GREEDY).choices[0]
    assert all(len(t.top_logprobs) == 3 for t in chat.logprobs.content) and chat.logprobs.content
    raw = b"".join(bytes(t.bytes) for t in chat.logprobs.content)  # raw token bytes join to the text
    assert chat.finish_reason == "length" and raw.decode() == chat.message.content


def test_models_health_version_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    base = server[0]
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)  # counted below, whatever ran before
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(base + "/version").json()
    text = httpx.get(base + "/metrics").text
    for name in ("lanner_time_to_first_token_seconds", "lanner_time_per_output_token_seconds",
                 "lanner_e2e_request_latency_seconds", "lanner_num_requests_running", "lanner_num_requests_waiting",
                 "lanner_kv_cache_usage", "lanner_prefix_cache_hit_rate", "lanner_http_requests_total"):
        assert name in text
    assert 'lanner_http_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_metrics_count_the_engines_steps_and_tokens():
    """The engine's own step and token totals and its time inside and between steps (sampled after
    the step that leaves it idle), so a served burst's mean batch and step time can be set against an
    offline run's (`lanner bench throughput`)."""
    from lanner.server.metrics import ServerMetrics

    app, engine = make_app(ServerMetrics())
    for base in serve_in_thread(app):
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4,
                                                       "ignore_eos": True}, timeout=30)
        assert r.status_code == 200
        wait_idle(engine)
        steps, computed, inside, between = engine.call(lambda e: (
            e.num_steps, e.num_tokens_computed, e.step_seconds, e.between_steps_seconds)).result(10)
        assert steps >= 4 and computed >= 3 + 3  # the prompt, then a token a step
        assert inside > 0 and between >= 0
        text = httpx.get(base + "/metrics").text
        assert f"lanner_engine_steps_total {float(steps)}" in text
        assert f"lanner_engine_tokens_computed_total {float(computed)}" in text
        assert f"lanner_engine_step_seconds_total {inside!r}" in text
        assert f"lanner_engine_between_steps_seconds_total {between!r}" in text


def test_bench_serve_reports_what_the_server_did_in_each_rate(tmp_path):
    """From lanner's /metrics before and after a rate: the engine's steps, tokens and seconds, and
    the mean latency parts of that rate's requests only."""
    from lanner.cli import main
    from lanner.server.metrics import ServerMetrics

    app, engine = make_app(ServerMetrics())
    out = tmp_path / "serve.json"
    for base in serve_in_thread(app):
        args = ["bench", "serve", "--base-url", base, "--num-prompts", "6", "--input-len", "10", "--output-len", "4",
                "--client-processes", "1", "--output-json", str(out)]
        assert main(args + ["--seed", "1"]) == 0
        steps = engine.call(lambda e: e.num_steps).result(10)
        assert main(args + ["--seed", "2"]) == 0
        (row,) = json.loads(out.read_text())["results"]["rates"]
        split = row["server"]
        assert split["steps"] == engine.call(lambda e: e.num_steps).result(10) - steps  # the second rate's alone
        assert split["tokens_computed"] >= 6 * (10 + 3) and split["step_s"] > 0 and split["between_steps_s"] >= 0
        assert all(split[f"mean_{k}_ms"] > 0 for k in ("ttft", "e2e", "handoff", "inference"))
        assert split["mean_e2e_ms"] <= row["e2e_ms"]["mean"] + 1  # from the server's receipt: within the client's


@pytest.mark.parametrize("body,status,fragment", [
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n must be"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "x " * 5000}, 400, "context"),
    ({"model": MODEL, "prompt": [1, 2, 10 ** 9]}, 400, "unknown token ids"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "empty"),
    ({"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
])
def test_invalid_requests_get_400(server, body, status, fragment):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\ud800"], "max_tokens": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}),
])
def test_untokenizable_text_and_inconsistent_options_get_400(server, path, body):
    r = httpx.post(server[0] + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_a_failing_prompt_in_a_batch_never_stalls_the_engine(server):
    """One bad prompt cancels its siblings while their adds may still be queued: none may be
    left running unread, and the engine thread must survive."""
    base, engine = server
    for _ in range(15):
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": [[10 ** 6]] + [[5, 6, 7]] * 6,
                                                       "max_tokens": 3}, timeout=30)
        assert r.status_code == 400
    assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2},
                      timeout=30).status_code == 200
    wait_idle(engine)


def test_malformed_json_and_bad_chat(server):
    r = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]})
    assert r.status_code == 400


def test_api_key_and_full_queue():
    app, _ = make_app(api_key="sekret")
    with TestClient(app) as c:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200  # health needs no key
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(**{**ENGINE_ARGS, "max_num_seqs": 1})),
                         max_waiting_requests=1)
    runner = engine.transport.engine.runner
    launch = runner.launch
    runner.launch = lambda sched, **kw: (time.sleep(0.01), launch(sched, **kw))[1]
    app = build_app(engine, ServerConfig(served_model_name=[MODEL]))
    for base in serve_in_thread(app):
        long = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True}
        threads = [threading.Thread(target=httpx.post, args=(base + "/v1/completions",),
                                    kwargs={"json": long, "timeout": 60}) for _ in range(2)]
        for t in threads:  # one runs (max_num_seqs 1), one waits
            t.start()
            time.sleep(0.3)
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and "waiting" in r.json()["error"]["message"]
        for t in threads:
            t.join()


def test_step_failures_fail_their_requests_and_kill_after_repeats():
    app, engine = make_app()
    runner = engine.transport.engine.runner
    launch = runner.launch
    failures = {"left": 1}

    def flaky(sched, **kw):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected failure")
        return launch(sched, **kw)

    runner.launch = flaky
    with TestClient(app) as c:
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 4}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json=body).status_code == 200  # the loop went on
        wait_idle(engine)
        failures["left"] = 10
        for _ in range(3):
            assert c.post("/v1/completions", json=body).status_code in (500, 503)
        assert c.get("/health").status_code == 503
        assert c.post("/v1/completions", json=body).status_code == 503


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
          "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "stream", "ignore_eos", "stop_token_ids"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
       good=st.booleans())
def test_fuzzed_requests_never_get_500(server, path, body, good):
    if good:  # mostly-valid bodies reach deeper
        body = {"model": MODEL, "max_tokens": 3, **({"prompt": "a"} if "completions" == path[-11:] else
                                                   {"messages": [{"role": "user", "content": "a"}]}), **body}
    r = httpx.post(server[0] + path, json=body, timeout=60)
    assert r.status_code in (200, 400), (r.status_code, r.text)
    if r.status_code == 400:
        assert r.json()["error"]["message"]


def test_hundreds_of_concurrent_streams_match_offline(server, offline):
    base, engine = server
    prompts = [f"def f{i}(x):" for i in range(200)]
    params = [dict(temperature=0.8 if i % 2 else 0, seed=i, max_tokens=6 + i % 5) for i in range(200)]

    async def one(client: httpx.AsyncClient, prompt: str, p: dict) -> str:
        text = ""
        async with client.stream("POST", base + "/v1/completions",
                                 json={"model": MODEL, "prompt": prompt, "stream": True, **p}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=300)) as client:
            return await asyncio.gather(*(one(client, pr, p) for pr, p in zip(prompts, params)))

    got = asyncio.run(run_all())
    want = offline.generate(prompts, [SamplingParams(**p, repetition_penalty=1.1, top_p=0.95) for p in params],
                            use_tqdm=False)
    assert got == [o.outputs[0].text for o in want]
    wait_idle(engine)


def test_a_burst_with_clients_leaving_at_every_point_leaves_nothing_behind(server, offline):
    """Since the add leaves as the server parses a request, a client may go before its request's
    outputs are read at all: of 120 concurrent streams a third leave at once, a third after their
    first chunk; the rest get the offline text, and then no request runs, no block is held and no
    stream is left in the AsyncEngine."""
    base, engine = server
    prompts = [f"def g{i}(x):" for i in range(120)]

    async def one(client: httpx.AsyncClient, i: int) -> str | None:
        body = {"model": MODEL, "prompt": prompts[i], "stream": True, "temperature": 0, "max_tokens": 40,
                "ignore_eos": True}
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            if i % 3 == 0:
                return None  # gone before reading anything
            text = ""
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i % 3 == 1:
                        return None  # gone after the first chunk
            return text

    async def run_all() -> list[str | None]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(120)))

    got = asyncio.run(run_all())
    kept = [i for i in range(120) if i % 3 == 2]
    want = offline.generate([prompts[i] for i in kept], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                       repetition_penalty=1.1, top_p=0.95),
                            use_tqdm=False)
    assert [got[i] for i in kept] == [o.outputs[0].text for o in want]
    wait_idle(engine)
    assert engine_state(engine) == (0, False) and engine._streams == {}


@contextlib.contextmanager
def recorded_aborts(engine: AsyncEngine):
    """Finish reasons of the requests the engine aborts meanwhile ('abort' if cut short)."""
    llm, reasons = engine.transport.engine, []

    def abort_request(request_id: str):
        out = type(llm).abort_request(llm, request_id)
        if out is not None:
            reasons.append(out.outputs[0].finish_reason)
        return out

    llm.abort_request = abort_request
    try:
        yield reasons
    finally:
        del llm.abort_request


def test_disconnect_mid_stream_frees_blocks(server):
    base, engine = server
    with recorded_aborts(engine) as reasons, httpx.Client(timeout=60) as c:
        with c.stream("POST", base + "/v1/completions", json={"model": MODEL, "prompt": "class A:", "stream": True,
                                                              "max_tokens": 400, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        wait_idle(engine)
    assert reasons == ["abort"]  # cut short, its blocks freed


def test_client_leaving_a_non_streaming_request_aborts_it(server):
    base, engine = server
    with recorded_aborts(engine) as reasons:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", timeout=0.5,
                       json={"model": MODEL, "prompt": "class B:", "max_tokens": 500, "ignore_eos": True})
        wait_idle(engine)
    assert reasons == ["abort"]


def test_sigterm_shuts_down_cleanly(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lanner.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--num-kv-blocks", "256"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        done = {}

        def stream():
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"model": "lanner-tiny", "prompt": "x", "stream": True, "max_tokens": 64}) as r:
                done["lines"] = [line for line in r.iter_lines() if line]

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        t.join(10)
        assert done["lines"][-1] == "data: [DONE]"  # the in-flight stream was finished, not cut
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serve_measures_a_server(server, tmp_path):
    from lanner.cli import main

    out = tmp_path / "serve.json"
    plot = tmp_path / "serve.png"
    hits_before = server[1].call(lambda e: e.kv_cache.stats().prefix_hits).result(10)
    assert main(["bench", "serve", "--base-url", server[0], "--num-prompts", "12", "--input-len", "20",
                 "--output-len", "6", "--request-rate", "50", "inf", "--max-concurrency", "8",
                 "--output-json", str(out), "--plot", str(plot), "--client-processes", "1"]) == 0
    rec = json.loads(out.read_text())
    rows = rec["results"]["rates"]
    assert [r["request_rate"] for r in rows] == [50.0, "inf"]
    for r in rows:
        assert r["completed"] == 12 and r["failed"] == 0 and r["output_tokens"] == 12 * 6
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["tpot_ms"]["mean"] > 0 and r["itl_ms"]["p50"] > 0
    assert rec["model_config"]["served_model"] == MODEL and plot.stat().st_size > 0
    wait_idle(server[1])
    # each rate sends new prompts: the second is not served from the first one's cached blocks
    assert server[1].call(lambda e: e.kv_cache.stats().prefix_hits).result(10) == hits_before


def test_bench_serve_over_several_client_processes(server, tmp_path, capsys):
    """Each client process sends its share: every request is counted once, the concurrency cap is
    split between them, and the duration spans them all."""
    from lanner.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", server[0], "--num-prompts", "9", "--input-len", "12",
                 "--output-len", "5", "--max-concurrency", "5", "--client-processes", "3",
                 "--output-json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]["rates"]
    assert row["completed"] == 9 and row["failed"] == 0 and row["output_tokens"] == 9 * 5
    assert row["duration_s"] * 1e3 >= row["e2e_ms"]["p99"] > 0
    # the clock starts once every process is ready: each request is sent after it, within the run
    assert 0 <= row["sent_ms"]["p50"] <= row["sent_ms"]["p99"] < row["duration_s"] * 1e3
    assert main(["bench", "serve", "--base-url", server[0], "--client-processes", "0"]) == 2
    assert "--client-processes must be at least 1" in capsys.readouterr().err


def test_a_model_without_tokenizer_streams_a_chunk_per_token(qwen3_path, tmp_path):
    # benchmark shapes (a config.json, dummy weights) have no tokenizer, so every text delta is
    # empty; clients and `lanner bench serve` still need one chunk per token to time them
    shape = tmp_path / "shape.json"
    shape.write_text(open(os.path.join(qwen3_path, "config.json")).read())
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(
        model=str(shape), load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64)))
    app = build_app(engine, ServerConfig(served_model_name=[MODEL]))
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 12, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with TestClient(app) as http, http.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    token_chunks = [c for c in chunks if c["choices"]]
    # one per step, fewer only if this reader fell behind (outputs are then merged); without
    # chunks for textless tokens there would be a single one, at the end
    assert 2 <= len(token_chunks) <= 12 and all(c["choices"][0]["text"] == "" for c in token_chunks)
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def run_with_engine(body):
    """asyncio.run(body(engine)) against a fresh AsyncEngine on a thread, shut down after."""
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(**ENGINE_ARGS)))
    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(body(engine), 60))
    finally:
        engine.shutdown()


def test_a_slow_reader_gets_the_latest_output_not_a_backlog(offline):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def read_slowly(engine):
        gen = engine.generate("slow", "def f():", params)
        outputs = [await gen.__anext__()]
        while engine.call(lambda e: e.has_unfinished_requests()).result(10):
            await asyncio.sleep(0.01)  # the other 7 steps run and queue their outputs meanwhile
        outputs += [out async for out in gen]
        return outputs

    outputs = run_with_engine(read_slowly)
    want = offline.generate("def f():", params, use_tqdm=False)[0].outputs[0]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 8] and outputs[-1].finished
    assert outputs[-1].outputs[0].token_ids == want.token_ids and outputs[-1].outputs[0].text == want.text


def test_generate_adds_the_request_before_its_outputs_are_read():
    """The add leaves in generate() itself: a burst's requests reach the engine as the server parses
    each one, not once it has parsed them all (its handlers read outputs only later). A stream closed
    unread aborts its request."""
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def add_then_look(engine):
        stream = engine.generate("early", "def f():", params)
        # commands run in order on the engine loop: this one sees the add, if it was sent
        added = await asyncio.wrap_future(engine.call(lambda e: "early" in e.groups))
        stream.close_unread()
        dropped = engine.generate("dropped", "def f():", params)
        del dropped  # unread and unreferenced: its request must not run on
        gc.collect()
        read_too_late = engine.generate("cancelled", "def f():", params)
        first = asyncio.ensure_future(anext(read_too_late))
        first.cancel()  # before it ever ran: the stream's read never began
        await asyncio.sleep(0)
        await read_too_late.aclose()
        while await asyncio.wrap_future(engine.call(lambda e: e.has_unfinished_requests())):
            await asyncio.sleep(0.01)
        out = [o async for o in stream]
        return added, out, dict(engine._streams), first.cancelled()

    added, out, streams, cancelled = run_with_engine(add_then_look)
    assert added and out == [] and streams == {} and cancelled


def test_a_request_id_in_use_is_refused_without_harming_its_owner(offline):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def both(engine):
        first = engine.generate("same", "def f():", params)
        out = await first.__anext__()
        with pytest.raises(InvalidRequest, match="in use"):
            await engine.generate("same", "import os", params).__anext__()
        async for out in first:
            pass
        return out

    out = run_with_engine(both)
    assert out.finished and out.outputs[0].token_ids == offline.generate(
        "def f():", params, use_tqdm=False)[0].outputs[0].token_ids


# ---- the engine loop in a child process (what `lanner serve` runs by default) ----------------

class TwoArgumentError(Exception):
    def __init__(self, code, detail):  # pickles, but loading it calls __init__ with one argument
        super().__init__(f"{code}: {detail}")


def raise_unloadable_error(engine):
    raise TwoArgumentError(1, "x")

@pytest.fixture(scope="module")
def process_server():
    metrics = ServerMetrics()
    engine = AsyncEngine.spawn(EngineConfig.from_kwargs(**ENGINE_ARGS), observer=metrics)
    app = build_app(engine, ServerConfig(served_model_name=[MODEL]), metrics)
    for base in serve_in_thread(app):
        yield base, engine, metrics


def frozen_objects(engine) -> int:
    return gc.get_freeze_count()


def test_the_engine_process_keeps_the_collector_off_its_heap(process_server):
    """Its heap at start (libraries, the model, the engine) is frozen: a full collection walked it
    all, tens of milliseconds that stalled the step loop (core/heap.py)."""
    assert process_server[1].call(frozen_objects).result(10) > 10_000


def test_engine_process_serves_the_same_tokens(process_server, offline):
    base, engine, metrics = process_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    prompts = ["def add(a, b):", "import os", "class Stack:"]
    params = SamplingParams(**GREEDY, repetition_penalty=1.1)
    want = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]
    got = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts]
    streamed = ["".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=p, stream=True,
                                                                              **GREEDY) if c.choices)
                for p in prompts]
    assert got == want and streamed == want
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == GREEDY["max_tokens"]
    bad = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x " * 5000}, timeout=30)
    assert bad.status_code == 400 and "context" in bad.json()["error"]["message"]  # the child's typed error
    with pytest.raises(Exception, match="pickle|lambda"):
        engine.call(lambda e: 1).result(10)  # refused in the parent, not lost
    with pytest.raises(RuntimeError, match="cannot be sent"):
        engine.call(raise_unloadable_error).result(10)  # pickles, would not load in the parent
    assert client.completions.create(model=MODEL, prompt=prompts[0], **GREEDY).choices[0].text == want[0]
    wait_idle(engine)
    assert metrics.running._value.get() == 0  # the idle engine's stats reached the gauges


def test_latency_metrics_split_a_request_between_server_and_engine(process_server):
    """TTFT and e2e count from the server receiving a request (to the engine's first token, and to
    the last output reaching the server), as a client sees them; the handoff to the engine process,
    the engine's queue and its inference time are e2e's parts (the rest is the outputs' way back),
    on one clock across processes."""
    base, engine, metrics = process_server
    names = ("e2e", "handoff", "queue", "inference", "ttft")
    before = {n: (getattr(metrics, n)._sum.get(), metrics.registry.get_sample_value(
        f"{getattr(metrics, n)._name}_count") or 0.0) for n in names}
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6).choices[0].text
    assert len(list(client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6, stream=True))) > 1
    wait_idle(engine)
    got = {n: (getattr(metrics, n)._sum.get() - before[n][0], metrics.registry.get_sample_value(
        f"{getattr(metrics, n)._name}_count") - before[n][1]) for n in names}
    assert all(count == 2 for _, count in got.values()), got
    handoff, queue, inference, e2e = (got[n][0] for n in ("handoff", "queue", "inference", "e2e"))
    assert handoff > 0 and queue >= 0 and inference > 0
    assert handoff + queue + inference <= e2e < handoff + queue + inference + 5.0
    assert got["ttft"][0] <= e2e


def test_engine_process_aborts_on_disconnect(process_server):
    base, engine, metrics = process_server
    finished = metrics.finished.labels("length")
    before = finished._value.get()
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", base + "/v1/completions", json={"model": MODEL, "prompt": "class A:", "stream": True,
                                                              "max_tokens": 500, "ignore_eos": True}) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
    wait_idle(engine)
    assert finished._value.get() == before  # aborted (blocks free above), not run to its 500 tokens


def test_a_dead_engine_process_is_reported():
    engine = AsyncEngine.spawn(EngineConfig.from_kwargs(**ENGINE_ARGS))
    app = build_app(engine, ServerConfig(served_model_name=[MODEL]))
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 400, "ignore_eos": True}
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            engine.transport.process.kill()  # a crash, the OOM killer
            rest = [line for line in lines if line]
        assert any("error" in line for line in rest) and rest[-1] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503  # not a 500 from the chat template's engine call


def test_an_engine_process_that_cannot_start_raises_its_error(tmp_path):
    with pytest.raises(LannerError):
        AsyncEngine.spawn(EngineConfig.from_kwargs(model=str(tmp_path / "missing"), device="cpu"))


class SlowPipe:
    """A pipe end whose writes wait until released, and which records each write."""

    def __init__(self):
        self.writes, self.release = [], threading.Event()

    def send(self, obj):
        self.release.wait(10)
        pickle.dumps(obj)  # what Connection.send does first: a message that does not pickle raises
        self.writes.append(obj)


def test_pipe_sender_sends_what_queued_up_as_one_write_in_order():
    pipe = SlowPipe()
    sender = PipeSender(pipe, "test-sender")
    sender.send(("reply", 0))
    time.sleep(0.2)  # the first write is now waiting on the pipe; these 100 queue up behind it
    for i in range(1, 101):
        sender.send(("reply", i))
    pipe.release.set()
    sender.close()
    assert [m for write in pipe.writes for m in write] == [("reply", i) for i in range(101)]
    assert len(pipe.writes) == 2  # a burst is one pickle and one write, not 100


def test_pipe_sender_stops_at_close_whatever_is_sent_after_it():
    pipe = SlowPipe()
    sender = PipeSender(pipe, "test-sender")
    sender.send(("reply", 0))
    time.sleep(0.2)  # the first write waits on the pipe; close and a late send queue up behind it
    sender.send(("reply", 1))
    sender._queue.put(PipeSender._STOP)  # close() without waiting
    sender.send(("reply", 2))  # a late reply from another thread
    pipe.release.set()
    sender._thread.join(5)
    assert not sender._thread.is_alive()
    assert [m for write in pipe.writes for m in write] == [("reply", 0), ("reply", 1)]


def test_pipe_sender_drops_only_the_message_that_does_not_pickle():
    pipe = SlowPipe()
    sender = PipeSender(pipe, "test-sender")
    sender.send(("outputs", 1))
    sender.send(("outputs", lambda: 0))
    sender.send(("outputs", 3))
    pipe.release.set()
    sender.close()
    assert [m for write in pipe.writes for m in write] == [("outputs", 1), ("outputs", 3)]
