"""The server under hostile and careless clients at once, as `lanner serve` runs it (an engine
process): slow readers, clients that leave, huge and nested bodies, heavy stop lists and
slowloris connections, mixed with normal traffic. The normal requests must get the outputs of
their solo runs with a median latency within 2x of an unloaded run (p99 within 3x); memory must stay flat; and at
the end no KV block is used and every gauge is idle."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from test_hardening import deep, metric, wait_for
from test_server import ENGINE_ARGS, MODEL, serve_in_thread

ATTACK_S = float(os.environ.get("LANNER_SOAK_S", "25"))
ALL_KINDS = "slow_reader,leaver,huge_body,nested_body,heavy_stops,slowloris"
ATTACK_KINDS = tuple(os.environ.get("LANNER_SOAK_KINDS", ALL_KINDS).split(","))  # a subset finds which one hurts
PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "# a comment", "x = [",
           "while True:", "return None"]
# ignore_eos: every normal request costs the same tokens, whatever the shipped model's habits with
# EOS; 24 of them keep the unloaded latency well above the scheduling noise of a 2-core machine
NORMAL = {"model": MODEL, "temperature": 0, "max_tokens": 24, "ignore_eos": True}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def normal_round(base: str, client: httpx.Client) -> tuple[dict, list[float]]:
    """Every prompt once, four at a time: texts by prompt and latencies."""
    def one(prompt: str) -> tuple[str, float]:
        start = time.monotonic()
        r = client.post(base + "/v1/completions", json={**NORMAL, "prompt": prompt})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], time.monotonic() - start

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, PROMPTS))
    return dict(zip(PROMPTS, (text for text, _ in results))), [secs for _, secs in results]


def attack(base: str, seconds: float, kinds: tuple[str, ...], ready, results, release) -> None:
    """In a process of its own, as real attackers are: their threads must not take the server's GIL.
    Its start and exit (imports, teardown) fall outside the measured time: `ready` says when it
    attacks, the results when it is done, and it exits once `release`d."""
    attackers = Attackers(base, kinds)
    ready.set()
    results.put(attackers.run(seconds))
    release.wait(120)


def spread(values: list[float]) -> str:
    values = sorted(values)
    return "/".join(f"{values[int(q * (len(values) - 1))]:.2f}" for q in (0.5, 0.9, 0.99, 1)) + " s (p50/p90/p99/max)"


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Attackers:
    """Each kind of bad client in a loop on its own thread (paced: at most PACE_S apart) until
    stopped; counts what it did."""
    PACE_S = 0.5

    def __init__(self, base: str, kinds: tuple[str, ...]) -> None:
        self.base, self.host, port = base, *base.removeprefix("http://").split(":")
        self.port = int(port)
        self.stop = threading.Event()
        self.http = httpx.Client(timeout=60)  # one for all: a client per request costs the attacker CPU of its own
        self.done: dict[str, int] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(getattr(self, kind),), daemon=True)
                        for kind in kinds]

    def run(self, seconds: float) -> tuple[dict, list]:
        for t in self.threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return self.done, self.errors

    def _loop(self, fn) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                fn()
                self.done[fn.__name__] = self.done.get(fn.__name__, 0) + 1
            except Exception as e:  # noqa: BLE001 (reported: the test fails on any, an attack must get a clean answer)
                self.errors.append(f"{fn.__name__}: {type(e).__name__}: {e}")
            self.stop.wait(max(0.0, self.PACE_S - (time.monotonic() - start)))

    def _socket(self, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect((self.host, self.port))
        return s

    def slow_reader(self) -> None:
        """A stream of many long samples with logprobs from a socket that never reads: it is aborted."""
        body = json.dumps({"model": MODEL, "prompt": "class A:", "stream": True, "logprobs": 5,
                           "max_tokens": 300, "ignore_eos": True}).encode()
        with self._socket(rcvbuf=4096) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.stop.wait(3)  # past the stall timeout: the server aborts it

    def leaver(self) -> None:
        with self.http.stream("POST", self.base + "/v1/completions", json={
                "model": MODEL, "prompt": "def f():", "stream": True, "max_tokens": 200, "ignore_eos": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))

    def huge_body(self) -> None:
        r = self.http.post(self.base + "/v1/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
                           headers={"content-type": "application/json"})
        assert r.status_code == 413, r.status_code

    def nested_body(self) -> None:
        r = self.http.post(self.base + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": deep(500)})
        assert r.status_code == 400, r.status_code
        r = self.http.post(self.base + "/v1/completions", content=b"[" * 50_000 + b"]" * 50_000,
                           headers={"content-type": "application/json"})
        assert r.status_code == 400, r.status_code

    def heavy_stops(self) -> None:
        stops = [f"{i}" + "never" * 200 for i in range(64)]  # as many and as long as the limits allow
        r = self.http.post(self.base + "/v1/completions", json={
            "model": MODEL, "prompt": "import os", "max_tokens": 4, "stop": stops})
        assert r.status_code == 200, r.text
        r = self.http.post(self.base + "/v1/completions", json={
            "model": MODEL, "prompt": "import os", "n": 16, "stop": [f"s{i}" for i in range(20_000)]})
        assert r.status_code == 400, r.status_code

    def slowloris(self) -> None:
        with self._socket() as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(10)
            try:
                while s.recv(1024):
                    pass
            except ConnectionResetError:
                pass  # closed by the server: what should happen


def test_soak_hostile_clients_leave_normal_traffic_alone():
    from lanner.cli import uvicorn_options
    from lanner.config import EngineConfig, ServerConfig
    from lanner.server.app import build_app
    from lanner.server.metrics import ServerMetrics
    from lanner.serving.async_engine import AsyncEngine, engine_stats

    metrics = ServerMetrics()
    config = ServerConfig(served_model_name=[MODEL], stream_stall_timeout_s=1.0, header_timeout_s=1.0,
                          body_timeout_s=2.0, max_request_body_mb=1.0)
    engine = AsyncEngine.spawn(EngineConfig.from_kwargs(**ENGINE_ARGS), observer=metrics)
    app = build_app(engine, config, metrics)
    engine_pid = engine.transport.process.pid
    for base in serve_in_thread(app, http=uvicorn_options(config)["http"]):
        with httpx.Client(timeout=60) as client:
            solo = {p: client.post(base + "/v1/completions", json={**NORMAL, "prompt": p}).json()["choices"][0]["text"]
                    for p in PROMPTS}
            unloaded = []
            for _ in range(5):
                texts, secs = normal_round(base, client)
                assert texts == solo
                unloaded += secs
            memory = (rss_mb(os.getpid()), rss_mb(engine_pid))
            loaded, rounds = [], 0
            ctx = multiprocessing.get_context("spawn")
            ready, results, release = ctx.Event(), ctx.Queue(), ctx.Event()
            attacker = ctx.Process(target=attack, args=(base, ATTACK_S, ATTACK_KINDS, ready, results, release),
                                   daemon=True)
            attacker.start()
            assert ready.wait(120)  # its imports done: from here on it only attacks
            time.sleep(1)
            while results.empty():
                texts, secs = normal_round(base, client)
                assert texts == solo
                loaded += secs
                rounds += 1
            done, errors = results.get(timeout=60)
            release.set()
            attacker.join(60)
            assert not errors, errors[:5]
            assert all(done.get(kind, 0) >= 2 for kind in ATTACK_KINDS), done
            grown = (rss_mb(os.getpid()) - memory[0], rss_mb(engine_pid) - memory[1])
            print(f"soak: {rounds} rounds, attacks {done}; latency unloaded {spread(unloaded)}, loaded "
                  f"{spread(loaded)}; memory grew {grown[0]:.0f} MB (server), {grown[1]:.0f} MB (engine)")
            # steady interference at the median; stalls at p99, whose one or two samples on 2 shared cores
            # vary with the machine (unloaded 0.43-0.62 s, loaded 0.82-0.97 s in five runs of one tree)
            assert quantile(loaded, 0.5) <= 2 * quantile(unloaded, 0.5)
            assert quantile(loaded, 0.99) <= 3 * quantile(unloaded, 0.99)
            assert grown[0] < 50 and grown[1] < 50  # flat: a backlog once grew by gigabytes
            wait_for(lambda: engine.call(engine_stats).result(30).used_blocks == 0)
            stats = engine.call(engine_stats).result(30)
            assert stats.running == 0 and stats.waiting == 0 and not stats.busy
            wait_for(lambda b=base: metric(b, "lanner_num_requests_running") == 0)
            assert metric(base, "lanner_num_requests_waiting") == 0 and metric(base, "lanner_kv_cache_usage") == 0
