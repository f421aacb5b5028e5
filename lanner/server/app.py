"""The OpenAI-compatible HTTP server: FastAPI over an AsyncEngine.

Endpoints: /v1/completions, /v1/chat/completions (streamed as server-sent
events ending in `data: [DONE]`), /v1/models, /health, /version, /metrics.
Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`:
400 for anything wrong with the request, 401 for a missing or wrong API key,
429 when the waiting queue is full, 503 when the engine is dead or stopping,
500 only for real internal errors (the engine keeps serving everyone else).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import lanner
from lanner.config import ServerConfig
from lanner.core.request import RequestOutput
from lanner.engine.engine import LLMEngine
from lanner.errors import CapacityExceeded, EngineDead, InvalidRequest, LannerError, ServerOverloaded
from lanner.server.metrics import ServerMetrics
from lanner.server.protocol import ChatRequest, CompletionRequest
from lanner.serving.async_engine import AsyncEngine, StepFailed

logger = logging.getLogger(__name__)


STATUS = {InvalidRequest: (400, "invalid_request_error"), CapacityExceeded: (400, "invalid_request_error"),
          ServerOverloaded: (429, "rate_limit_error"), EngineDead: (503, "service_unavailable"),
          StepFailed: (500, "internal_error")}


def error_response(status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status)


def error_of(exc: BaseException) -> JSONResponse:
    for cls, (status, kind) in STATUS.items():
        if isinstance(exc, cls):
            return error_response(status, str(exc), kind)
    logger.error("internal error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def build_app(engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    model_name = config.served_model_name or "lanner"
    info = engine.info

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="lanner", version=lanner.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # nothing a client sends may take the server down
        return error_of(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                              "invalid_request_error", param=where or None)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise InvalidRequest(f"the model {name!r} does not exist; this server serves {model_name!r}")

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return error_response(503, f"the engine is not running: {engine.dead}", "service_unavailable")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": lanner.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lanner", "max_model_len": info.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            check_model(body.model)
            params = body.sampling_params(info.sampling_defaults, body.max_tokens, body.logprobs)
            prompts = body.prompts()
        except (InvalidRequest, ValueError) as e:
            return error_of(InvalidRequest(str(e)))
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [engine.generate(f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
        shaper = CompletionShaper(rid, model_name, body)
        return await respond(request, body.stream, streams, shaper)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            check_model(body.model)
            body.check()
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            params = body.sampling_params(info.sampling_defaults, body.max_completion_tokens or body.max_tokens,
                                          logprobs)
            prompt = await asyncio.wrap_future(engine.call(LLMEngine.render_chat, body.conversation(),
                                                           body.add_generation_prompt, body.chat_template_kwargs))
        except LannerError as e:  # EngineDead, ServerOverloaded, InvalidRequest from the engine
            return error_of(e)
        except ValueError as e:
            return error_of(InvalidRequest(str(e)))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        shaper = ChatShaper(rid, model_name, body)
        return await respond(request, body.stream, [engine.generate(rid, prompt, params)], shaper)

    return app


CLIENT_CLOSED = 499  # nginx's "client closed request": counted, not logged as an error

KNOWN_PATHS = {"/health", "/version", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class AuthAndCount:
    """ASGI middleware: the API key check on /v1/*, and request counts by endpoint and status.
    (Plain ASGI rather than @app.middleware, which hides client disconnects from handlers.)"""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def send_counting(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.api_key and path.startswith("/v1/") and \
                    headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
                response = error_response(401, "a valid API key is required (Authorization: Bearer ...)",
                                          "authentication_error", "invalid_api_key")
                await response(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        finally:
            self.metrics.http_requests.labels(path if path in KNOWN_PATHS else "other", str(status["code"])).inc()


async def respond(request: Request, stream: bool, generators: list[AsyncIterator[RequestOutput]], shaper) -> Response:
    """Run the prompts' generators; as SSE if `stream`, else one JSON body. Errors raised
    before the first output become plain error responses."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((index, out))
        except BaseException as e:
            await queue.put((index, e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
    remaining = len(tasks)

    async def events() -> AsyncIterator[tuple[int, RequestOutput]]:
        nonlocal remaining
        try:
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                latest: dict[int, RequestOutput] = {}  # cumulative outputs: the last of each prompt will do
                for index, item in items:
                    if isinstance(item, BaseException):
                        raise item
                    latest[index] = item
                for index, item in latest.items():
                    if item.finished:
                        remaining -= 1
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()  # a client that left, or an error: abort the others too

    async def abort_if_client_leaves() -> None:
        # the body is read already, so the next message is the disconnect: waiting for it costs
        # nothing, where polling is_disconnected() took a real share of the loop under load
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for t in tasks:
            t.cancel()  # their generators abort the requests and free the blocks

    # until a stream starts (then Starlette notices disconnects) or the whole body is ready
    watcher = asyncio.create_task(abort_if_client_leaves())
    it = events()
    try:
        first = await it.__anext__()
    except asyncio.CancelledError:  # the client left before the first token; its requests are aborted
        watcher.cancel()
        await it.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException as e:
        watcher.cancel()
        await it.aclose()
        return error_of(e)

    if not stream:
        try:
            shaper.add(*first)
            async for index, out in it:
                shaper.add(index, out)
        except asyncio.CancelledError:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return error_of(e)
        finally:
            watcher.cancel()
        return JSONResponse(shaper.final())
    watcher.cancel()

    async def sse() -> AsyncIterator[str]:
        try:
            for chunk in shaper.chunks(*first):
                yield f"data: {json.dumps(chunk)}\n\n"
            async for index, out in it:
                for chunk in shaper.chunks(index, out):
                    yield f"data: {json.dumps(chunk)}\n\n"
            for chunk in shaper.closing_chunks():
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # mid-stream: the status is sent already, so the error goes in the stream
            body = json.loads(error_of(e).body)
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await it.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


class _Shaper:
    """Turns engine outputs into OpenAI response bodies and stream chunks; tracks, per
    choice, the text and logprobs already sent."""

    chunk_object = ""

    def __init__(self, rid: str, model: str, body) -> None:
        self.rid, self.model, self.body = rid, model, body
        self.created = int(time.time())
        self.sent_text: dict[int, int] = {}
        self.sent_logprobs: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finals: dict[int, Any] = {}  # choice index -> CompletionOutput
        self.prompt_tokens: dict[int, int] = {}

    def _choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.body.n + sample_index

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        if out.finished:
            for c in out.outputs:
                self.finals[self._choice_index(prompt_index, c.index)] = c

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        self.add(prompt_index, out)
        chunks = []
        for c in out.outputs:
            index = self._choice_index(prompt_index, c.index)
            start = self.sent_text.get(index, 0)
            lp_start = self.sent_logprobs.get(index, 0)
            delta = c.text[start:]
            new_logprobs = (c.logprobs or [])[lp_start:]
            # a chunk for every step that made tokens, even with no new text (text held back by a
            # stop string or a partial UTF-8 character, or no tokenizer), so clients see each token
            new_tokens = len(c.token_ids) > self.sent_tokens.get(index, 0)
            if delta or new_logprobs or new_tokens or c.finish_reason:
                self.sent_text[index] = len(c.text)
                self.sent_logprobs[index] = len(c.logprobs or [])
                self.sent_tokens[index] = len(c.token_ids)
                chunks.append(self.chunk(index, delta, new_logprobs, c, start))
        return chunks

    def closing_chunks(self) -> list[dict]:
        if not self.body.include_usage:
            return []
        return [{"id": self.rid, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [], "usage": self.usage()}]


def token_bytes(lp) -> list[int]:
    return list(lp.token_bytes if lp.token_bytes is not None else (lp.decoded_token or "").encode())


def top_entries(entry: dict, n: int) -> list:
    """The n most likely tokens of a logprobs entry, by rank (the sampled one is the entry's first)."""
    return sorted((lp for lp in entry.values() if lp.rank <= n), key=lambda lp: lp.rank)[:n]


class CompletionShaper(_Shaper):
    chunk_object = "text_completion"

    def logprobs(self, entries: list[dict], text_offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            chosen = next(iter(entry.values()))  # the sampled token comes first
            out["tokens"].append(chosen.decoded_token)
            out["token_logprobs"].append(chosen.logprob)
            top = {lp.decoded_token: lp.logprob for lp in top_entries(entry, self.body.logprobs)}
            top.setdefault(chosen.decoded_token, chosen.logprob)  # the sampled token is always listed
            out["top_logprobs"].append(top)
            out["text_offset"].append(text_offset)
            text_offset += len(chosen.decoded_token or "")
        return out

    def chunk(self, index, delta, new_logprobs, c, text_offset) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": delta, "logprobs": self.logprobs(new_logprobs, text_offset),
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}

    def final(self) -> dict:
        choices = [{"index": i, "text": c.text, "logprobs": self.logprobs(c.logprobs or [], 0),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for i, c in sorted(self.finals.items())]
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class ChatShaper(_Shaper):
    chunk_object = "chat.completion.chunk"

    def logprobs(self, entries: list[dict]) -> dict | None:
        if not self.body.logprobs:
            return None
        content = []
        for entry in entries:
            chosen = next(iter(entry.values()))  # the sampled token comes first
            top = [{"token": lp.decoded_token, "logprob": lp.logprob, "bytes": token_bytes(lp)}
                   for lp in top_entries(entry, self.body.top_logprobs or 0)]
            content.append({"token": chosen.decoded_token, "logprob": chosen.logprob,
                            "bytes": token_bytes(chosen), "top_logprobs": top})
        return {"content": content}

    def chunk(self, index, delta, new_logprobs, c, text_offset) -> dict:
        message = {"role": "assistant", "content": delta} if text_offset == 0 else {"content": delta}
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": message, "logprobs": self.logprobs(new_logprobs),
                             "finish_reason": c.finish_reason}]}

    def final(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c.logprobs or []), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for i, c in sorted(self.finals.items())]
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
