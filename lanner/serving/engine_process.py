"""The engine loop in a child process, for `lanner serve`.

The parent keeps the asyncio half (AsyncEngine's streams, the HTTP server); the
child builds the LLMEngine from its EngineConfig and runs an EngineLoop on its main
thread, so the step loop never waits for the server's event loop to release the GIL.
One duplex pipe carries lists of messages (`PipeSender`: what queued up while the last
list was written goes as one list), parent -> child: (id, op, args) with op
add/abort/call (id None when no reply is wanted), or None to stop; child -> parent:
("ready", EngineInfo) or ("start_failed", error) once, then ("reply", id, ok, value),
("outputs", items, stats) once per step, ("failed", request_ids, message) and ("died",
message, error). Each side writes from a thread of its own: the child's step loop
does not wait for its outputs to be pickled and written (that overlaps the next
step's GPU work), and the server's event loop does not wait for the pipe either.

A child that exits unexpectedly (a crash, the OOM killer) shows as the end of the
pipe: the engine is dead and every request gets EngineDead. A parent that goes away
closes the pipe, and the child stops. The child ignores SIGINT and SIGTERM: the
parent decides when it stops, so a signal sent to the whole process group (Ctrl-C,
a service manager) still lets the server drain.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any

from lanner.core.heap import freeze_heap
from lanner.distributed import die_with_parent
from lanner.errors import EngineDead, without_frames
from lanner.serving.async_engine import EngineLoop, Sink

logger = logging.getLogger(__name__)


def _sendable(value: Any, ok: bool) -> tuple[bool, Any]:
    """(ok, value) if value survives a pickle round trip (an exception whose __init__ takes two
    arguments pickles but does not load), else a failure that does."""
    try:
        pickle.loads(pickle.dumps(value))
        return ok, value
    except Exception as e:
        what = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else f"the result ({e})"
        return False, RuntimeError(f"cannot be sent between the engine and server processes: {what}")


class PipeSender:
    """Writes messages to a pipe from a thread of its own, in lists: all that queued up while
    the previous list was being written goes in the next one (a burst of adds, or a step's
    outputs with the replies before them, is one pickle and one write). Order is kept. After a
    broken pipe nothing more is written: the other side is gone, and the reader notices."""

    _STOP = object()

    def __init__(self, conn: Any, name: str) -> None:
        self.conn = conn
        self.broken = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread (later sends are dropped)."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = next((i for i, m in enumerate(batch) if m is self._STOP), None)
            if stop is not None:  # what was sent after close() is dropped
                batch = batch[:stop]
            if batch and not self.broken:
                self._write(batch)
            if stop is not None:
                return

    def _write(self, batch: list) -> None:
        try:
            self.conn.send(batch)
        except (BrokenPipeError, EOFError, OSError):
            self.broken = True
        except Exception:  # something in it does not pickle (a bug): send the rest one by one
            for message in batch:
                try:
                    self.conn.send([message])
                except (BrokenPipeError, EOFError, OSError):
                    self.broken = True
                    return
                except Exception:
                    logger.exception("cannot send a message to the other process: %.200r", message)


class _PipeSink:
    def __init__(self, sender: PipeSender) -> None:
        self.send = sender.send

    def outputs(self, items, stats) -> None:
        self.send(("outputs", items, stats))

    def failed(self, request_ids, message) -> None:
        self.send(("failed", request_ids, message))

    def died(self, message, error) -> None:
        self.send(("died", message, error))


def _child_main(config: Any, conn: Any, max_waiting_requests: int | None, max_step_failures: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    from lanner.engine.engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as e:
        conn.send(("start_failed", _sendable(e, False)[1]))
        return
    freeze_heap()
    sender = PipeSender(conn, "lanner-outputs")
    loop = EngineLoop(engine, _PipeSink(sender), max_waiting_requests, max_step_failures)
    conn.send(("ready", loop.info()))

    def reply(request_id: int | None, ok: bool, value: Any) -> None:
        if request_id is not None:
            sender.send(("reply", request_id, *_sendable(value, ok)))

    def run_command(request_id: int | None, op: str, payload: bytes) -> None:
        try:
            args = pickle.loads(payload)  # here, not in recv(): a payload that fails to load fails its request only
            value, ok = getattr(loop, op)(*args), True
        except BaseException as e:  # handed to the caller, never raised in the loop
            value, ok = without_frames(e), False
        reply(request_id, ok, value)

    def read_commands() -> None:
        try:
            while True:
                for message in conn.recv():
                    if message is None:
                        return
                    request_id, op, payload = message
                    if not loop.post(lambda r=request_id, o=op, p=payload: run_command(r, o, p)):
                        reply(request_id, False, loop.not_running())
        except (EOFError, OSError):  # the parent is gone
            pass
        except Exception:
            logger.exception("the engine process cannot read the server's commands; stopping")
        finally:
            loop.stop()

    threading.Thread(target=read_commands, name="lanner-commands", daemon=True).start()
    try:
        loop.run()
    finally:
        sender.close()  # the last outputs and the "died" message go out before the process ends


class ProcessTransport:
    """Starts the child and waits until its engine is built (or raises what stopped it)."""

    def __init__(self, config: Any, sink: Sink, max_waiting_requests: int | None, max_step_failures: int):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_child_main, name="lanner-engine",
                                   args=(config, child_conn, max_waiting_requests, max_step_failures))
        self.process.start()
        child_conn.close()
        atexit.register(self._kill)  # runs before multiprocessing's own exit handler joins the child
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise EngineDead(f"the engine process exited while starting (exit code {self.process.exitcode})")
        if message[0] == "start_failed":
            self.process.join(30)
            raise message[1]
        self.info = message[1]
        self.sink = sink
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _closed and _futures
        self._closed = False
        self._sender = PipeSender(self.conn, "lanner-commands")
        self._died = False
        self._reader = threading.Thread(target=self._read, name="lanner-engine-reader", daemon=True)

    def start(self) -> None:
        if not self._reader.is_alive() and not self._closed:
            self._reader.start()

    def request(self, op: str, *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.set_exception(EngineDead("the engine process is not running"))
                return future
            request_id = None
            if op == "abort":
                future.set_result(None)
            else:
                request_id = next(self._ids)
                self._futures[request_id] = future
            try:
                self._sender.send((request_id, op, pickle.dumps(args)))  # a dead child: the reader fails it
            except Exception as e:  # arguments that do not pickle (a lambda given to call())
                self._futures.pop(request_id, None)
                if not future.done():
                    future.set_exception(without_frames(e))
        return future

    def _read(self) -> None:
        try:
            self._read_messages()
        except (EOFError, OSError):  # the child is gone
            pass
        except Exception:  # a broken stream of messages: nothing after it can be trusted
            logger.exception("cannot read the engine process's messages; stopping it")
            self._kill()
        self._closed_by_child()

    def _read_messages(self) -> None:
        while True:
            for message in self.conn.recv():
                self._handle(message)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            self.sink.outputs(message[1], message[2])
        elif kind == "failed":
            self.sink.failed(message[1], message[2])
        elif kind == "died":
            self._died = True
            self.sink.died(message[1], message[2])
        elif kind == "reply":
            future = self._futures.pop(message[1], None)
            if future is not None and future.set_running_or_notify_cancel():
                (future.set_result if message[2] else future.set_exception)(message[3])

    def _closed_by_child(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._futures = list(self._futures.values()), {}
        self.process.join(5)
        if not self._died:  # it did not stop on its own terms
            code = self.process.exitcode
            self.sink.died(f"the engine process exited unexpectedly (exit code {code})", f"exit code {code}")
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDead("the engine process is not running"))

    def alive(self) -> bool:
        return not self._closed and self.process.is_alive()

    def shutdown(self, timeout: float) -> None:
        with self._lock:
            if not self._closed:
                self._sender.send(None)  # after the commands queued before it
            self._closed = True  # later requests fail at once; the reader still fails pending ones
        deadline = time.monotonic() + timeout
        self._sender.close(timeout)
        self.process.join(max(deadline - time.monotonic(), 0))
        self._kill()
        if self._reader.is_alive():
            self._reader.join(5)

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
