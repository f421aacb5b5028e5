"""What a hostile or careless client can do to the server: each defect found by probing it
has a test here that failed before its fix."""
# ruff: noqa: F811 (pytest fixtures imported from test_server are parameters here)
from __future__ import annotations

import httpx
import pytest

from test_server import MODEL, client, offline, server  # noqa: F401 (fixtures)

LONG_STOP = "this stop string is longer than anything generated so far"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_text_equals_the_whole_text_for_any_stop_strings(client, path):
    """visible_text() once computed text[:len - hold] with len < hold, a negative index."""
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
    runner.launch = lambda sched: (time.sleep(0.02), launch(sched))[1]  # slow enough to disconnect mid-way
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
        runner.launch = lambda sched: (_ for _ in ()).throw(RuntimeError("injected"))
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
    runner.launch = lambda sched: (time.sleep(0.02), launch(sched))[1]  # 400 steps: 8 s or more
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
