"""OpenAI-compatible HTTP API over the engine (the wire format is `openai_protocol`).

    app = build_app(Engine(llm, codec).start(), codec, "my-model", api_key=None)
    serve(app, "0.0.0.0", 8000)   # tpserve.serve.server: blocks until SIGINT/SIGTERM

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with SSE), GET /v1/models,
GET /v1/models/{id}, POST /tokenize, POST /detokenize, GET /version, GET /health, GET /metrics.
Errors have OpenAI's shape, `{"error": {message, type, param, code}}`: 400 for a bad request,
401 for a missing or wrong API key, 404 for a model not served here, 408 or 413 for a body too
slow or too large (`middleware`), 429 (with Retry-After) when the queue is full, 503 when the
engine failed or is not running.

Engine events arrive on the engine thread; each request gets an asyncio.Queue fed through
`loop.call_soon_threadsafe`. A request with n choices is n engine requests, queued all or none
(a 429 queues nothing); only choice 0's computes the prompt's logprobs (echo), which every choice
shares (`logprobs`). A request's logprobs are bounded (MAX_LOGPROB_ENTRIES) before it is queued,
and a whole answer with logprobs is built off the event loop. When a client goes away its
requests are cancelled: the engine frees their KV slots before the next step.
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpserve.errors import client_message, shown
from tpserve.serve.engine import QueueFull
from tpserve.serve.limits import BODY_READ_TIMEOUT_S
from tpserve.serve.logprobs import (BatchChoices, CompletionChoices, TokenTexts, chat_logprobs,
                                    check_logprob_budget, logprob_tokens)
from tpserve.serve.metrics import CONTENT_TYPE, Metrics
from tpserve.serve.prompts import Prompts
from tpserve.serve.middleware import ApiKey, BodyLimit, body_limit
from tpserve.serve.openai_protocol import (
    ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, check_text,
    error_body, refuse_unsupported, sampling_params, validation_message)
from tpserve.serve.requests import Group, RequestError
from tpserve.serve.streams import Pending, built_off_the_loop, collect, stream

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1


def build_app(engine, codec, model_name: str, api_key: str | None = None,
              metrics: Metrics | None = None, version: str = "",
              body_timeout: float = BODY_READ_TIMEOUT_S, max_body_bytes: int | None = None
              ) -> FastAPI:
    """The HTTP app over a started engine. codec may be None (then only token-id prompts).
    max_body_bytes: the request body limit (413 above it); None: `body_limit(engine.max_len)`."""
    metrics = metrics or Metrics(engine, model_name)
    app = FastAPI(title="tpserve", docs_url=None, redoc_url=None)
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "tpserve",
            "root": model_name, "max_model_len": engine.max_len}
    limit = body_limit(engine.max_len) if max_body_bytes is None else max_body_bytes
    app.add_middleware(BodyLimit, limit=limit, metrics=metrics, timeout=body_timeout)
    if api_key:  # outermost: an unauthenticated caller is refused before the body counts
        app.add_middleware(ApiKey, key=ApiKey.checked(api_key), metrics=metrics)

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
        # The client learns a reference, not the exception's text (paths, device messages).
        return error(500, client_message("internal error", e, log))

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise ApiError(404, f"model '{model[:200]}' is not served here; use '{model_name}'",
                           "model", "model_not_found")

    def submit(batch: list[list[int]], params, n: int, param: str, stream: bool) -> Pending:
        """n choices of each prompt of `batch` (choice i: prompt i // n), queued all or none."""
        if not engine.alive:
            raise ApiError(503, "the engine is not running; see the server log")
        total = len(batch) * n
        if 0 < engine.max_queue < total:  # its choices could never all wait in the queue: not 429
            what = f"n={n}" if len(batch) == 1 else f"{len(batch)} prompts x n={n}"
            raise ApiError(400, f"{what} exceeds the server's queue of {engine.max_queue} "
                                f"requests (--max-queue); ask for fewer choices", "n")
        pending = Pending(metrics, total, stream)
        try:
            for prompt in batch:  # what can never run is a 400, also in a full queue
                engine.check(prompt, [params])
            engine.check_room(total)  # before the choices are built and checked (again when queued)
            # Choice i of a prompt samples with seed + i: n different, repeatable answers, each
            # prompt's those of a request of its own. The prompt's logprobs (echo) are the same
            # for every choice: choice 0 computes them, the others reuse them.
            choices = [params] + [params.for_choice(i) for i in range(1, n)]
            group = Group()  # every choice of every prompt: one client request's (fair_share.py)
            for g, prompt in enumerate(batch):
                pending.ids += engine.submit_many(prompt, choices, [pending.callback(g * n + i)
                                                                    for i in range(n)], True, group)
        except (QueueFull, RequestError) as e:
            pending.closed = True  # a batch's prompts queued before this one are withdrawn
            for rid in pending.ids:
                engine.cancel(rid)
            if isinstance(e, QueueFull):
                raise ApiError(429, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            # empty or too long prompt, token id outside the vocab
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
        echo, k, n = bool(req.echo), req.logprobs, req.n or 1
        # echo with max_tokens 0 scores the prompt (as OpenAI's legacy API and vLLM do; what
        # evaluation harnesses send for log-likelihoods): one step runs, its token is dropped
        scoring = echo and req.max_tokens == 0
        if req.max_tokens == 0 and not echo:
            raise ApiError(400, "max_tokens=0 returns nothing without echo; send max_tokens >= 1, "
                                "or echo=true to score the prompt", "max_tokens")
        if scoring and req.min_tokens:  # (the one step scoring runs is not shown)
            raise ApiError(400, f"min_tokens={shown(req.min_tokens)} asks for tokens that "
                                f"max_tokens=0 (scoring the prompt) never generates; send "
                                f"min_tokens 0", "min_tokens")
        batch = await prompts.completion(req.prompt, echo)  # [(token ids, echo text)]
        params = sampling_params(req, 1 if scoring else 16 if req.max_tokens is None
                                 else req.max_tokens, k, k if echo and k is not None else None)
        check_logprob_budget(n * len(batch), max(len(p) for p, _ in batch) if echo else 0,
                             params.max_tokens, k)
        pending = submit([p for p, _ in batch], params, n, "prompt", bool(req.stream))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        out = BatchChoices([CompletionChoices(codec, text, echo, k, not scoring)
                            for _, text in batch], n)
        prompt_len = sum(len(p) for p, _ in batch)  # usage counts each prompt once
        counted = (lambda p, _: usage(p, 0)) if scoring else usage
        if req.stream:
            return stream(pending, req, prompt_len, head, [], out.chunks, counted)
        results = await collect(pending, request)

        def body():
            return {**head, "choices": out.choices(results),
                    "usage": counted(prompt_len, sum(r.tokens for r in results))}
        return body() if k is None else await built_off_the_loop(body)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        refuse_unsupported(req)
        prompt = await prompts.chat(req.messages, req.chat_template_kwargs,
                                    req.add_generation_prompt, req.continue_final_message)
        k, n = (req.top_logprobs or 0) if req.logprobs else None, req.n or 1
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens)
                           if m is not None), None)
        if max_tokens is None:  # the rest of the context, as in vLLM; with logprobs, within the
            max_tokens = engine.max_len - len(prompt)  # budget (n is checked further on)
            allowed = logprob_tokens(n, k)
            max_tokens = max(1, max_tokens if allowed is None else min(max_tokens, allowed))
        tokens_param = ("max_completion_tokens" if req.max_completion_tokens is not None
                        else "max_tokens")
        try:
            params = sampling_params(req, max_tokens, k)
            check_logprob_budget(n, 0, max_tokens, k, "top_logprobs", tokens_param)
            pending = submit([prompt], params, n, "messages", bool(req.stream))
        except ApiError as e:  # the chat names of fields that sampling_params and the engine's
            rename = {"logprobs": "top_logprobs", "max_tokens": tokens_param}  # checks know
            if e.param in rename:
                e.message = e.message.replace(f"{e.param}=", f"{rename[e.param]}=", 1)
                e.param = rename[e.param]
            raise
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model_name}
        texts = TokenTexts(codec)

        def logprobs(lps):
            return None if k is None else {"content": chat_logprobs(lps or [], texts)}
        if req.stream:
            def chunks(i, ev, first):
                if ev.text or (k is not None and ev.logprobs):
                    yield {"index": i, "delta": {"content": ev.text},
                           "logprobs": logprobs(ev.logprobs), "finish_reason": None}
                if ev.finished:
                    yield {"index": i, "delta": {}, "logprobs": None,
                           "finish_reason": ev.finish_reason}
            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)]
            return stream(pending, req, len(prompt), head, roles, chunks, usage)
        results = await collect(pending, request)

        def body():
            return {**head, "object": "chat.completion",
                    "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                                 "logprobs": logprobs(r.logprobs), "finish_reason": r.reason}
                                for i, r in enumerate(results)],
                    "usage": usage(len(prompt), sum(r.tokens for r in results))}
        return body() if k is None else await built_off_the_loop(body)

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
            tokens = await prompts.chat(req.messages, req.chat_template_kwargs,
                                        req.add_generation_prompt, req.continue_final_message)
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
