"""`lanner bench serve`: a load generator for any OpenAI-compatible completions endpoint.

Requests arrive as a Poisson process at each `--request-rate` (inf: all at once,
a burst), optionally capped at `--max-concurrency` in flight. Prompts are random
token ids of `--input-len` (any server that accepts token-id prompts: lanner,
vLLM, SGLang) or the lines of a JSONL dataset ({"prompt": ..., "output_len": ...}).
Each request streams; time to first token (TTFT), inter-token latency (ITL,
between content chunks), time per output token (TPOT, after the first) and
end-to-end latency are measured on the client. Output tokens come from the
final usage chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty

from lanner.bench import common
from lanner.errors import ConfigError


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    sent: float = 0.0  # time.monotonic() when it was sent
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def load_dataset(args: argparse.Namespace) -> list[tuple[str | list[int], int]] | None:
    if not args.dataset:
        return None
    with open(args.dataset) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["prompt"], int(r.get("output_len", args.output_len))) for r in rows[:args.num_prompts]]


def make_requests(args: argparse.Namespace, sweep_index: int,
                  dataset: list[tuple[str | list[int], int]] | None) -> list[tuple[str | list[int], int]]:
    """The prompts of one rate of the sweep. Synthetic prompts are new at each rate, so a server's
    prefix cache cannot serve later rates from the blocks of earlier ones; a dataset's are not."""
    if dataset is not None:
        return dataset
    rng = random.Random(f"{args.seed}-{sweep_index}")
    return [([rng.randrange(10, 1000) for _ in range(args.input_len)], args.output_len)
            for _ in range(args.num_prompts)]


def auth_headers(args: argparse.Namespace) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


async def one_request(session, url: str, body: dict, headers: dict) -> Result:
    res = Result(sent=time.monotonic())
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return res
            async for line in r.content:  # SSE: "data: {...}" lines, blank lines between events
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # one chunk per step with tokens (its text may be empty)
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 (a failed request is counted, not the end of the run: HTTP and
        # connection errors, timeouts, a line over read_bufsize, a chunk that is not what it should be)
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.ok = True
    return res


async def send_share(url: str, model: str, rate: float, requests: list[tuple[str | list[int], int]], seed: int,
                     concurrency: int | None, timeout: float, headers: dict,
                     ready: Callable[[], None] | None = None) -> tuple[list[Result], float]:
    """One event loop's requests, arriving as a Poisson process at `rate` (inf: all at once), and
    when it began sending (time.monotonic()). `ready` (blocking) is called once the client and the
    bodies are built, before the first send: the measured duration must not include this process's
    start (importing the HTTP client and building it took ~130 ms on a 2-core machine, time a burst
    would count as the server's). The client is aiohttp, as in vLLM's and SGLang's serving
    benchmarks: httpx took ~4x its CPU per streamed chunk (docs/serving.md, "Measuring")."""
    import aiohttp

    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(requests))

    async def limited(session, body):
        async with limit:
            return await one_request(session, url, body, headers)

    bodies = [{"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}} for prompt, output_len in requests]
    # idle connections are dropped before a server's keep-alive timeout (uvicorn: 5 s) can close one
    # under a request being sent on it; `timeout` bounds the connect and each read, as httpx's did
    connector = aiohttp.TCPConnector(limit=concurrency or 1000, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=2 ** 20, trust_env=True,  # proxies, as urllib
                                     timeout=aiohttp.ClientTimeout(total=None, connect=timeout,
                                                                   sock_read=timeout)) as session:
        if ready is not None:
            await asyncio.to_thread(ready)
        began = time.monotonic()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(session, body)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks), began


def _client_process(barrier, results, share: dict) -> None:
    """A client process: gets ready, waits for the others, sends its share, reports (results, when
    it began sending, when it ended)."""
    out, began = asyncio.run(send_share(**share, ready=barrier.wait))
    results.put((out, began, time.monotonic()))


def run_rate(args: argparse.Namespace, model: str, rate: float, requests: list[tuple[str | list[int], int]]) -> dict:
    """All requests of one rate. Over several client processes, each takes every n-th request at
    rate / n (their sum is a Poisson process at `rate`) and a share of --max-concurrency: one Python
    process parsing every chunk of hundreds of streams is slower than a fast server (measured:
    docs/serving.md, "Measuring")."""
    processes = max(1, min(args.client_processes, len(requests), args.max_concurrency or len(requests)))
    shares = [{"url": args.base_url.rstrip("/") + "/v1/completions", "model": model, "rate": rate / processes,
               "requests": requests[i::processes], "seed": args.seed + 1 + i, "timeout": args.timeout,
               "headers": auth_headers(args),
               "concurrency": args.max_concurrency and args.max_concurrency // processes
               + (i < args.max_concurrency % processes)} for i in range(processes)]
    if processes == 1:
        results, began = asyncio.run(send_share(**shares[0]))
        return summarize(rate, results, began, time.monotonic(), args.max_concurrency)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fork could copy a lock held by another thread of the caller
    barrier, queue = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [ctx.Process(target=_client_process, args=(barrier, queue, share), daemon=True) for share in shares]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 300
    while barrier.n_waiting < processes:  # a process that fails while getting ready must not leave us waiting
        _check_clients(workers)
        if time.monotonic() > deadline:
            raise RuntimeError("the client processes of lanner bench serve were not ready within 300 s")
        time.sleep(0.01)
    barrier.wait(timeout=60)
    outs = []
    while len(outs) < processes:
        try:
            outs.append(queue.get(timeout=1.0))
        except Empty:
            _check_clients(workers)
    for w in workers:
        w.join()
    # the earliest to begin sets the start (CLOCK_MONOTONIC: one clock for every process of the machine)
    return summarize(rate, [r for results, _, _ in outs for r in results], min(began for _, began, _ in outs),
                     max(end for _, _, end in outs), args.max_concurrency)


def _check_clients(workers) -> None:
    if any(w.exitcode not in (None, 0) for w in workers):
        raise RuntimeError("a client process of lanner bench serve failed")


def percentiles(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {}
    values = sorted(values)

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * scale, 2)

    return {"mean": round(statistics.mean(values) * scale, 2), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(rate: float, results: list[Result], start: float, end: float, max_concurrency: int | None) -> dict:
    """`start`: when the first client began sending (time.monotonic()); `end`: when the last finished."""
    ok = [r for r in results if r.ok]
    duration = end - start
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "request_rate": "inf" if rate == float("inf") else rate, "max_concurrency": max_concurrency,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": round(duration, 3),
        "requests_per_s": round(len(ok) / duration, 3), "output_tok_per_s": round(out_tokens / duration, 1),
        "total_tok_per_s": round((out_tokens + in_tokens) / duration, 1), "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft for r in ok]), "tpot_ms": percentiles([r.tpot for r in ok if r.tpot]),
        "itl_ms": percentiles([x for r in ok for x in r.itl]), "e2e_ms": percentiles([r.e2e for r in ok]),
        # when each request (failed ones too) left its client, from the start: a burst's spread is the
        # clients'; under --max-concurrency a request leaves when a slot frees, so it is the server's pace
        "sent_ms": percentiles([r.sent - start for r in results]),
    }


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["request_rate"]) for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].bar(labels, [r["output_tok_per_s"] for r in rows])
    ax[0].set(title="output tokens/s", xlabel="request rate (req/s)")
    for i, key, name in ((1, "ttft_ms", "TTFT (ms)"), (2, "tpot_ms", "TPOT (ms)")):
        for q in ("p50", "p99"):
            ax[i].plot(labels, [r[key].get(q, 0) for r in rows], "o-", label=q)
        ax[i].set(title=name, xlabel="request rate (req/s)")
        ax[i].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# lanner's /metrics, read before and after each rate: what the server and its engine did in it (absent
# for servers without these names). Counters by sample name; latency histograms by their _sum and _count.
ENGINE_COUNTERS = {"steps": "lanner_engine_steps_total", "tokens_computed": "lanner_engine_tokens_computed_total",
                   "step_s": "lanner_engine_step_seconds_total",
                   "between_steps_s": "lanner_engine_between_steps_seconds_total"}
LATENCIES = {"ttft": "lanner_time_to_first_token_seconds", "e2e": "lanner_e2e_request_latency_seconds",
             "handoff": "lanner_request_handoff_seconds", "queue": "lanner_request_queue_time_seconds",
             "inference": "lanner_request_inference_time_seconds"}


def server_metrics(args: argparse.Namespace) -> dict[str, float] | None:
    """lanner's counters and latency sums from GET /metrics, once its engine is idle (its stats reach
    the server with the last outputs of a burst, or soon after); None from a server without them."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(ENGINE_COUNTERS.values()) | {f"{n}_{end}" for n in LATENCIES.values() for end in ("sum", "count")}
    request = urllib.request.Request(args.base_url.rstrip("/") + "/metrics", headers=auth_headers(args))
    for _ in range(20):
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                text = r.read().decode()
        except OSError:
            return None
        samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
        if samples.get("lanner_num_requests_running", 0) == 0:
            break
        time.sleep(0.1)
    found = {name: value for name, value in samples.items() if name in wanted}
    return found if len(found) == len(wanted) else None


def server_split(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """What the server's /metrics say of one rate: its engine's steps, tokens and seconds inside and
    between steps (against an offline run's steps and wall time: more steps, or slower ones?), and
    the mean of each latency part from the server's receipt (docs/serving.md, "Measuring")."""
    if before is None or after is None:
        return None
    delta = {name: after[name] - before[name] for name in after}
    split = {key: round(delta[name], 3) for key, name in ENGINE_COUNTERS.items()}
    for key, name in LATENCIES.items():
        count = delta[f"{name}_count"]
        split[f"mean_{key}_ms"] = round(delta[f"{name}_sum"] / count * 1e3, 2) if count else None
    return split


def served_model(args: argparse.Namespace) -> str:
    """The server's first model (GET /v1/models)."""
    request = urllib.request.Request(args.base_url.rstrip("/") + "/v1/models", headers=auth_headers(args))
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def main(args: argparse.Namespace) -> None:
    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"`lanner bench serve` needs the bench extra: pip install 'lanner[bench]' ({e})") from e
    if args.client_processes < 1:
        raise ConfigError(f"--client-processes must be at least 1, not {args.client_processes}")
    model = args.model if args.model is not None else served_model(args)
    dataset = load_dataset(args)
    rows = []
    for sweep_index, rate in enumerate(args.request_rate):
        requests = make_requests(args, sweep_index, dataset)
        before = server_metrics(args)
        rows.append(run_rate(args, model, rate, requests))
        rows[-1]["server"] = server_split(before, server_metrics(args))
        print(json.dumps(rows[-1]), flush=True)
    if args.plot:
        plot(rows, args.plot, f"lanner bench serve: {model} at {args.base_url}")
    workload = {"num_prompts": len(requests), "input_len": None if args.dataset else args.input_len,
                "output_len": args.output_len, "dataset": args.dataset, "seed": args.seed, "greedy": True,
                "ignore_eos": True}
    common.emit(common.record("serve", {"served_model": model, "base_url": args.base_url}, workload, {"rates": rows}),
                args.output_json)


def add_parser(kinds) -> None:
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible server (lanner serve, or any other)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="requests per second, Poisson arrivals; several values make a sweep; inf: a burst")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--client-processes", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                   help="processes sending the requests (each its share): one Python process cannot read "
                        "the chunks of hundreds of streams as fast as a fast server sends them")
    p.add_argument("--input-len", type=int, default=256, help="random token-id prompts of this length")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", default=None, help='JSONL of {"prompt": str or token ids, "output_len": int}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--plot", default=None, help="write a PNG of the sweep here")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=main, serve_bench=True)
