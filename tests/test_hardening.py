"""What a hostile or careless client can do to the server: each defect found by probing it
has a test here that failed before its fix."""
# ruff: noqa: F811 (pytest fixtures imported from test_server are parameters here)
from __future__ import annotations

import json

import httpx
import pytest

from test_server import MODEL, client, offline, server  # noqa: F401 (fixtures)

LONG_STOP = "this stop string is longer than anything generated so far"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_text_equals_the_whole_text_for_any_stop_strings(client, path):
    """visible_length() once computed text[:len - hold] with len < hold, a negative index."""
    base = client.completions.create(model=MODEL, prompt="def main():", temperature=0, max_tokens=40).choices[0].text
    late = base[30:34]  # matched late: everything before it streams, nothing of it
    for stop in ([LONG_STOP], [LONG_STOP, late], ["x" * 3, late]):
        if path == "/v1/completions":
            kwargs = dict(model=MODEL, prompt="def main():", temperature=0, max_tokens=40, stop=stop)
            whole = client.completions.create(**kwargs).choices[0].text
            parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
        else:
            kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Write a loop."}], temperature=0,
                          max_tokens=40, stop=stop)
            whole = client.chat.completions.create(**kwargs).choices[0].message.content
            chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
            parts = [c.choices[0].delta.content or "" for c in chunks]
            assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
        assert "".join(parts) == whole, (stop, parts)


def deep(levels: int) -> dict:
    value: dict = {"a": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": deep(500)},
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "extra": deep(40)}]}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": deep(40)},
     "chat_template_kwargs"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 1.5}, "n"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": 1}, "stream": True}, "stream_options"),
])
def test_nested_and_mistyped_fields_are_400s_naming_them(server, path, body, param):
    r = httpx.post(server[0] + path, json={"model": MODEL, "max_tokens": 2, **body} if path != "/tokenize"
                   else body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("method,path,content,status", [
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),  # not UTF-8
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),  # deeper than the JSON parser goes
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400),  # a huge int
    ("POST", "/v1/completions", b"{not json", 400),
    ("GET", "/nowhere", None, 404),
    ("GET", "/v1/completions", None, 405),
])
def test_every_error_body_has_openais_shape(server, method, path, content, status):
    r = httpx.request(method, server[0] + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
    assert "detail" not in r.json()


def test_bodies_over_the_limit_are_413_before_parsing():
    from test_server import make_app, serve_in_thread

    app, engine = make_app(max_request_body_mb=0.01)
    for base in serve_in_thread(app):
        big = {"model": MODEL, "prompt": "x" * 20_000, "max_tokens": 2}
        r = httpx.post(base + "/v1/completions", json=big)
        assert r.status_code == 413 and "max-request-body-mb" in r.json()["error"]["message"]

        def chunks():  # no content-length: the limit still holds
            yield b'{"model": "lanner-tiny", "prompt": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}'

        r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        ok = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_the_api_description_follows_the_api_key():
    from test_server import make_app, serve_in_thread

    app, _ = make_app(api_key="k")
    for base in serve_in_thread(app):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(base + "/health").status_code == 200


# ---- the offline API ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"temperature": "0.5"}, {"stop": 5}, {"max_tokens": "3"}, {"top_k": 2.0}, {"seed": True}, {"n": True},
    {"stop_token_ids": 5}, {"ignore_eos": "yes"}, {"top_p": None}])
def test_wrong_types_are_invalid_requests(kwargs):
    from lanner import SamplingParams
    from lanner.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_generate_refuses_what_it_cannot_run(offline):
    from lanner.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="prompts must be"):
        offline.generate(None)
    with pytest.raises(InvalidRequest, match="SamplingParams"):
        offline.generate("x", {"temperature": 0})
    assert not offline.engine.has_unfinished_requests()


def test_an_interrupted_generate_leaves_nothing_running(offline):
    from lanner import SamplingParams

    engine = offline.engine
    step, calls = engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    engine.step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            offline.generate(["a", "b", "c"], SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    finally:
        engine.step = step
    assert not engine.has_unfinished_requests() and not engine.groups
    assert engine.kv_cache.stats().used_blocks == 0
    out = offline.generate(["d"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3


# ---- metrics and queue limits ------------------------------------------------------------------


def observed_app(**server_kwargs):
    from lanner.config import EngineConfig, ServerConfig
    from lanner.engine.engine import LLMEngine
    from lanner.server.app import build_app
    from lanner.server.metrics import ServerMetrics
    from lanner.serving.async_engine import AsyncEngine
    from test_server import ENGINE_ARGS

    metrics = ServerMetrics()
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(**ENGINE_ARGS)),
                         server_kwargs.get("max_waiting_requests"), observer=metrics)
    return build_app(engine, ServerConfig(served_model_name=[MODEL], **server_kwargs), metrics), engine


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values) if values else 0.0


def wait_for(condition, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_gauges_and_abort_counts_after_a_disconnect_and_after_death():
    from test_server import serve_in_thread

    import time

    app, engine = observed_app()
    runner = engine.transport.engine.runner
    launch = runner.launch
    runner.launch = lambda sched, **kw: (time.sleep(0.02), launch(sched, **kw))[1]  # slow enough to disconnect mid-way
    for base in serve_in_thread(app):
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", base + "/v1/completions", json={"model": MODEL, "prompt": "class A:",
                                                                  "stream": True, "max_tokens": 400,
                                                                  "ignore_eos": True}) as r:
                lines = r.iter_lines()  # kept: a closed iterator would close the stream
                next(line for line in lines if line.startswith("data: "))
                wait_for(lambda: metric(base, "lanner_num_requests_running") == 1)
        # the only stream left: nothing runs, no block is used, and the abort is counted
        wait_for(lambda: metric(base, "lanner_num_requests_running") == 0)
        assert metric(base, "lanner_kv_cache_usage") == 0
        assert metric(base, 'lanner_requests_finished_total{reason="abort"}') == 1
        runner = engine.transport.engine.runner
        runner.launch = lambda sched, **kw: (_ for _ in ()).throw(RuntimeError("injected"))
        for _ in range(3):
            httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
        wait_for(lambda: httpx.get(base + "/health").status_code == 503)
        assert metric(base, "lanner_num_requests_running") == 0 and metric(base, "lanner_kv_cache_usage") == 0


def test_max_waiting_requests_counts_sequences_not_requests():
    from fastapi.testclient import TestClient

    app, _ = observed_app(max_waiting_requests=4)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 5, "max_tokens": 2})
        assert r.status_code == 400 and "--max-waiting-requests" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 4, "max_tokens": 2}).status_code \
            == 200


def test_a_client_that_never_reads_is_aborted_and_costs_no_backlog():
    """A streaming request from a socket that never reads: the outputs waiting for it stay one
    per prompt (a Mailbox, latest wins), and once it has read nothing for the stall timeout its
    requests are aborted and their blocks freed, long before they would have finished."""
    import json
    import socket
    import time

    from lanner.serving.async_engine import Mailbox
    from test_server import serve_in_thread

    app, engine = observed_app(stream_stall_timeout_s=1.0)
    runner = engine.transport.engine.runner
    launch = runner.launch
    runner.launch = lambda sched, **kw: (time.sleep(0.02), launch(sched, **kw))[1]  # 400 steps: 8 s or more
    puts = []
    put = Mailbox.put
    Mailbox.put = lambda self, key, item: (puts.append(len(self.items)), put(self, key, item))[1]
    try:
        for base in serve_in_thread(app):
            host, port = base.removeprefix("http://").split(":")
            body = json.dumps({"model": MODEL, "prompt": "class A:", "stream": True, "n": 16, "logprobs": 20,
                               "max_tokens": 400, "ignore_eos": True}).encode()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            sock.connect((host, int(port)))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_for(lambda: metric(base, 'lanner_requests_finished_total{reason="abort"}') == 16, timeout=60)
            assert metric(base, 'lanner_requests_finished_total{reason="length"}') == 0  # aborted, not finished
            wait_for(lambda: metric(base, "lanner_kv_cache_usage") == 0)
            sock.close()
            assert max(puts) <= 1  # never more than one waiting output per prompt
            assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                              timeout=30).status_code == 200
    finally:
        Mailbox.put = put


@pytest.mark.parametrize("path,body,param,flag", [
    ("/v1/completions", {"prompt": "x" * (32 * 512 + 1)}, "prompt", "--max-prompt-chars"),
    ("/v1/completions", {"prompt": ["ok", "y" * (32 * 512)]}, "prompt", "--max-prompt-chars"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * (32 * 512 + 1)}]}, "messages",
     "--max-prompt-chars"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(65)]}, "stop", "--max-stop-strings"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": "s" * 1025}, "stop",
     "--max-stop-string-chars"),
])
def test_limits_before_any_work(server, path, body, param, flag):
    r = httpx.post(server[0] + path, json={"model": MODEL, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and flag in r.json()["error"]["message"]


def test_sigterm_drain_deadline_ends_every_response_properly():
    """Requests still running when the drain time runs out: a non-streaming client gets a 503
    body, a stream gets an error event and [DONE], the log says so once, the exit code is 0."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from test_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lanner.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--num-kv-blocks", "1024", "--drain-timeout-s", "1", "--no-engine-process"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and _up(base), timeout=120)
        long = {"model": "lanner-tiny", "prompt": "x", "n": 16, "max_tokens": 1000, "ignore_eos": True}
        got = {}

        def whole():
            got["whole"] = httpx.post(base + "/v1/completions", json=long, timeout=60)

        def stream():
            with httpx.stream("POST", base + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                got["lines"] = [line for line in r.iter_lines() if line]

        threads = [threading.Thread(target=whole), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for t in threads:
            t.join(10)
        log = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got["whole"].status_code == 503 and "shutting down" in got["whole"].json()["error"]["message"]
    assert got["lines"][-1] == "data: [DONE]" and '"error"' in got["lines"][-2]
    assert log.count("ending 2 open requests") == 1 and "CancelledError" not in log


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the cost of long outputs -------------------------------------------------------------------


def test_long_streams_carry_only_what_is_new_each_step():
    """Each step once sent every request's whole output, logprobs included, from the engine to
    the server (a 600-token stream took 3.6x as long with logprobs 20). Now a stream's outputs
    carry each step's new tokens only, and a whole body is sent once, when it is done."""
    import pickle

    from fastapi.testclient import TestClient

    app, engine = observed_app()
    sizes: list[int] = []  # what each output would cost on the engine process's pipe
    outputs = engine.outputs
    engine.outputs = lambda items, stats: (sizes.extend(len(pickle.dumps(o)) for _, o in items),
                                           outputs(items, stats))[1]
    body = {"model": MODEL, "prompt": "class A:", "max_tokens": 200, "ignore_eos": True, "logprobs": 5,
            "temperature": 0}
    with TestClient(app) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]
        assert len(sizes) == 1  # one output for a body, not one per step
        sizes.clear()
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events]
    assert "".join(ch["text"] for ch in choices) == whole["text"]
    assert sum((ch["logprobs"]["tokens"] for ch in choices), []) == whole["logprobs"]["tokens"]
    assert sum((ch["logprobs"]["token_logprobs"] for ch in choices), []) == whole["logprobs"]["token_logprobs"]
    assert len(sizes) >= 100 and max(sizes[10:]) < 3 * sorted(sizes)[len(sizes) // 2]  # flat, not growing


def test_a_slow_reader_gets_the_deltas_it_missed_merged():
    """Deltas a reader was too slow to take wait in its mailbox and arrive as one, complete."""
    import asyncio

    from lanner.config import EngineConfig
    from lanner.core.request import RequestOutputKind, SamplingParams
    from lanner.engine.engine import LLMEngine
    from lanner.serving.async_engine import AsyncEngine
    from test_server import ENGINE_ARGS

    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=60, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1, stop=["never matched, but held back"])
    engine = LLMEngine(EngineConfig.from_kwargs(**ENGINE_ARGS))
    want = engine  # the same engine, the same seed: the same samples
    want.add_request("whole", "def f(x):", params.clone())
    whole = None
    while want.has_unfinished_requests():
        whole = next((o for o in want.step() if o.finished), whole)
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def read_slowly() -> list:
        got = []
        async for out in async_engine.generate("slow", "def f(x):", SamplingParams(
                **{**vars(params), "output_kind": RequestOutputKind.DELTA})):
            got.append(out)
            await asyncio.sleep(0.05)
        return got

    try:
        got = asyncio.run(read_slowly())
    finally:
        async_engine.shutdown()
    assert 1 < len(got) < 60  # some deltas were merged
    assert got[0].prompt_token_ids == whole.prompt_token_ids and all(not o.prompt_token_ids for o in got[1:])
    assert sum((o.prompt_logprobs or [] for o in got), []) == whole.prompt_logprobs
    for sample in whole.outputs:
        parts = [c for o in got for c in o.outputs if c.index == sample.index]
        assert "".join(c.text for c in parts) == sample.text
        assert sum((c.token_ids for c in parts), []) == sample.token_ids
        assert sum((c.logprobs for c in parts), []) == sample.logprobs
        assert parts[-1].finish_reason == "length"


# ---- rejected requests -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["thread", "process"])
def test_rejected_prompts_leave_nothing_behind(where):
    """A rejected request's error kept its frames, and with them the prompt, in a reference cycle
    that only a full collection frees: 80 rejected 5 MB prompts grew the engine by 1.4 GB. Here
    the collector is off, so anything left in such a cycle is counted."""
    import gc_probe
    from fastapi.testclient import TestClient

    from lanner.config import EngineConfig, ServerConfig
    from lanner.server.app import build_app
    from lanner.serving.async_engine import AsyncEngine
    from test_server import ENGINE_ARGS

    if where == "thread":
        app, engine = observed_app(max_waiting_requests=1)
        probe = lambda fn, *args: fn(None, *args)  # noqa: E731 (the engine runs in this process)
    else:
        engine = AsyncEngine.spawn(EngineConfig.from_kwargs(**ENGINE_ARGS), max_waiting_requests=1)
        app = build_app(engine, ServerConfig(served_model_name=[MODEL]))
        probe = lambda fn, *args: engine.call(fn, *args).result(timeout=30)  # noqa: E731
    length, token = 393, 7
    prompt = json.dumps([token] * length)  # built into each body, so the test itself holds no such list
    bodies = ['"max_tokens": 400',  # over the context: the server refuses
              '"max_tokens": 2, "n": 2',  # more sequences than may wait: the engine loop refuses
              '"max_tokens": 2, "logprobs": 99',  # over max_logprobs: the engine refuses
              '"max_tokens": 2, "logprobs": 99, "stream": true']
    with TestClient(app) as c:
        probe(gc_probe.hold_garbage)
        for options in bodies * 3:
            r = c.post("/v1/completions", content=f'{{"model": "{MODEL}", "prompt": {prompt}, {options}}}',
                       headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
        assert probe(gc_probe.token_lists, length, token) == 0


def test_a_heavy_trusted_template_is_stopped_at_the_time_limit():
    """A trusted request template with nested loops rendered for as long as it liked (12 s of a
    frozen server once); now it stops at --chat-template-timeout-s with a 400, on both routes."""
    import time

    from fastapi.testclient import TestClient

    from test_server import make_app

    heavy = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    app, _ = make_app(trust_request_chat_template=True, chat_template_timeout_s=0.5)
    messages = [{"role": "user", "content": "hi"}]
    with TestClient(app) as c:
        for path, extra in (("/v1/chat/completions", {"max_tokens": 2}), ("/tokenize", {})):
            start = time.monotonic()
            r = c.post(path, json={"model": MODEL, "messages": messages, "chat_template": heavy, **extra})
            assert r.status_code == 400 and "--chat-template-timeout-s" in r.json()["error"]["message"], r.text
            assert time.monotonic() - start < 5
        light = "{% for m in messages %}{{ m.content }}{% endfor %}"  # the limit leaves others alone
        r = c.post("/tokenize", json={"model": MODEL, "messages": messages, "chat_template": light})
        assert r.status_code == 200 and r.json()["count"] >= 1, r.text


# ---- health --------------------------------------------------------------------------------------


def test_health_reports_a_stuck_step():
    """/health said 200 while the engine loop was stuck in a step; now the loop must answer."""
    import threading
    import time

    from fastapi.testclient import TestClient

    app, engine = observed_app(health_timeout_s=0.5)
    runner = engine.transport.engine.runner
    launch, release = runner.launch, threading.Event()
    runner.launch = lambda sched, **kw: (release.wait(30), launch(sched, **kw))[1]  # every step waits for the test
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        done = []
        threading.Thread(target=lambda: done.append(c.post("/v1/completions", json={
            "model": MODEL, "prompt": "x", "max_tokens": 3})), daemon=True).start()
        time.sleep(0.3)  # the request is in its first step now
        start = time.monotonic()
        r = c.get("/health")
        assert r.status_code == 503 and "has not answered" in r.json()["error"]["message"]
        assert time.monotonic() - start < 3
        runner.launch = launch
        release.set()
        wait_for(lambda: bool(done))
        assert done[0].status_code == 200 and c.get("/health").status_code == 200


def test_health_reports_a_stopped_engine_process():
    import os
    import signal

    from fastapi.testclient import TestClient

    from lanner.config import EngineConfig, ServerConfig
    from lanner.server.app import build_app
    from lanner.serving.async_engine import AsyncEngine
    from test_server import ENGINE_ARGS

    engine = AsyncEngine.spawn(EngineConfig.from_kwargs(**ENGINE_ARGS))
    app = build_app(engine, ServerConfig(served_model_name=[MODEL], health_timeout_s=0.5))
    pid = engine.transport.process.pid
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        os.kill(pid, signal.SIGSTOP)
        try:
            assert c.get("/health").status_code == 503
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: c.get("/health").status_code == 200)


# ---- slow senders ----------------------------------------------------------------------------------


def test_slow_headers_and_bodies_do_not_hold_connections():
    """2,000 connections sending a request a byte at a time were all held open, forever. Now
    headers must arrive within --header-timeout-s (the connection is closed) and a body within
    --body-timeout-s (408), while normal clients are served."""
    import socket
    import time

    from lanner.cli import uvicorn_options
    from test_server import serve_in_thread

    app, _ = observed_app(header_timeout_s=0.5, body_timeout_s=0.5)
    for base in serve_in_thread(app, http=uvicorn_options(app.state.config)["http"]):
        host, port = base.removeprefix("http://").split(":")
        silent = [socket.create_connection((host, int(port))) for _ in range(20)]
        trickling = [socket.create_connection((host, int(port))) for _ in range(20)]
        for s in trickling:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()
        partial = socket.create_connection((host, int(port)))
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        for _ in range(4):  # a header line every 0.25 s: each arrives in time, the whole never does
            time.sleep(0.25)
            for s in trickling:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:  # closed by the server already
                    pass
        with httpx.Client(timeout=10) as c:  # a keep-alive client is served across the deadline
            assert c.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code \
                == 200
            time.sleep(0.3)
            assert c.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code \
                == 200
        for s in silent + trickling:
            s.settimeout(5)
            try:
                assert s.recv(1024) == b""  # closed by the server
            except ConnectionResetError:  # closed with data unread
                pass
            s.close()
        partial.settimeout(5)
        assert b" 408 " in partial.recv(4096).split(b"\r\n")[0]
        partial.close()
