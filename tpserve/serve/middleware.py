"""ASGI middlewares of the HTTP app, both answering before a route reads the request:
`BodyLimit` reads each body whole, refusing one over its limit (413; `body_limit`: what the
longest prompt the context holds could take) or one that does not arrive within
BODY_READ_TIMEOUT_S (408); `ApiKey` checks the bearer key on every path but OPEN_PATHS."""

from __future__ import annotations

import asyncio
import hmac

from fastapi.responses import JSONResponse

from tpserve.errors import TpserveError
from tpserve.serve.limits import BODY_READ_TIMEOUT_S, BYTES_PER_TOKEN, MIN_BODY_BYTES
from tpserve.serve.metrics import Metrics
from tpserve.serve.openai_protocol import error_body


def body_limit(max_len: int) -> int:
    """The default request body limit for a `max_len`-token context, in whole MiB."""
    mib = -(-BYTES_PER_TOKEN * max_len // (1 << 20))
    return max(MIN_BODY_BYTES, mib << 20)


OPEN_PATHS = ("/health", "/metrics", "/version")  # for load balancers and scrapers, no key


class BodyLimit:
    """ASGI middleware: reads each request body whole before the app sees it. Over `limit` bytes
    it answers 413, by its Content-Length before any byte is read, else (chunked) as soon as the
    bytes received pass the limit; not received whole within `timeout` seconds, 408 (and closes
    the connection)."""

    def __init__(self, app, limit: int = MIN_BODY_BYTES, metrics: Metrics | None = None,
                 timeout: float = BODY_READ_TIMEOUT_S):
        self.app, self.limit, self.metrics, self.timeout = app, limit, metrics, timeout

    async def _refuse(self, scope, receive, send, status: int, message: str, code: str,
                      headers: dict | None = None):
        if self.metrics is not None:
            self.metrics.http_error(status)
        await JSONResponse(error_body(status, message, code=code), status, headers=headers)(
            scope, receive, send)

    async def _read(self, receive) -> list[dict] | None:
        """The body as one message (or the disconnect that cut it); None past the limit."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return [message]  # a disconnect passes through
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = (413, f"the request body exceeds {self.limit >> 20} MiB (the server's "
                          f"--max-body-mb); send a shorter prompt", "request_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send, *too_large)
        try:
            replay = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            return await self._refuse(
                scope, receive, send, 408, f"the request body did not arrive within "
                f"{self.timeout:g} s; send it whole, without pauses", "request_timeout",
                {"Connection": "close"})
        if replay is None:
            return await self._refuse(scope, receive, send, *too_large)

        async def replayed():
            return replay.pop(0) if replay else await receive()
        await self.app(scope, replayed, send)


class ApiKey:
    """ASGI middleware: every path but OPEN_PATHS (/v1/*, /tokenize, /detokenize, ...) needs
    `Authorization: Bearer <key>`; checked before the body is read, so an unauthenticated caller
    learns nothing about request validation and spends no tokenizer time."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.expected, self.metrics = app, self.checked(key).encode(), metrics

    @staticmethod
    def checked(key: str) -> str:
        """The key, if a client can send it (called where the app is built: Starlette builds
        its middleware on the first request)."""
        if key != key.strip():  # a header's value loses them: no client could match it
            raise TpserveError("the API key (--api-key or TPSERVE_API_KEY) starts or ends with "
                               "white space; set it without")
        return key

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = got.strip().partition(b" ")  # the scheme is case-insensitive
            if not (hmac.compare_digest(key.lstrip(b" "), self.expected)
                    and scheme.lower() == b"bearer"):
                self.metrics.http_error(401)
                body = error_body(401, "the API key is missing or wrong; send the header "
                                       "'Authorization: Bearer <key>'", code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)
