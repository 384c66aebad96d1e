"""ASGI middlewares of the HTTP app, both answering before a route reads the request:
`BodyLimit` refuses bodies over MAX_BODY_BYTES (413), `ApiKey` checks the bearer key on every path
but OPEN_PATHS."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from tpserve.serve.metrics import Metrics
from tpserve.serve.openai_protocol import error_body

MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) unread
OPEN_PATHS = ("/health", "/metrics", "/version")  # for load balancers and scrapers, no key


class BodyLimit:
    """ASGI middleware: bodies over MAX_BODY_BYTES get 413, by their Content-Length before any
    byte is read, else (chunked) as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, metrics: Metrics | None = None):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def _refuse(self, scope, receive, send):
        body = error_body(413, f"the request body exceeds {self.limit >> 20} MiB; send a "
                               f"shorter prompt", code="request_too_large")
        if self.metrics is not None:
            self.metrics.http_error(413)
        await JSONResponse(body, 413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, seen = [], 0  # chunked: read it here, up to the limit
        while True:
            last = await receive()
            if last["type"] != "http.request":
                break
            seen += len(last.get("body", b""))
            if seen > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(last.get("body", b""))
            if not last.get("more_body"):
                break
        replay = [last if last["type"] != "http.request" else  # a disconnect passes through
                  {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop(0) if replay else await receive()
        await self.app(scope, replayed, send)


class ApiKey:
    """ASGI middleware: every path but OPEN_PATHS (/v1/*, /tokenize, /detokenize, ...) needs
    `Authorization: Bearer <key>`; checked before the body is read, so an unauthenticated caller
    learns nothing about request validation and spends no tokenizer time."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.expected, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                self.metrics.http_error(401)
                body = error_body(401, "the API key is missing or wrong; send the header "
                                       "'Authorization: Bearer <key>'", code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)
