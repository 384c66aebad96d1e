"""The HTTP server: uvicorn over the app, with what slow or many clients may hold bounded.

    serve(build_app(...), "0.0.0.0", 8000)   # blocks; returns after SIGINT/SIGTERM and a drain

uvicorn bounds neither the connections it holds nor the time a client takes to send its request:
a client that connects and sends nothing, or part of its headers, or part of a declared body,
holds its connection (and for a body, a task) forever. Here:
- at most `max_connections` (`--max-connections`) are served; a request beyond them gets uvicorn's
  503 (its `limit_concurrency`);
- a connection idle after a response is closed after KEEP_ALIVE_S;
- a connection whose request headers have not all arrived HEADER_READ_TIMEOUT_S after it opened,
  or after the first byte following its previous response, is closed (`HeaderDeadline`);
- a body not received whole within BODY_READ_TIMEOUT_S gets 408 (`middleware.BodyLimit`).
"""

from __future__ import annotations

import signal
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_MAX_CONNECTIONS = 1024
KEEP_ALIVE_S = 5.0
HEADER_READ_TIMEOUT_S = 10.0


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not all in within
    `timeout` seconds (uvicorn 0.54 has no such deadline). It tells that the headers are in by
    uvicorn's `cycle`, which it makes for each request once its headers are parsed
    (tests/test_hostile_requests.py checks this against the installed uvicorn)."""

    timeout = HEADER_READ_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes after a response: a new request's headers start
        super().data_received(data)
        if self.cycle is not self._awaiting:  # its headers are parsed
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._awaiting = self.cycle  # the headers are in once uvicorn holds another cycle
        self._deadline = self.loop.call_later(self.timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is self._awaiting and not self.transport.is_closing():
            self.transport.close()  # as nginx on client_header_timeout: no response


def server_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  graceful_timeout: float = 10.0, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                  header_timeout: float = HEADER_READ_TIMEOUT_S) -> uvicorn.Config:
    """uvicorn's config for `app` with the bounds above (no WebSocket: tpserve serves none, and
    the header deadline would close an upgraded connection)."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"timeout": header_timeout})
    # uvicorn refuses a request once its connections, its own included, reach limit_concurrency
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          ws="none", limit_concurrency=max_connections + 1,
                          timeout_keep_alive=KEEP_ALIVE_S,
                          timeout_graceful_shutdown=graceful_timeout)


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 10.0, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """Serve until SIGINT or SIGTERM, then give in-flight requests `graceful_timeout` seconds.

    Blocks, and returns normally after a signal (uvicorn re-raises the signal it caught once it
    has stopped; here that lands in a handler, so the caller's cleanup runs, e.g.
    `engine.stop()`). Stopping the engine is the caller's job.
    """
    server = uvicorn.Server(server_config(app, host, port, log_level, graceful_timeout,
                                          max_connections))
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
