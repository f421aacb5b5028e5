"""The OpenAI-compatible HTTP server: FastAPI over an AsyncEngine.

Endpoints: /v1/completions, /v1/chat/completions (streamed as server-sent
events ending in `data: [DONE]`), /v1/models, /tokenize, /detokenize, /health,
/ping, /version, /metrics. Prompts are tokenized and chat templates rendered here,
in worker threads of the server process, never on the engine loop; the engine
gets token ids. Errors use OpenAI's body `{"error": {"message", "type", "param",
"code"}}`: 400 for anything wrong with the request, 401 for a missing or wrong API
key, 404 for an unknown model, 429 when the waiting queue is full, 503 when the
engine is dead or stopping, 500 only for real internal errors (the engine keeps
serving everyone else).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import lanner
from lanner.config import ServerConfig
from lanner.core.request import RequestOutput
from lanner.engine.prompts import Prompts, message_for_template
from lanner.errors import CapacityExceeded, ConfigError, EngineDead, InvalidRequest, LannerError, ModelNotFound, ServerOverloaded, without_frames
from lanner.models.loader import load_tokenizer
from lanner.server.metrics import ServerMetrics
from lanner.server.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                    client_template, conversation_of, refuse)
from lanner.server.reasoning import REASONING_PARSERS
from lanner.server.responses import ChatShaper, CompletionShaper, PromptInfo, Reading
from lanner.server.tool_parsers import TOOL_PARSERS
from lanner.server.tools import plan_tools
from lanner.serving.async_engine import AsyncEngine, Mailbox, RequestStream, StepFailed

logger = logging.getLogger(__name__)


STATUS = {ModelNotFound: (404, "invalid_request_error"), InvalidRequest: (400, "invalid_request_error"),
          CapacityExceeded: (400, "invalid_request_error"), ServerOverloaded: (429, "rate_limit_error"),
          EngineDead: (503, "service_unavailable"), StepFailed: (500, "internal_error")}


def error_response(status: int, message: str, kind: str, code: str | int | None = None, param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status)


def error_of(exc: BaseException) -> JSONResponse:
    """The error's response; once answered, the error lets go of its frames (without_frames)."""
    try:
        for cls, (status, kind) in STATUS.items():
            if isinstance(exc, cls):
                return error_response(status, str(exc), kind, param=getattr(exc, "param", None))
        logger.error("internal error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
    finally:
        without_frames(exc)


def build_app(engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    names = config.served_model_name or ["lanner"]
    info = engine.info
    tokenizer = load_tokenizer(info.tokenizer_path) if info.tokenizer_path else None
    prompts = Prompts(tokenizer, config.chat_template, config.chat_template_timeout_s) if tokenizer is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="lanner", version=lanner.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = config

    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics,
                       max_body_bytes=int(config.max_request_body_mb * (1 << 20)), body_timeout_s=config.body_timeout_s)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # nothing a client sends may take the server down
        return error_of(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, bodies that do not parse
        message = {400: "the body is not valid JSON (or not UTF-8, or nested too deeply)"}.get(exc.status_code,
                                                                                               str(exc.detail))
        return error_response(exc.status_code, message, "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  "invalid_request_error")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "unknown field: lanner refuses fields it would not apply"
        return error_response(400, f"{'.'.join(loc) or 'body'}: {message}", "invalid_request_error",
                              param=loc[0] if loc else None)  # the request's field, not a union branch

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            error = ModelNotFound(f"the model {name!r} does not exist; this server serves {', '.join(names)}")
            error.param = "model"
            raise error

    def need_prompts() -> Prompts:
        if prompts is None:
            raise InvalidRequest("this model has no tokenizer: pass prompts as token ids")
        return prompts

    def token_text(token_id: int) -> str:
        return prompts.decode([token_id]) if prompts is not None else f"token_id:{token_id}"

    max_prompt_chars = config.max_prompt_chars or 32 * info.max_model_len
    if config.tool_call_parser is not None and config.tool_call_parser not in TOOL_PARSERS:
        raise ConfigError(f"--tool-call-parser {config.tool_call_parser!r}: one of {', '.join(TOOL_PARSERS)}")
    auto_tool_parser = config.tool_call_parser if config.enable_auto_tool_choice else None
    reasoning = REASONING_PARSERS[info.reasoning_parser]() if info.reasoning_parser else None

    def check_limits(body: CompletionRequest | ChatRequest, texts: list[str]) -> None:
        """Limits checked before any work: tokenizing a huge prompt or matching thousands of stop
        strings would cost the server (and everyone on it) for nothing."""
        chars = sum(len(t) for t in texts)
        if chars > max_prompt_chars:
            raise refuse("prompt" if isinstance(body, CompletionRequest) else "messages",
                         f"{chars} characters, over the limit of {max_prompt_chars} (--max-prompt-chars)")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > config.max_stop_strings:
            raise refuse("stop", f"{len(stops)} stop strings, over the limit of {config.max_stop_strings} "
                                 "(--max-stop-strings)")
        if any(len(s) > config.max_stop_string_chars for s in stops):
            raise refuse("stop", f"a stop string over {config.max_stop_string_chars} characters "
                                 "(--max-stop-string-chars)")

    def check_context(num_prompt_tokens: int, max_tokens: int | None) -> None:
        """vLLM answers 400 when the prompt plus the requested output does not fit the context."""
        limit = info.max_model_len
        if num_prompt_tokens >= limit:
            raise refuse("prompt", f"the prompt has {num_prompt_tokens} tokens; the model's context is {limit} "
                                   "tokens, including at least one output token")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise refuse("max_tokens", f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                                       f"is {num_prompt_tokens + max_tokens} tokens, over the model's context of "
                                       f"{limit} tokens")

    async def completion_prompt(prompt: str | list[int], body: CompletionRequest, max_tokens: int | None) -> PromptInfo:
        if isinstance(prompt, str):
            token_ids = await asyncio.to_thread(need_prompts().encode, prompt)
            text = prompt
        else:
            token_ids, text = list(prompt), None
        if body.truncate_prompt_tokens is not None and len(token_ids) > body.truncate_prompt_tokens:
            token_ids, text = token_ids[-body.truncate_prompt_tokens:], None
        check_context(len(token_ids), max_tokens)
        if body.echo and text is None:
            text = await asyncio.to_thread(need_prompts().decode, token_ids)
        return PromptInfo(token_ids, text if body.echo else "")

    def log_request(rid: str, prompt_lengths: list[int], params) -> None:
        if config.enable_log_requests:  # lengths and options, never the prompt's text
            logger.info("request %s: prompt tokens %s, %s", rid, prompt_lengths, params)

    def chat_options(body: ChatRequest | TokenizeRequest) -> dict:
        if client_template(body) and not config.trust_request_chat_template:
            raise refuse("chat_template", "a chat template from the request is code the server would run; it is "
                                          "refused unless the server runs with --trust-request-chat-template")
        return dict(add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message, chat_template=body.chat_template,
                    chat_template_kwargs=body.chat_template_kwargs)

    @app.get("/health")
    async def health():
        """200 while the engine loop makes progress: it must answer between two steps in time."""
        if not engine.is_running:
            return error_response(503, f"the engine is not running: {engine.dead}", "service_unavailable")
        if not await engine.responsive(config.health_timeout_s):
            return error_response(503, f"the engine loop has not answered for {config.health_timeout_s:g} s (a "
                                       "stuck step, or a stopped engine process)", "service_unavailable")
        return {"status": "ok"}

    @app.get("/ping")
    @app.post("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": lanner.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lanner", "root": names[0],
                                            "max_model_len": info.max_model_len} for name in names]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        try:
            check_model(body.model)
            body.check()
            p = need_prompts()
            if body.messages is not None:
                text = await asyncio.to_thread(p.render_chat, conversation_of(body.messages), **chat_options(body))
                token_ids = await asyncio.to_thread(p.encode, text, bool(body.add_special_tokens))
            else:
                add_special = body.add_special_tokens is not False
                token_ids = await asyncio.to_thread(p.encode, body.prompt, add_special)
        except InvalidRequest as e:
            return error_of(e)
        token_strs = p.tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
        return {"count": len(token_ids), "max_model_len": info.max_model_len, "tokens": token_ids,
                "token_strs": token_strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        try:
            check_model(body.model)
            p = need_prompts()
            if any(not 0 <= t < len(p.tokenizer) for t in body.tokens):
                raise refuse("tokens", f"token ids must be in [0, {len(p.tokenizer)})")
        except InvalidRequest as e:
            return error_of(e)
        return {"prompt": await asyncio.to_thread(p.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            check_model(body.model)
            body.check()
            check_limits(body, [p for p in body.prompts() if isinstance(p, str)])
            params = body.params(info.sampling_defaults)
            inputs = [await completion_prompt(p, body, params.max_tokens) for p in body.prompts()]
        except InvalidRequest as e:
            return error_of(e)
        rid = f"cmpl-{uuid.uuid4().hex}"
        log_request(rid, [len(p.token_ids) for p in inputs], params)
        shaper = CompletionShaper(rid, names[0], body, inputs, token_text)
        streams = [engine.generate(f"{rid}-{i}", p.token_ids, params) for i, p in enumerate(inputs)]
        return await respond(request, body.stream, streams, shaper, config.stream_stall_timeout_s)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            check_model(body.model)
            body.check()
            conversation = body.conversation()
            check_limits(body, [str(m.get("content") or "") for m in conversation])
            tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, auto_tool_parser)
            params = body.params(info.sampling_defaults, tools.structured)
            token_ids = await asyncio.to_thread(need_prompts().chat_token_ids, conversation, tools=tools.render,
                                                **chat_options(body))
            if body.truncate_prompt_tokens is not None:
                token_ids = token_ids[-body.truncate_prompt_tokens:]
            check_context(len(token_ids), params.max_tokens)
        except InvalidRequest as e:
            return error_of(e)
        last = conversation[-1]
        echo = (message_for_template(last).get("content") or "") if body.echo and last["role"] == "assistant" else ""
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        log_request(rid, [len(token_ids)], params)
        reading = Reading(tools=tools.parser, parallel_tools=tools.parallel)
        if reasoning is not None:
            reading.reasoning = reasoning
            reading.in_reasoning = reasoning.in_reasoning_after(prompts.decode(token_ids[-REASONING_TAIL_TOKENS:]))
        shaper = ChatShaper(rid, names[0], body, [PromptInfo(token_ids, echo)], token_text, reading=reading)
        return await respond(request, body.stream, [engine.generate(rid, token_ids, params)], shaper,
                             config.stream_stall_timeout_s)

    return app


REASONING_TAIL_TOKENS = 16  # where a chat prompt shows whether it left the model inside its reasoning
CLIENT_CLOSED = 499  # nginx's "client closed request": counted, not logged as an error

KNOWN_PATHS = {"/health", "/ping", "/version", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
               "/tokenize", "/detokenize"}
# what needs the API key: all that costs compute, and the API's description
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/docs", "/redoc", "/openapi.json")


class AuthAndCount:
    """ASGI middleware: the API key check, the request body's size limit (read here, before any
    handler, so an oversized body costs at most the limit), and request counts by endpoint and
    status. (Plain ASGI rather than @app.middleware, which hides client disconnects from handlers.)"""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics, max_body_bytes: int,
                 body_timeout_s: float) -> None:
        self.app, self.api_key, self.metrics, self.max_body_bytes = app, api_key, metrics, max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind --root-path the path includes the prefix
            path = path[len(root):]
        status = {"code": 500}

        async def send_counting(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.api_key and path.startswith(PROTECTED) and \
                    headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
                response = error_response(401, "a valid API key is required (Authorization: Bearer ...)",
                                          "authentication_error", "invalid_api_key")
                return await response(scope, receive, send_counting)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:  # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the read as a task of its own,
                    # and every request's extra turn of the event loop delays the whole burst's adds
                    async with asyncio.timeout(self.body_timeout_s):
                        body = await self._read_body(receive)
                except TimeoutError:  # a body sent a byte at a time must not hold its connection forever
                    response = error_response(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                                   "(--body-timeout-s)", "invalid_request_error")
                    return await response(scope, receive, send_counting)
                if body is None:  # the client left while sending
                    status["code"] = CLIENT_CLOSED
                    return
                if len(body) > self.max_body_bytes:
                    response = error_response(413, f"the request body is over {self.max_body_bytes} bytes "
                                                   "(--max-request-body-mb)", "invalid_request_error")
                    return await response(scope, receive, send_counting)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.http_requests.labels(path if path in KNOWN_PATHS else "other", str(status["code"])).inc()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or the first bytes past the limit (then the rest is never read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes or not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands the body read already to the app, then waits on the client."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, which handlers wait for

    return replay


class ReaderStalled(LannerError):
    """A streaming client read nothing for too long; its requests are aborted."""


async def respond(request: Request, stream: bool, generators: list[RequestStream], shaper,
                  stall_timeout: float) -> Response:
    """Run the prompts' generators; as SSE if `stream`, else one JSON body. Errors raised
    before the first output become plain error responses. Outputs wait in a Mailbox (one slot
    per prompt: a stream's deltas merge there), so a client that reads slowly costs at most its
    output once; one that reads nothing for `stall_timeout` seconds while outputs wait has its
    requests aborted."""
    mailbox = Mailbox(deltas=stream)

    async def pump(index: int, gen: RequestStream) -> None:
        try:
            async for out in gen:
                mailbox.put(index, out)
                if mailbox.stalled_for() > stall_timeout:
                    raise ReaderStalled(f"the client read nothing for {stall_timeout:.0f} s (--stream-stall-timeout)")
        except BaseException as e:
            mailbox.put(index, without_frames(e))
            if isinstance(e, ReaderStalled):
                logger.warning("aborting a request whose client stopped reading: %s", e)
                for t in tasks:
                    if t is not asyncio.current_task():
                        t.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
    for task, gen in zip(tasks, generators):  # a pump cancelled before it ran never iterated its request
        task.add_done_callback(lambda _, gen=gen: gen.close_unread())
    remaining = len(tasks)

    async def events() -> AsyncIterator[tuple[int, RequestOutput]]:
        nonlocal remaining
        try:
            while remaining:
                latest = await mailbox.take()
                for index, item in latest.items():
                    if isinstance(item, BaseException):
                        raise item
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
