"""AsyncEngine: an LLMEngine's step loop behind per-request asyncio streams.

Two halves. `EngineLoop` owns the `LLMEngine` (which is not thread-safe) and runs
the steps; between steps it runs the commands callers posted (add, abort, call),
and it reports through a sink: each step's outputs in one batch, the requests of
a failed step, its own death. Nothing a caller sends can stop it: a bad request
fails in `add` and the error goes back to that caller; an exception inside a step
fails the requests of that step (logged once) and the loop goes on; after
`max_step_failures` failures in a row the engine is dead and every request gets
`EngineDead`.

`AsyncEngine` is the callers' half: `generate()` streams, `abort()`, `call()`.
The loop runs on a thread of this process (`AsyncEngine(engine)`) or in a child
process (`AsyncEngine.spawn(config)`, lanner/serving/engine_process.py), which is
what `lanner serve` uses: a server's event loop and a step loop in one process
share the GIL and slow each other down under load.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from lanner.core.request import RequestOutput, RequestOutputKind, SamplingParams, merge_deltas
from lanner.engine.engine import LLMEngine, PromptType
from lanner.errors import EngineDead, InvalidRequest, LannerError, ServerOverloaded, without_frames

logger = logging.getLogger(__name__)


class StepFailed(LannerError, RuntimeError):
    """The engine raised while running a step that included this request."""


@dataclass
class EngineInfo:
    """What callers need to know about the engine without touching it."""
    max_model_len: int
    sampling_defaults: dict
    tokenizer_path: str | None  # the folder the engine loaded its tokenizer from (None: it has none)
    reasoning_parser: str | None = None  # the model's reasoning comes first, in <think>...</think>


@dataclass
class EngineStats:
    running: int
    waiting: int
    used_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    preemptions: int
    busy: bool
    speculation: dict | None = None  # SpeculationStats.as_dict(): totals since start
    steps: int = 0  # engine steps since start
    tokens_computed: int = 0  # tokens through the model since start (prompt chunks, decodes, drafts verified)
    step_seconds: float = 0.0  # wall time inside the engine's steps since start
    between_steps_seconds: float = 0.0  # wall time between its steps while requests were unfinished


def engine_stats(engine: LLMEngine) -> EngineStats:
    kv = engine.kv_cache.stats()
    speculation = engine.speculator.stats.as_dict() if engine.speculator is not None else None
    return EngineStats(len(engine.scheduler.running), len(engine.scheduler.waiting), kv.used_blocks, kv.usage,
                       kv.hit_rate, engine.scheduler.num_preemptions, engine.has_unfinished_requests(), speculation,
                       engine.num_steps, engine.num_tokens_computed, engine.step_seconds,
                       engine.between_steps_seconds)


class Sink(Protocol):
    """Where an EngineLoop reports (called on the loop's thread)."""
    def outputs(self, items: list[tuple[str, RequestOutput]], stats: EngineStats | None) -> None: ...
    def failed(self, request_ids: list[str], message: str) -> None: ...
    def died(self, message: str, error: str | None) -> None: ...


class EngineLoop:
    STATS_EVERY_S = 0.25  # stats are a pickle and a pipe message for the server: sampled, not every step
    LOG_EVERY_S = 10.0

    def __init__(self, engine: LLMEngine, sink: Sink, max_waiting_requests: int | None = None,
                 max_step_failures: int = 3):
        self.engine, self.sink = engine, sink
        self.max_waiting_requests = max_waiting_requests
        self.max_step_failures = max_step_failures
        self.live: set[str] = set()  # requests whose outputs someone waits for
        self.stopping = False
        self.dead: BaseException | None = None
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._closed = False  # set (under _lock) when the loop takes no more commands
        self._lock = threading.Lock()
        self._last_stats = 0.0
        self._aborted: list[tuple[str, RequestOutput]] = []
        self._last_log = (time.monotonic(), 0, 0)  # time, tokens computed, tokens generated

    def info(self) -> EngineInfo:
        e = self.engine
        return EngineInfo(e.max_model_len, dict(e.sampling_defaults), e.tokenizer_path,
                          e.config.structured.reasoning_parser)

    # ---- commands (run on the loop's thread, between steps) ----------------------------

    def post(self, command: Callable[[], None]) -> bool:
        """Queue a command; False once the loop has stopped taking them."""
        with self._lock:
            if self._closed:
                return False
            self._commands.put(command)
            return True

    def stop(self) -> None:
        self.stopping = True
        self.post(lambda: None)  # wake the loop

    def not_running(self) -> EngineDead:
        return EngineDead(f"the engine is not running: {self.dead or 'shutting down'}")

    def add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        if self.dead is not None or self.stopping:
            raise self.not_running()
        waiting, limit = len(self.engine.scheduler.waiting), self.max_waiting_requests
        if limit is not None and params.n > limit:  # sequences count, not requests: n samples are n of them
            raise InvalidRequest(f"n={params.n} is more sequences than may wait at once (--max-waiting-requests "
                                 f"{limit})")
        if limit is not None and waiting + params.n > limit:
            raise ServerOverloaded(f"{waiting} sequences are already waiting (--max-waiting-requests {limit}); "
                                   "retry later")
        self.engine.add_request(request_id, prompt, params)
        self.live.add(request_id)

    def abort(self, request_id: str) -> None:
        self.live.discard(request_id)
        out = self.engine.abort_request(request_id)
        if out is not None:  # reported after the commands (metrics count it; nobody reads its stream)
            self._aborted.append((request_id, out))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.dead is not None or self.stopping:
            raise self.not_running()
        return fn(self.engine, *args)

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run_steps()
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            logger.exception("the engine loop crashed")
            self._die(e if isinstance(e, Exception) else RuntimeError(repr(e)))
        finally:
            self.engine.shutdown()  # its other tensor-parallel ranks, if any

    def _run_steps(self) -> None:
        failures = 0
        while not self.stopping:
            busy = self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=not busy, timeout=None if busy else 0.1)
            except queue.Empty:
                command = None
            while command is not None:
                command()
                command = self._commands.get_nowait() if not self._commands.empty() else None
            if self._aborted:  # with fresh stats: an abort may leave the engine idle, with no step to report it
                aborted, self._aborted = self._aborted, []
                self.sink.outputs(aborted, engine_stats(self.engine))
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as e:
                failures += 1
                logger.exception("engine step failed (%d in a row)", failures)
                self._fail_step(e)
                if failures >= self.max_step_failures or self.engine.dead is not None:  # dead: a rank failed
                    self._die(e)
                    return
                continue
            self._dispatch(outputs)
            self._log_stats()
        self._die(None)

    def _log_stats(self) -> None:
        """Throughput and queues every LOG_EVERY_S while busy, as vLLM logs them (--disable-log-stats)."""
        e = self.engine
        now = time.monotonic()
        then, computed, generated = self._last_log
        if e.config.disable_log_stats or now - then < self.LOG_EVERY_S:
            return
        self._last_log = (now, e.num_tokens_computed, e.num_tokens_generated)
        stats = engine_stats(e)
        logger.info("engine: %.1f tokens/s through the model, %.1f generated tokens/s; %d running, %d waiting; "
                    "KV cache %.1f%% used, prefix cache hit rate %.1f%%", (e.num_tokens_computed - computed) / (now - then),
                    (e.num_tokens_generated - generated) / (now - then), stats.running, stats.waiting,
                    100 * stats.kv_usage, 100 * stats.prefix_hit_rate)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        items = []
        for out in outputs:
            if out.request_id in self.live:
                items.append((out.request_id, out))
                if out.finished:
                    self.live.discard(out.request_id)
        now = time.monotonic()
        stats = None
        # and after the step that leaves the engine idle, so the gauges do not keep a busy value
        if now - self._last_stats >= self.STATS_EVERY_S or not self.engine.has_unfinished_requests():
            self._last_stats = now
            stats = engine_stats(self.engine)
        if items or stats is not None:
            self.sink.outputs(items, stats)

    def _fail_step(self, error: Exception) -> None:
        failed = [rid for rid in self.engine.fail_step() if rid in self.live]
        self.live.difference_update(failed)
        if failed:
            self.sink.failed(failed, f"the engine failed while running this request: {type(error).__name__}: {error}")

    def _die(self, error: Exception | None) -> None:
        """Fail every request and accept no more (on an unrecoverable error, or at shutdown)."""
        if error is not None:
            self.dead = error
        with self._lock:
            self._closed = True  # from here on, post() refuses
        for request_id in list(self.live):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # a broken engine may fail here too; the request is failed either way
                logger.exception("abort during shutdown failed")
        self.live.clear()
        self.sink.died(f"the engine stopped: {error}" if error else "the server is shutting down",
                       None if error is None else repr(error))
        while not self._commands.empty():  # queued adds fail with EngineDead, aborts are harmless
            try:
                self._commands.get_nowait()()
            except Exception:
                logger.exception("a command failed during shutdown")


def _no_op(engine: LLMEngine) -> None:
    """What a liveness probe runs on the engine loop (module-level: it crosses to an engine process)."""


class Transport(Protocol):
    """How an AsyncEngine reaches its EngineLoop."""
    info: EngineInfo
    def start(self) -> None: ...
    def request(self, op: str, *args: Any) -> Future: ...
    def alive(self) -> bool: ...
    def shutdown(self, timeout: float) -> None: ...


class Mailbox:
    """The hand-off of outputs to a reader, bounded whatever the reader's speed. Per key one
    slot: a newer cumulative output replaces one not taken yet (it holds everything before it);
    DELTA outputs not taken yet are merged when taken, so the reader gets everything it missed
    in one piece, never more than the request's whole output. An error or a finished output is
    never replaced (an error replaces deltas not taken: the request is over)."""

    def __init__(self, deltas: bool = False) -> None:
        self.deltas = deltas
        self.items: dict[Any, Any] = {}  # key -> an output or error (deltas: a list of outputs)
        self.ready = asyncio.Event()
        self.waiting_since: float | None = None  # when the oldest item not taken arrived

    def put(self, key: Any, item: Any) -> None:
        held = self.items.get(key)
        last = held[-1] if isinstance(held, list) else held
        if isinstance(last, BaseException) or getattr(last, "finished", False):
            return
        if not self.items:
            self.waiting_since = time.monotonic()
        if self.deltas and isinstance(item, RequestOutput):
            if isinstance(held, list):
                held.append(item)
            else:
                self.items[key] = [item]
        else:
            self.items[key] = item
        self.ready.set()

    async def take(self) -> dict[Any, Any]:
        await self.ready.wait()
        self.ready.clear()
        items, self.items, self.waiting_since = self.items, {}, None
        return {key: merge_deltas(item) if isinstance(item, list) else item for key, item in items.items()}

    def stalled_for(self) -> float:
        return time.monotonic() - self.waiting_since if self.waiting_since is not None else 0.0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    mailbox: Mailbox
    received: float  # time.monotonic() when the caller asked: latencies count from here, as a client sees them


def _put_soon(loop: asyncio.AbstractEventLoop, items: list[tuple[Mailbox, Any]]) -> None:
    """Hand items to mailboxes of one event loop in a single wake-up of that loop."""

    def put_all() -> None:
        for mailbox, item in items:
            mailbox.put(None, item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        pass


class RequestStream:
    """A request that AsyncEngine.generate added: its outputs, by async iteration. Leaving the
    iteration before the last output aborts the request, and so does closing the stream before any
    read of it began (`close_unread()`, `aclose()`), or dropping it unread: the add left at once, so
    a stream nobody reads must not leave its request running."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream, added: Future) -> None:
        self._engine, self._request_id, self._stream, self._added = engine, request_id, stream, added
        self._outputs = self._read()
        # aborts the request once, if no read began first (a read detaches it): on close_unread, or
        # when the stream is collected
        self._unread = weakref.finalize(self, engine._abandon, request_id, stream)
        self._unread.atexit = False

    def __aiter__(self) -> RequestStream:
        return self

    def __anext__(self):
        return self._outputs.__anext__()

    def close_unread(self) -> None:
        """Abort the request if no read of it has begun (a begun read aborts it when it leaves early)."""
        self._unread()

    async def aclose(self) -> None:
        self.close_unread()
        await self._outputs.aclose()

    async def _read(self) -> AsyncIterator[RequestOutput]:
        if self._unread.detach() is None:  # closed unread already (an __anext__ made before, awaited after)
            return
        engine, request_id, stream = self._engine, self._request_id, self._stream
        running = True  # a caller that leaves while the request runs (even while its add is queued) aborts it
        try:
            try:
                await asyncio.wrap_future(self._added)
            except Exception:  # the add failed: no request
                running = False
                raise
            while running:
                item = (await stream.mailbox.take())[None]
                if isinstance(item, BaseException):
                    running = False
                    raise item
                running = not item.finished
                yield item
        finally:
            engine._drop_stream(request_id, stream)
            if running:
                engine.abort(request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, max_waiting_requests: int | None = None,
                 max_step_failures: int = 3, observer: Any = None,
                 transport: Callable[[Sink], Transport] | None = None):
        """A loop on a thread over `engine`, or over the transport that `transport(sink)` makes
        (see `spawn`). observer (optional): record_stats(EngineStats), record_finished(RequestOutput,
        [received, delivered]: this process's time.monotonic() of the request's call to generate and
        of its final output's arrival here, when it still had a stream)."""
        self.observer = observer
        self._streams: dict[str, _Stream] = {}
        self.dead: str | None = None
        self._probe: Future | None = None  # the liveness probe in flight (responsive())
        if transport is None:
            assert engine is not None
            self.transport: Transport = ThreadTransport(engine, self, max_waiting_requests, max_step_failures)
        else:
            self.transport = transport(self)
        self.info = self.transport.info

    @classmethod
    def spawn(cls, config: Any, max_waiting_requests: int | None = None, max_step_failures: int = 3,
              observer: Any = None) -> AsyncEngine:
        """The engine loop in a child process, built there from `config` (an EngineConfig);
        raises the child's error if the engine cannot be built."""
        from lanner.serving.engine_process import ProcessTransport

        return cls(observer=observer, transport=lambda sink: ProcessTransport(
            config, sink, max_waiting_requests, max_step_failures))

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.transport.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left, stop the loop."""
        self.transport.shutdown(timeout)

    @property
    def is_running(self) -> bool:
        return self.transport.alive() and self.dead is None

    # ---- the callers' side ---------------------------------------------------------------

    def generate(self, request_id: str, prompt: PromptType, params: SamplingParams) -> RequestStream:
        """Add a request and return its outputs, to iterate: of `params.output_kind` (cumulative
        ones the caller was too slow to take are skipped, deltas it was too slow to take are merged),
        the last with `finished`. The add leaves for the engine in this call, before the caller next
        yields to its event loop: a burst's requests reach the engine as the server parses each, not
        after it has parsed them all (a handler yields several times before its outputs are read).
        The iteration raises the request's error (InvalidRequest, ServerOverloaded, EngineDead,
        StepFailed); leaving it early (a client that went away) aborts the request, as
        `close_unread()` does for one never iterated. A request id still in use raises
        InvalidRequest here."""
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), Mailbox(params.output_kind is RequestOutputKind.DELTA),
                         time.monotonic())
        self._streams[request_id] = stream  # before the add: the first output may come at once
        added = self.transport.request("add", request_id, prompt, params)
        return RequestStream(self, request_id, stream, added)

    def _drop_stream(self, request_id: str, stream: _Stream) -> None:
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]

    def _abandon(self, request_id: str, stream: _Stream) -> None:
        """A request whose stream is closed unread: nobody waits for it."""
        self._drop_stream(request_id, stream)
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.transport.request("abort", request_id)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(engine, *args) on the engine loop (to read its state safely). With an engine
        process, fn and args must pickle (a module-level function, not a lambda)."""
        return self.transport.request("call", fn, *args)

    async def responsive(self, timeout: float) -> bool:
        """The engine loop ran a no-op within `timeout` seconds: it is neither stuck in a step nor
        stopped (a paused engine process). Callers share the probe in flight, so asking often
        queues at most one command."""
        if not self.is_running:
            return False
        if self._probe is None or self._probe.done():
            self._probe = self.call(_no_op)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._probe)), timeout)
            return True
        except Exception:  # timed out, or the engine went away
            return False

    async def stats(self) -> EngineStats:
        return await asyncio.wrap_future(self.call(engine_stats))

    # ---- the sink: called on the loop's thread (or the engine process's reader) ----------------

    def outputs(self, items: list[tuple[str, RequestOutput]], stats: EngineStats | None) -> None:
        now = time.monotonic()
        for request_id, out in items:
            if out.finished:
                stream = self._streams.get(request_id)
                self._observe("record_finished", out, *((stream.received, now) if stream else ()))
        self._deliver(items)
        if stats is not None:
            self._observe("record_stats", stats)

    def failed(self, request_ids: list[str], message: str) -> None:
        self._deliver([(request_id, StepFailed(message)) for request_id in request_ids])

    def died(self, message: str, error: str | None) -> None:
        if error is not None:
            self.dead = error
        self._observe("record_dead", message)  # nothing runs or waits any more
        self._fail_streams(message)

    def fail_open_requests(self, message: str) -> None:
        """End every open stream with EngineDead (a drain deadline): each response ends properly
        (a 503 body, or an error event and [DONE]) instead of being cut. Any thread may call it."""
        if self._streams:
            logger.warning("%s: ending %d open requests", message, len(self._streams))
        self._fail_streams(message)

    def _fail_streams(self, message: str) -> None:
        self._deliver([(request_id, EngineDead(message)) for request_id in list(self._streams)])

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """To the streams of these requests, in one wake-up per event loop (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, Any]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.mailbox, item))
        for loop, batch in by_loop.items():
            _put_soon(loop, batch)

    def _observe(self, method: str, *args: Any) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, method)(*args)
            except Exception:  # metrics must never stop serving
                logger.exception("metrics observer failed")


class ThreadTransport:
    """The EngineLoop on a daemon thread of this process."""

    def __init__(self, engine: LLMEngine, sink: Sink, max_waiting_requests: int | None, max_step_failures: int):
        self.loop = EngineLoop(engine, sink, max_waiting_requests, max_step_failures)
        self.info = self.loop.info()
        self.engine = engine  # for tests that reach inside
        self._thread = threading.Thread(target=self.loop.run, name="lanner-engine", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def request(self, op: str, *args: Any) -> Future:
        future: Future = Future()
        method = getattr(self.loop, op)

        def run() -> None:
            if not future.set_running_or_notify_cancel():  # the caller gave up waiting
                return
            try:
                future.set_result(method(*args))
            except BaseException as e:  # handed to the caller, never raised in the loop
                future.set_exception(without_frames(e))

        if not self.loop.post(run):
            future.set_exception(self.loop.not_running())
        return future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float) -> None:
        self.loop.stop()
        self._thread.join(timeout)
