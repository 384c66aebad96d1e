"""Engine events onto the event loop: one `Pending` per HTTP request (n choices, n engine
requests), gathered whole (`collect`) or sent as server-sent events (`stream`); a whole answer
that is large (logprobs) is built and encoded off the event loop (`built_off_the_loop`).

A stream's events wait in its `Pending` while the client's socket is full. A client that reads
slower than its request is generated (but fast enough for the server's write deadline) would make
the server hold the whole generation: past BACKLOG_MAX_BYTES of waiting events (for a second, or
4x that at once) the request's choices are cancelled, the waiting events dropped, and the stream
ends with an error chunk.

Latency metrics are observed here, on the engine thread, as each event is made: time to first
token, the gap between tokens, and the request's end-to-end time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tpserve.serve.engine import Event
from tpserve.serve.metrics import Metrics
from tpserve.serve.openai_protocol import ApiError, error_body

log = logging.getLogger(__name__)


# What a stream's events may hold while they wait for its client (estimated as Python objects,
# `held_bytes`): ~10K tokens of plain text, ~1.4K with 20 top logprobs each. Past it for
# BACKLOG_GRACE_S (a burst of decode steps or of many choices' events drains faster), or past
# 4x it at once, the stream is cut: at most 16 MiB a stream, --max-connections streams. A whole
# (not streamed) answer is gathered as it comes, whatever the client's speed: never cut.
BACKLOG_MAX_BYTES = 4 << 20
BACKLOG_GRACE_S = 1.0


def held_bytes(ev: Event) -> int:
    """Roughly what a waiting event holds (its objects, measured on CPython 3.11: ~400 bytes a
    token event, ~140 a top logprob). The first event's prompt logprobs are not counted: they are
    made once and bounded by the logprob budget at admission."""
    return 400 + 2 * len(ev.text) + sum(150 + 140 * len(lp.top) for lp in ev.logprobs or ())


class SlowReader(ApiError):
    """A stream's client fell too far behind its generation (BACKLOG_MAX_BYTES)."""


class Pending:
    def __init__(self, metrics: Metrics, n: int, stream: bool = False):
        self.loop, self.metrics, self.n = asyncio.get_running_loop(), metrics, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []  # the engine's request ids, one per choice
        self.engine = None  # set once every choice is accepted; then cancel() is owed on exit
        self.closed = False  # no more events are queued
        self.cancelled = False  # the open choices were cancelled
        self.open = set(range(n))  # choices not yet finished (as the events taken so far say)
        self.backlog = 0  # held_bytes of the events waiting in the queue (event loop's count)
        self.limit = BACKLOG_MAX_BYTES if stream else None
        self.over_since: float | None = None  # when the backlog last went over the limit
        self.cut: SlowReader | None = None

    def callback(self, i: int):
        arrived, last = time.monotonic(), [None]

        def on_event(ev: Event) -> None:  # engine thread: must never raise
            now = time.monotonic()
            if ev.token_ids:
                if last[0] is None:
                    self.metrics.time_to_first_token.observe(now - arrived)
                else:
                    self.metrics.inter_token_latency.observe(now - last[0])
                last[0] = now
            if ev.finished and ev.finish_reason != "error":
                self.metrics.e2e_latency.observe(now - arrived)
            if self.closed:
                return
            try:
                size = 0 if self.limit is None else held_bytes(ev)  # only streams are cut
                self.loop.call_soon_threadsafe(self._put, i, ev, size)
            except RuntimeError:  # the event loop is closed: the server has shut down
                self.closed = True
        return on_event

    def _put(self, i: int, ev: Event, size: int) -> None:  # event loop
        if self.cut is not None:
            return
        self.backlog += size
        self.queue.put_nowait((i, ev, size))
        if self.limit is None:
            return
        if self.backlog <= self.limit:
            self.over_since = None
            return
        now = time.monotonic()
        self.over_since = self.over_since or now
        if self.backlog > 4 * self.limit or now - self.over_since >= BACKLOG_GRACE_S:
            held = self.backlog
            self.cut = SlowReader(408, f"the stream was cut: its client read it slower than it "
                                       f"was generated ({held / 2**20:.1f} MiB waited unsent); "
                                       f"read the stream faster, or ask for fewer choices, "
                                       f"tokens or logprobs")
            while not self.queue.empty():  # the waiting events are dropped, their memory freed
                self.queue.get_nowait()
            self.backlog = 0
            self.queue.put_nowait((None, None, 0))  # wakes the reader, which raises `cut`
            self._cancel()
            self.metrics.streams_cut.inc()
            log.warning("cut a stream whose client read %.1f MiB slower than its generation "
                        "(engine requests %s cancelled)", held / 2**20, self.ids)

    def _cancel(self) -> None:
        """Cancel the choices still open, once; no more events are queued."""
        self.closed = True
        if self.engine is not None and not self.cancelled:
            self.cancelled = True
            for i in self.open:
                self.engine.cancel(self.ids[i])

    async def events(self):
        """(choice, event, first event of that choice?) until every choice has finished; raises
        `SlowReader` where the stream was cut."""
        seen = set()
        try:
            while self.open:
                i, ev, size = await self.queue.get()
                self.backlog -= size
                if self.cut is not None:
                    raise self.cut
                yield i, ev, i not in seen
                seen.add(i)
                if ev.finished:
                    self.open.discard(i)
        finally:  # finished, failed, cut, or the client went away (the generator is closed)
            self._cancel()


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    reason: str | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None


async def _disconnected(request) -> None:
    """Returns once the client has gone: one receive() pending for the whole request, as
    Starlette's streams listen (a receive() per poll read the connection again each time, and
    bytes pipelined behind the request piled up in the HTTP parser's buffer without bound)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(pending: Pending, request=None) -> list[Choice]:
    """Every choice's whole output. With `request` (Starlette's), a client that disconnects
    before the end cancels the choices, as a closed stream does (its work would be thrown away)."""
    out = [Choice() for _ in range(pending.n)]
    texts: list[list[str]] = [[] for _ in out]  # joined once at the end: += copies every time

    async def gather() -> list[Choice]:
        async with contextlib.aclosing(pending.events()) as events:
            async for i, ev, _ in events:
                if ev.finish_reason == "error":
                    raise ApiError(503, f"the engine failed this request: {ev.error}")
                c = out[i]
                texts[i].append(ev.text)
                c.tokens += len(ev.token_ids)
                c.reason = ev.finish_reason
                c.logprobs += ev.logprobs or []
                c.prompt_logprobs = c.prompt_logprobs or ev.prompt_logprobs
        for c, parts in zip(out, texts):
            c.text = "".join(parts)
        return out
    if request is None:
        return await gather()
    task = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():  # the listener ended first
        task.cancel()  # closes the events: their `finally` cancels the engine's requests
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gone.result()  # an error while listening is the server's own, not a disconnect
        raise ApiError(499, "the client closed the request before it finished")
    return task.result()


# Characters JSON leaves as they are that str.splitlines() (httpx's and requests' iter_lines)
# takes for line breaks: escaped in SSE, or such a client reads a data line in pieces that are
# not JSON (SSE itself breaks lines at CR and LF only, and JSON escapes those)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _escape_breaks(text: str) -> str:
    """(translate() costs ~35 ns a character of non-ASCII text: only where one occurs)"""
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        return text.translate(_LINE_BREAKS)
    return text


def _sse(obj) -> str:
    return f"data: {_escape_breaks(json.dumps(obj, ensure_ascii=False))}\n\n"


def _many_logprobs(choice: dict) -> bool:
    """Whether a chunk's logprobs hold more than PIECE entries in a list (the echoed prompt's
    logprobs ride in a choice's first chunk): encoded in pieces, in a worker thread."""
    lp = choice.get("logprobs")
    return isinstance(lp, dict) and any(isinstance(v, list) and len(v) > PIECE
                                        for v in lp.values())


def stream(pending: Pending, req, prompt_len: int, head: dict, first: list[dict], chunks,
           usage) -> StreamingResponse:
    """SSE: the `first` choices, then what chunks(choice, event, first?) yields per event, a usage
    chunk when asked for, `[DONE]` last."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def body():
        for c in first:
            yield _sse({**head, "choices": [c]})
        n = 0
        try:
            async with contextlib.aclosing(pending.events()) as events:
                async for i, ev, is_first in events:
                    if ev.finish_reason == "error":
                        yield _sse(error_body(503, f"the engine failed this request: {ev.error}"))
                        break
                    n += len(ev.token_ids)
                    for c in chunks(i, ev, is_first):
                        obj = {**head, "choices": [c]}
                        if _many_logprobs(c):  # an echoed prompt's: seconds of JSON, off the loop
                            yield b"data: "  # the body's bytes go out as they are, not copied
                            yield await run_in_threadpool(encode, obj, True)
                            yield b"\n\n"
                        else:
                            yield _sse(obj)
                else:
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(prompt_len, n)})
        except SlowReader as e:
            yield _sse(error_body(e.status, e.message))
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# JSON as Starlette's JSONResponse writes it. A body is encoded in pieces: containers are walked
# down to WALK_DEPTH (the body, its choices, a choice, its logprobs), the lists below PIECE items
# per json.dumps call. One call holds the GIL throughout (encoding 68 MB at once took 3 s), so
# pieces let the event loop run between them while a worker thread encodes.
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
WALK_DEPTH, PIECE = 4, 1024


def encode(obj, sse: bool = False) -> bytes:
    """obj as JSON bytes; `sse`: with the characters that line splitters break at escaped."""
    out: list[str] = []
    _encode(obj, out, 0)
    text = "".join(out)
    return (_escape_breaks(text) if sse else text).encode("utf-8")


def _encode(obj, out: list[str], depth: int) -> None:
    if isinstance(obj, dict) and obj and depth < WALK_DEPTH:
        sep = "{"
        for key, value in obj.items():
            out.append(f"{sep}{_dumps(key)}:")
            _encode(value, out, depth + 1)
            sep = ","
        out.append("}")
    elif isinstance(obj, list) and obj and (depth < WALK_DEPTH or len(obj) > PIECE):
        out.append("[")
        if depth < WALK_DEPTH:
            for j, item in enumerate(obj):
                out.append("," if j else "")
                _encode(item, out, depth + 1)
        else:
            out.append(",".join(_dumps(obj[j:j + PIECE])[1:-1] for j in range(0, len(obj), PIECE)))
        out.append("]")
    else:
        out.append(_dumps(obj))


async def built_off_the_loop(build) -> Response:
    """The JSON response of build() -> dict, built and encoded in a worker thread: a body of many
    logprobs takes seconds, while /health and the other requests keep being served."""
    return Response(await run_in_threadpool(lambda: encode(build())), media_type="application/json")
