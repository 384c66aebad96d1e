"""OpenAI-compatible HTTP API over the engine (the wire format is `openai_protocol`).

    app = build_app(Engine(llm, codec).start(), codec, "my-model", api_key=None)
    serve(app, "0.0.0.0", 8000)   # blocks; returns after SIGINT/SIGTERM and a graceful drain

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with SSE), GET /v1/models,
GET /v1/models/{id}, POST /tokenize, POST /detokenize, GET /version, GET /health, GET /metrics.
Errors have OpenAI's shape, `{"error": {message, type, param, code}}`: 400 for a bad request,
401 for a missing or wrong API key, 404 for a model not served here, 429 (with Retry-After) when
the queue is full, 503 when the engine failed or is not running.

Engine events arrive on the engine thread; each request gets an asyncio.Queue fed through
`loop.call_soon_threadsafe`. A request with n choices is n engine requests. When a streaming
client goes away its requests are cancelled: the engine frees their KV slots before the next step.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpserve.serve.engine import QueueFull, RequestError
from tpserve.serve.metrics import CONTENT_TYPE, Metrics
from tpserve.serve.prompts import Prompts
from tpserve.serve.middleware import ApiKey, BodyLimit
from tpserve.serve.openai_protocol import (
    ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, chat_logprobs,
    check_text, completion_logprobs, error_body, refuse_unsupported, sampling_params,
    validation_message)
from tpserve.serve.sampling import MAX_SEED
from tpserve.serve.streams import Pending, collect, stream

RETRY_AFTER_S = 1


def build_app(engine, codec, model_name: str, api_key: str | None = None,
              metrics: Metrics | None = None, version: str = "") -> FastAPI:
    """The HTTP app over a started engine. codec may be None (then only token-id prompts)."""
    metrics = metrics or Metrics(engine, model_name)
    app = FastAPI(title="tpserve", docs_url=None, redoc_url=None)
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "tpserve",
            "root": model_name, "max_model_len": engine.max_len}
    app.add_middleware(BodyLimit, metrics=metrics)
    if api_key:  # outermost: an unauthenticated caller is refused before the body counts
        app.add_middleware(ApiKey, key=api_key, metrics=metrics)

    def error(status, message, param=None, code=None, headers=None):
        if status != 500:
            metrics.http_error(status)
        return JSONResponse(error_body(status, message, param, code), status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()  # a union's first error may be a member's type; ours says more
        first = next((x for x in errs if x["type"] == "value_error"), errs[0])
        return error(400, *validation_message(first, request.headers.get("content-type", "")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        if e.status_code == 400 and e.detail == "There was an error parsing the body":
            return error(400, "the request body cannot be read as JSON (not UTF-8, nested too "
                              "deeply, or a number too long); send well-formed JSON")
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):  # Starlette re-raises it after, so uvicorn logs it
        return error(500, f"internal error: {type(e).__name__}: {e}")

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise ApiError(404, f"model '{model[:200]}' is not served here; use '{model_name}'",
                           "model", "model_not_found")

    def submit(prompt: list[int], params, n: int, param: str) -> Pending:
        if not engine.alive:
            raise ApiError(503, "the engine is not running; see the server log")
        if 0 < engine.max_queue < n:  # its choices could never all wait in the queue: not a 429
            raise ApiError(400, f"n={n} exceeds the server's queue of {engine.max_queue} "
                                f"requests (--max-queue); ask for fewer choices", "n")
        pending = Pending(metrics, n)
        try:
            for i in range(n):  # choice i samples with seed + i: n different, repeatable answers
                p = params if params.seed is None or i == 0 else dataclasses.replace(
                    params, seed=(params.seed + i) % (MAX_SEED + 1))
                pending.ids.append(engine.submit(prompt, p, pending.callback(i)))
        except QueueFull as e:
            pending.cancel(engine)
            raise ApiError(429, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RequestError as e:  # empty or too long prompt, token id outside the vocab
            pending.cancel(engine)
            raise ApiError(400, str(e), param if e.param == "prompt" else e.param) from None
        pending.engine = engine
        return pending

    def usage(prompt_len: int, n: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n,
                "total_tokens": prompt_len + n}

    prompts = Prompts(engine, codec)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        refuse_unsupported(req)
        if isinstance(req.prompt, str):
            prompt = await prompts.text(check_text(req.prompt, "prompt"), "prompt")
            prompt_text = req.prompt
        else:
            prompt = req.prompt
            prompts.token_ids(prompt, "prompt")  # before the echo's decode
            prompt_text = await prompts.decode(prompt) if codec is not None and req.echo else ""
        echo, k = bool(req.echo), req.logprobs
        params = sampling_params(req, 16 if req.max_tokens is None else req.max_tokens, k,
                                 k if echo and k is not None else None)
        pending = submit(prompt, params, req.n or 1, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        offsets = {}

        def choice(i, text, lps, reason, first):
            if echo and first:
                text, lps = prompt_text + text, (lps[1] or []) + (lps[0] or [])
            else:
                lps = lps[0]
            out = None
            if k is not None:
                out = completion_logprobs(lps or [], codec, offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + sum(map(len, out["tokens"]))
            return {"index": i, "text": text, "logprobs": out, "finish_reason": reason}
        if req.stream:
            def chunks(i, ev, first):
                if ev.text or ev.finished or (k is not None and ev.logprobs) or (echo and first):
                    yield choice(i, ev.text, (ev.logprobs, ev.prompt_logprobs), ev.finish_reason,
                                 first)
            return stream(pending, req, len(prompt), head, [], chunks, usage)
        results = await collect(pending, request)
        return {**head, "choices": [choice(i, r.text, (r.logprobs, r.prompt_logprobs), r.reason,
                                           True) for i, r in enumerate(results)],
                "usage": usage(len(prompt), sum(r.tokens for r in results))}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        refuse_unsupported(req)
        prompt = await prompts.chat(req.messages)
        # No max_tokens: the rest of the context, as in vLLM.
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens)
                           if m is not None), None)
        if max_tokens is None:
            max_tokens = max(1, engine.max_len - len(prompt))
        k = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = sampling_params(req, max_tokens, k)
        except ApiError as e:  # the chat names of the fields sampling_params knows otherwise
            rename = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"
                      if req.max_completion_tokens is not None else "max_tokens"}
            if e.param in rename:
                e.message = e.message.replace(f"{e.param}=", f"{rename[e.param]}=", 1)
                e.param = rename[e.param]
            raise
        pending = submit(prompt, params, req.n or 1, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model_name}

        def logprobs(lps):
            return None if k is None else {"content": chat_logprobs(lps or [], codec)}
        if req.stream:
            def chunks(i, ev, first):
                if ev.text or (k is not None and ev.logprobs):
                    yield {"index": i, "delta": {"content": ev.text},
                           "logprobs": logprobs(ev.logprobs), "finish_reason": None}
                if ev.finished:
                    yield {"index": i, "delta": {}, "logprobs": None,
                           "finish_reason": ev.finish_reason}
            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n or 1)]
            return stream(pending, req, len(prompt), head, roles, chunks, usage)
        results = await collect(pending, request)
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "logprobs": logprobs(r.logprobs), "finish_reason": r.reason}
                            for i, r in enumerate(results)],
                "usage": usage(len(prompt), sum(r.tokens for r in results))}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return card

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send exactly one of 'prompt' and 'messages'", "prompt")
        if req.messages is not None:
            tokens = await prompts.chat(req.messages)
        else:
            tokens = await prompts.text(check_text(req.prompt, "prompt"), "prompt",
                                        req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.max_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        prompts.need_codec("tokens")
        prompts.token_ids(req.tokens, "tokens")
        return {"prompt": await prompts.decode(req.tokens)}

    @app.get("/version")
    async def get_version():
        return {"version": version}

    @app.get("/health")
    async def health():
        if engine.alive:
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
