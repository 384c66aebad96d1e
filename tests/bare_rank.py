"""A rank worker with no model, serving a test's ROUTER socket: for the tests that speak the
rank's setup protocol directly (hostile or fuzzed setup messages)."""

import threading
from contextlib import contextmanager

import zmq

from tpserve.runtime.rank_worker import RankWorker
from tpserve.runtime.wire import encode


@contextmanager
def bare_rank(folder, ident: bytes, timeout_s: float):
    """Yields (router, worker) once rank 0 of 2 has said hello on ipc://folder/c.sock; stops it
    after."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"ipc://{folder}/c.sock"
    router.bind(addr)
    worker = RankWorker(0, 2, ".", "float32", "cpu", 1, 1, timeout_s=timeout_s)
    t = threading.Thread(target=worker.serve, args=(addr, {"identity": ident}), daemon=True)
    t.start()
    try:
        assert router.poll(10000) and router.recv_multipart()[0] == ident  # hello
        yield router, worker
    finally:
        router.send_multipart([ident, *encode({"op": "stop"})])
        t.join(10)
        ctx.destroy(0)
