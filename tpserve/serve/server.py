"""OpenAI-compatible HTTP API over the engine.

    app = build_app(Engine(llm, codec).start(), codec, "my-model", api_key=None)
    serve(app, "0.0.0.0", 8000)   # blocks; returns after SIGINT/SIGTERM and a graceful drain

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with SSE), GET /v1/models,
GET /health, GET /metrics. Errors have OpenAI's shape, `{"error": {message, type, param, code}}`:
400 for a bad request, 401 for a missing or wrong API key, 429 when the queue is full, 503 when
the engine failed or is not running.

Engine events arrive on the engine thread; each request gets an asyncio.Queue fed through
`loop.call_soon_threadsafe`. When a streaming client goes away its request is cancelled: the
engine frees its KV slot before the next step.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import re
import signal
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpserve.serve.engine import Event, QueueFull
from tpserve.errors import TpserveError
from tpserve.serve.metrics import CONTENT_TYPE, Metrics
from tpserve.serve.sampling import SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    message = " ".join(message.splitlines())  # one line, even for a multi-line exception
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


# ---- request bodies ------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI clients send many."""
    model: str | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None  # extension; 0 or -1 turn it off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0


class CompletionRequest(_Common):
    prompt: str | list[StrictInt]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False


def _refuse_unsupported(req: _Common) -> None:
    """Fields whose silent dropping would change the answer are refused, not ignored."""
    unsupported = [("n", req.n not in (None, 1), f"n={req.n} is not supported; use n=1"),
                   ("presence_penalty", bool(req.presence_penalty),
                    "presence_penalty is not supported; leave it 0"),
                   ("frequency_penalty", bool(req.frequency_penalty),
                    "frequency_penalty is not supported; leave it 0"),
                   ("logprobs", bool(req.logprobs), "logprobs is not supported; leave it null")]
    if isinstance(req, CompletionRequest):
        unsupported += [("echo", bool(req.echo), "echo is not supported; leave it false"),
                        ("best_of", req.best_of not in (None, 1),
                         f"best_of={req.best_of} is not supported; use best_of=1"),
                        ("suffix", bool(req.suffix), "suffix is not supported; leave it null")]
    for param, bad, message in unsupported:
        if bad:
            raise ApiError(400, message, param)


def _params(req: _Common, max_tokens: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()), stop=tuple(stop),
            ignore_eos=req.ignore_eos)
    except TpserveError as e:  # its messages start with the field: "top_p=1.5 must be ..."
        m = re.match(r"(\w+)=", str(e))
        raise ApiError(400, str(e), m.group(1) if m else None) from None


def _validation_message(err: dict) -> tuple[str, str | None]:
    """One line from pydantic's first error. Its loc is ("body", field, index, ..., union tag)."""
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error')})", None
    where = []
    for x in err["loc"][1:]:
        if not isinstance(x, int) and not re.fullmatch(r"[a-z_][a-z0-9_]*", x) or x in (
                "str", "int", "float", "bool"):
            break  # a union member's tag, not a field
        where.append(str(x))
    if not where:
        return "the request body must be a JSON object", None
    path = ".".join(where)
    if err["type"] == "missing":
        return f"'{path}' is required", where[0]
    if path == "prompt":  # a union: pydantic's first message names only one of its types
        return "'prompt' must be a string or a list of token ids", "prompt"
    return f"'{path}' is invalid: {err['msg']}", where[0]


# ---- engine bridge -------------------------------------------------------------------------
def engine_alive(engine) -> bool:
    return engine.alive


class _Pending:
    """One request's events, moved from the engine thread onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.loop, self.metrics, self.queue = loop, metrics, asyncio.Queue()
        self.arrived, self.first = time.monotonic(), True
        self.closed = False
        self.cancel = None  # set once the engine has accepted the request

    def on_event(self, ev: Event) -> None:  # engine thread: must never raise
        now = time.monotonic()
        if self.first and ev.token_ids:
            self.first = False
            self.metrics.time_to_first_token.observe(now - self.arrived)
        if ev.finished and ev.finish_reason != "error":
            self.metrics.request_seconds.observe(now - self.arrived)
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is closed: the server has shut down
            self.closed = True

    async def events(self):
        try:
            while True:
                ev = await self.queue.get()
                yield ev
                if ev.finished:
                    self.cancel = None
                    return
        finally:  # finished, or the client went away (the generator is cancelled or closed)
            if self.cancel is not None:
                self.cancel()
            self.closed = True


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- app -----------------------------------------------------------------------------------
class _ApiKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>`; checked before the body is
    read, so an unauthenticated caller learns nothing about request validation."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.expected, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                self.metrics.http_errors.labels("401").inc()
                body = error_body(401, "the API key is missing or wrong; send the header "
                                       "'Authorization: Bearer <key>'", code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine, codec, model_name: str, api_key: str | None = None,
              metrics: Metrics | None = None) -> FastAPI:
    """The HTTP app over a started engine. codec may be None (then only token-id prompts)."""
    metrics = metrics or Metrics(engine)
    app = FastAPI(title="tpserve", docs_url=None, redoc_url=None)
    created = int(time.time())
    if api_key:
        app.add_middleware(_ApiKey, key=api_key, metrics=metrics)

    def error(status, message, param=None, code=None):
        if status != 500:
            metrics.http_errors.labels(str(status)).inc()
        return JSONResponse(error_body(status, message, param, code), status)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error(400, *_validation_message(e.errors()[0]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):  # Starlette re-raises it after, so uvicorn logs it
        return error(500, f"internal error: {type(e).__name__}: {e}")

    def check_model(req: _Common) -> None:
        if req.model is not None and req.model != model_name:
            raise ApiError(400, f"model '{req.model}' is not served here; use '{model_name}'",
                           "model")

    def submit(prompt: list[int], params: SamplingParams, param: str) -> _Pending:
        if not engine_alive(engine):
            raise ApiError(503, "the engine is not running; see the server log")
        pending = _Pending(asyncio.get_running_loop(), metrics)
        try:
            pending.cancel = functools.partial(engine.cancel, engine.submit(prompt, params,
                                                                             pending.on_event))
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        except TpserveError as e:  # empty or too long prompt, token id outside the vocab
            raise ApiError(400, str(e), param) from None
        return pending

    async def collect(pending: _Pending) -> tuple[str, int, str | None]:
        text, n, reason = [], 0, None
        async for ev in pending.events():
            if ev.finish_reason == "error":
                raise ApiError(503, f"the engine failed this request: {ev.error}")
            text.append(ev.text)
            n += len(ev.token_ids)
            reason = ev.finish_reason
        return "".join(text), n, reason

    def usage(prompt_len: int, n: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n,
                "total_tokens": prompt_len + n}

    def stream(pending: _Pending, req: _Common, prompt_len: int, head: dict, first: list[dict],
               choice) -> StreamingResponse:
        """SSE: `first` chunks, one chunk per event with text, `[DONE]` last."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body():
            for c in first:
                yield _sse({**head, "choices": [c]})
            n = 0
            async for ev in pending.events():
                if ev.finish_reason == "error":
                    yield _sse(error_body(503, f"the engine failed this request: {ev.error}"))
                    break
                n += len(ev.token_ids)
                for c in choice(ev):
                    yield _sse({**head, "choices": [c]})
            else:
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(prompt_len, n)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        _refuse_unsupported(req)
        if isinstance(req.prompt, str):
            if codec is None:
                raise ApiError(400, "this model has no tokenizer; send the prompt as token ids",
                               "prompt")
            prompt = codec.encode(req.prompt)
        else:
            prompt = req.prompt
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        pending = submit(prompt, _params(req, max_tokens), "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            def choice(ev):
                if ev.text or ev.finished:
                    yield {"index": 0, "text": ev.text, "logprobs": None,
                           "finish_reason": ev.finish_reason}
            return stream(pending, req, len(prompt), head, [], choice)
        text, n, reason = await collect(pending)
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                     "finish_reason": reason}], "usage": usage(len(prompt), n)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        check_model(req)
        _refuse_unsupported(req)
        if codec is None:
            raise ApiError(400, "this model has no tokenizer, so it cannot chat; use "
                                "/v1/completions with token ids", "messages")
        if not req.messages:
            raise ApiError(400, "'messages' is empty; send at least one message", "messages")
        messages = []
        for m in req.messages:
            content = m.content or ""
            if isinstance(content, list):
                kinds = {p.type for p in content} - {"text"}
                if kinds:
                    raise ApiError(400, f"content parts of type {sorted(kinds)} are not "
                                        f"supported; this model reads text only", "messages")
                content = "".join(p.text or "" for p in content)
            messages.append({"role": m.role, "content": content})
        try:
            prompt = codec.encode_chat(messages)
        except Exception as e:  # TpserveError from raise_exception, or a jinja2 error
            raise ApiError(400, f"the chat template cannot render these messages: {e}",
                           "messages") from None
        # No max_tokens: the rest of the context, as in vLLM.
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens)
                           if m is not None), None)
        if max_tokens is None:
            max_tokens = max(1, engine.max_len - len(prompt))
        pending = submit(prompt, _params(req, max_tokens), "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            def choice(ev):
                if ev.text:
                    yield {"index": 0, "delta": {"content": ev.text}, "logprobs": None,
                           "finish_reason": None}
                if ev.finished:
                    yield {"index": 0, "delta": {}, "logprobs": None,
                           "finish_reason": ev.finish_reason}
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            return stream(pending, req, len(prompt), head, [role], choice)
        text, n, reason = await collect(pending)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": reason}],
                "usage": usage(len(prompt), n)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "tpserve",
             "max_model_len": engine.max_len}]}

    @app.get("/health")
    async def health():
        if engine_alive(engine):
            return {"status": "ok"}
        return JSONResponse({"status": "error", "message": "the engine thread is not running"},
                            503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 10.0) -> None:
    """Serve until SIGINT or SIGTERM, then give in-flight requests `graceful_timeout` seconds.

    Blocks, and returns normally after a signal (uvicorn re-raises the signal it caught once it
    has stopped; here that lands in a handler, so the caller's cleanup runs, e.g.
    `engine.stop()`). Stopping the engine is the caller's job.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=graceful_timeout))
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    saved = {s: signal.signal(s, server.handle_exit) for s in sigs}
    try:
        server.run()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
