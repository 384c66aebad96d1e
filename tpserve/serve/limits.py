"""The HTTP server's bounds on what one client may hold, in one place without the HTTP stack's
imports (the CLI reads them for its help; `tpserve verify` and `generate` need no HTTP stack).
`server.py` and `middleware.py` enforce them."""

from __future__ import annotations

DEFAULT_MAX_CONNECTIONS = 1024
KEEP_ALIVE_S = 5.0  # an idle connection after a response is closed after this
HEADER_READ_TIMEOUT_S = 10.0  # a request's headers must all arrive within this
# A response that the client stops reading: once the server's send buffer stays full this long
# without draining a byte, the connection is aborted (uvicorn has no write timeout, and closing a
# connection waits for its buffer to drain, so such a client would hold its connection for ever).
WRITE_STALL_TIMEOUT_S = 30.0
# ... and one that drains fewer than this many bytes in such a period (while more are waiting) is
# aborted too: ~1 KB/s, far below any real reader, above a client that reads a segment now and
# then to keep its connection (1024 of them would hold every connection).
WRITE_MIN_DRAIN_BYTES = 32 << 10
# ... and a large unsent response (a whole answer of many logprobs is written at once: up to
# ~150 MB) must drain in proportion: at least its unsent bytes x period / WRITE_MAX_HOLD_S per
# period (5% of them per 30 s), so a client reading at ~1 KB/s cannot hold 150 MB of the server's
# memory for a day; a reader of 2 Mbit/s takes a 150 MB answer.
WRITE_MAX_HOLD_S = 600.0
# A body not received whole within this is refused (408): a client that declares a body and
# sends it slowly, or never, would otherwise hold its connection and a task for ever.
BODY_READ_TIMEOUT_S = 30.0
# A request body over `middleware.body_limit` is refused (413) unread. Parsing JSON runs on the
# event loop at up to ~60 ns a byte (1 s for 16 MiB of unknown fields on a 2-core EPYC; lists of
# empty lists 33-48 ns with the startup heap frozen, `server.freeze_startup_heap`, 215-275 ns
# without: the collector's passes walked the loaded model), stalling every connection
# meanwhile, so the limit follows the context: BYTES_PER_TOKEN per token of it (a
# prompt as token ids takes ~7 bytes a token, as text ~4, as escaped CJK text ~9), at least
# MIN_BODY_BYTES.
BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 1 << 20
MAX_BODY_MB = 1024  # --max-body-mb's upper bound
