"""AsyncEngine: the step loop on a background thread, streams for asyncio callers.

The `LLMEngine` is not thread-safe, so only the engine thread touches it:
callers post commands (add, abort) to a queue, and the thread runs them
between steps. Outputs go back to each request's asyncio queue through its
event loop. Nothing a caller sends can stop the loop: a bad request fails in
`add_request` and raises in the caller; an exception inside a step fails the
requests of that step (logged once) and the loop goes on; after
`max_step_failures` failures in a row the engine is declared dead and every
request gets `EngineDead`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from lanner.engine.engine import LLMEngine, PromptType
from lanner.engine.request import RequestOutput, SamplingParams
from lanner.errors import EngineDead, LannerError, ServerOverloaded

logger = logging.getLogger(__name__)


class StepFailed(LannerError, RuntimeError):
    """The engine raised while running a step that included this request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        _deliver(self.loop, [(self.queue, item)])


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Hand items to queues of one event loop in a single wake-up of that loop."""

    def put_all() -> None:
        for q, item in items:
            q.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None, max_step_failures: int = 3,
                 observer: Any = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.max_step_failures = max_step_failures
        self.observer = observer  # optional: record_step(engine), record_finished(output)
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._loop, name="lanner-engine", daemon=True)
        self._stopping = False
        self._closed = False  # set (under _lock) when the thread takes no more commands
        self._lock = threading.Lock()
        self.dead: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left, stop the thread."""
        self._stopping = True
        self._commands.put(lambda: None)  # wake the loop
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    # ---- the caller's side -----------------------------------------------------------

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it progresses (cumulative; those the caller was too slow to
        take are skipped), the last with `finished`; raises the
        request's error (InvalidRequest, ServerOverloaded, EngineDead, StepFailed). Leaving the
        iteration early (a client that went away) aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        try:
            await asyncio.wrap_future(self._call(lambda: self._add(request_id, prompt, params, stream)))
        except asyncio.CancelledError:  # the caller left while the add was queued: it may have run anyway
            self.abort(request_id)
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                # outputs are cumulative, so a caller that fell behind skips to the latest: under
                # load the server sends fewer, larger chunks instead of falling further behind
                while isinstance(item, RequestOutput) and not item.finished and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post(lambda: self._abort(request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run fn(engine) on the engine thread (to read its state safely)."""
        return self._call(lambda: fn(self.engine))

    # ---- the engine thread -------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():  # the caller gave up waiting
                return
            if self.dead is not None or self._stopping:
                future.set_exception(EngineDead(f"the engine is not running: {self.dead or 'shutting down'}"))
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, never raised in the loop
                future.set_exception(e)

        if not self._post(run):
            future.set_exception(EngineDead(f"the engine is not running: {self.dead or 'shutting down'}"))
        return future

    def _post(self, command: Callable[[], None]) -> bool:
        """Queue a command for the engine thread; False once the thread has stopped taking them."""
        with self._lock:
            if self._closed:
                return False
            self._commands.put(command)
            return True

    def _add(self, request_id: str, prompt: PromptType, params: SamplingParams, stream: _Stream) -> None:
        waiting = len(self.engine.scheduler.waiting)
        if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
            raise ServerOverloaded(f"{waiting} requests are already waiting (--max-waiting-requests "
                                   f"{self.max_waiting_requests}); retry later")
        self.engine.add_request(request_id, prompt, params)
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _loop(self) -> None:
        try:
            self._run_steps()
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            logger.exception("the engine loop crashed")
            self._die(e if isinstance(e, Exception) else RuntimeError(repr(e)))

    def _run_steps(self) -> None:
        failures = 0
        while not self._stopping:
            busy = self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=not busy, timeout=None if busy else 0.1)
            except queue.Empty:
                command = None
            while command is not None:
                command()
                command = self._commands.get_nowait() if not self._commands.empty() else None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as e:
                failures += 1
                logger.exception("engine step failed (%d in a row)", failures)
                self._fail_step(e)
                if failures >= self.max_step_failures:
                    self._die(e)
                    return
                continue
            self._dispatch(outputs)
        self._die(None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        self._observe("record_step", self.engine)
        # one wake-up per event loop and step, not one per request: with hundreds of streams
        # the per-item wake-ups cost the loop (and, through the GIL, this thread) real time
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
                self._observe("record_finished", out)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            _deliver(loop, items)

    def _observe(self, method: str, arg: Any) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, method)(arg)
            except Exception:  # metrics must never stop serving
                logger.exception("metrics observer failed")

    def _fail_step(self, error: Exception) -> None:
        for request_id in self.engine.fail_step():
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(StepFailed(f"the engine failed while running this request: {type(error).__name__}: "
                                      f"{error}"))

    def _die(self, error: Exception | None) -> None:
        """Fail every request and accept no more (on an unrecoverable error, or at shutdown)."""
        if error is not None:
            self.dead = error
        with self._lock:
            self._closed = True  # from here on, _call fails at once instead of queueing
        reason = EngineDead(f"the engine stopped: {error}" if error else "the server is shutting down")
        for request_id, stream in list(self._streams.items()):
            stream.put(reason)
            try:
                self.engine.abort_request(request_id)
            except Exception:  # a broken engine may fail here too; the request is failed either way
                logger.exception("abort during shutdown failed")
        self._streams.clear()
        while not self._commands.empty():  # queued adds fail with EngineDead, aborts are harmless
            try:
                self._commands.get_nowait()()
            except Exception:
                logger.exception("a command failed during shutdown")
