"""The HTTP server: uvicorn over the app, with what slow or many clients may hold bounded.

    serve(build_app(...), "0.0.0.0", 8000)   # blocks; returns after SIGINT/SIGTERM and a drain

uvicorn bounds neither the connections it holds nor the time a client takes to send its request
or to read its response: a client that connects and sends nothing, or part of its headers, or
part of a declared body, or that stops reading a response larger than the socket's buffers, holds
its connection (and a task, and the response's bytes) forever. Here:
- at most `max_connections` (`--max-connections`) are served; a request beyond them gets uvicorn's
  503 (its `limit_concurrency`);
- a connection idle after a response is closed after KEEP_ALIVE_S;
- a connection whose request headers have not all arrived HEADER_READ_TIMEOUT_S after it opened,
  or after the first byte following its previous response, is closed (`Bounded`);
- a body not received whole within BODY_READ_TIMEOUT_S gets 408 (`middleware.BodyLimit`);
- a connection whose unsent response bytes do not drain for WRITE_STALL_TIMEOUT_S, or drain by
  fewer than WRITE_MIN_DRAIN_BYTES in that time (or, of a large response, fewer than its share of
  WRITE_MAX_HOLD_S), is aborted (`Bounded`), also after the response ended (closing waits for the
  buffer to drain).
The bounds live in `limits.py`. Before it serves, the startup heap (the loaded model, the engine)
is frozen out of the garbage collector's passes (`freeze_startup_heap`).
"""

from __future__ import annotations

import fcntl
import gc
import logging
import signal
import struct
import termios
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tpserve.serve.limits import (DEFAULT_MAX_CONNECTIONS, HEADER_READ_TIMEOUT_S, KEEP_ALIVE_S,
                                  WRITE_MAX_HOLD_S, WRITE_MIN_DRAIN_BYTES, WRITE_STALL_TIMEOUT_S)


class Bounded(H11Protocol):
    """uvicorn's h11 protocol with two deadlines uvicorn 0.54 lacks (tests/test_hostile_requests.py
    checks both against the installed uvicorn).

    Headers: a connection whose request headers are not all in within `timeout` seconds is
    closed. The headers are in once uvicorn holds a new `cycle`, which it makes for each request
    once its headers are parsed.

    Writes: the transport's write buffer pauses the protocol as soon as it holds any byte the
    socket did not take (high-water mark 0: the kernel's send buffer is the buffer), and while
    paused uvicorn writes nothing more. A pause that sees no byte drain for `write_timeout`
    seconds (the transport's buffer and the socket's send queue together), or fewer than
    `min_drain` of them while more wait (a client reading a segment now and then to keep its
    connection), or, of a large unsent response, fewer than its share `write_timeout / max_hold`
    (a whole answer written at once), aborts the connection (`transport.abort()`: `close()` would
    wait for the buffer to drain, for ever for a client that reads nothing). A slow reader keeps
    its connection."""

    timeout = HEADER_READ_TIMEOUT_S
    write_timeout = WRITE_STALL_TIMEOUT_S
    min_drain = WRITE_MIN_DRAIN_BYTES
    max_hold = WRITE_MAX_HOLD_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=0)
        self._deadline = self._stall = None
        self._arm()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._watch_writes(None)

    def resume_writing(self) -> None:
        self._unwatch_writes()
        super().resume_writing()

    def _watch_writes(self, unsent: int | None) -> None:
        """Abort if fewer bytes drained since one period ago (`unsent` then) than min_drain, or
        than unsent x period / max_hold where that is more (a large response), at most unsent;
        else look again one period later."""
        self._stall = None
        buffered = self.transport.get_write_buffer_size()
        if buffered == 0:
            return
        left = buffered + _kernel_unsent(self.transport)
        need = None if unsent is None else min(
            unsent, max(self.min_drain, int(unsent * self.write_timeout / self.max_hold)))
        if need is not None and unsent - left < need:  # too little drained
            self.transport.abort()  # connection_lost follows, failing the response's sends
            return
        self._stall = self.loop.call_later(self.write_timeout, self._watch_writes, left)

    def _unwatch_writes(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes after a response: a new request's headers start
        super().data_received(data)
        if self.cycle is not self._awaiting:  # its headers are parsed
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._unwatch_writes()
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


def _kernel_unsent(transport) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged (Linux's SIOCOUTQ;
    0 where it is not available). A client reading slowly drains this queue long before the
    socket counts as writable again, so the transport's own buffer alone would look stalled."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


def server_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  graceful_timeout: float = 10.0, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                  header_timeout: float = HEADER_READ_TIMEOUT_S,
                  write_timeout: float = WRITE_STALL_TIMEOUT_S,
                  min_drain: int = WRITE_MIN_DRAIN_BYTES,
                  max_hold: float = WRITE_MAX_HOLD_S) -> uvicorn.Config:
    """uvicorn's config for `app` with the bounds above (no WebSocket: tpserve serves none, and
    the header deadline would close an upgraded connection)."""
    protocol = type("Bounded", (Bounded,), {"timeout": header_timeout,
                                            "write_timeout": write_timeout,
                                            "min_drain": min_drain, "max_hold": max_hold})
    # uvicorn refuses a request once its connections, its own included, reach limit_concurrency
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          ws="none", limit_concurrency=max_connections + 1,
                          timeout_keep_alive=KEEP_ALIVE_S,
                          timeout_graceful_shutdown=graceful_timeout)


log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Move every object alive now out of the cyclic garbage collector's passes (`gc.freeze`);
    -> how many. A request body of many small JSON containers (1 MiB of `[],`) makes the
    collector run hundreds of times while it is parsed on the event loop, and each full pass
    walked the loaded model's objects: 275 ns a byte against 33 once they are frozen (the demo
    model loaded; 17 with the collector off); `limits.py` sizes the body limit on the latter
    figures. Frozen objects are still freed when their last reference goes."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("froze %d objects of the startup heap out of the garbage collector's passes", n)
    return n


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 10.0, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """Serve until SIGINT or SIGTERM, then give in-flight requests `graceful_timeout` seconds.

    Blocks, and returns normally after a signal (uvicorn re-raises the signal it caught once it
    has stopped; here that lands in a handler, so the caller's cleanup runs, e.g.
    `engine.stop()`). Stopping the engine is the caller's job.
    """
    server = uvicorn.Server(server_config(app, host, port, log_level, graceful_timeout,
                                          max_connections))
    freeze_startup_heap()
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
