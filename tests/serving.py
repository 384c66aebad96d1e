"""Helpers of the HTTP tests: a uvicorn server in a thread, and the demo model served over it."""

import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn

import tpserve
from tpserve.demo import demo_path
from tpserve.serve.engine import Engine
from tpserve.serve.app import build_app
from tpserve.serve.text import TextCodec

MODEL = "tpserve-demo"


class Server:
    """A uvicorn server in a background thread, on a port the OS picked."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def served_demo(tmp_path_factory, references, tp=2, **engine_options):
    """Yields the demo model at `tp` behind a server: llm, codec, engine, url, client, ref.

    references(llm, codec) -> dict runs before the engine starts: `llm.generate` steps in the
    caller's thread on the KV slots that the started engine owns afterwards."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TPSERVE_CACHE", str(tmp_path_factory.mktemp("tpserve-cache")))
    path = demo_path()
    llm = tpserve.load(path, tp=tp, dtype=torch.float32)
    codec = TextCodec.load(path)
    ref = references(llm, codec)
    engine = Engine(llm, tokenizer=codec, **engine_options).start()
    server = Server(build_app(engine, codec, MODEL, version=tpserve.__version__))
    client = httpx.Client(base_url=server.url, timeout=60)
    yield SimpleNamespace(llm=llm, codec=codec, engine=engine, ref=ref, url=server.url,
                          client=client)
    client.close()
    server.close()
    engine.stop()
    llm.close()
    mp.undo()


def sse(client, path, body):
    """The parsed `data:` objects of a stream, checking it ends with [DONE]."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def lines_up(choice: dict, codec) -> None:
    """A /v1/completions choice's logprobs place every token in its text: each text_offset lies
    in order within the text, and a token named by its text (not "bytes:\\xNN", a part of a
    character; not a control token, which generated text leaves out) stands there."""
    text, lp = choice["text"], choice["logprobs"]
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets), offsets
    for token, offset in zip(lp["tokens"], offsets):
        if not token.startswith("bytes:") and token not in codec.specials:
            assert text[offset:offset + len(token)] == token, (token, offset, text)
