"""Requests that try to cost the server more than they should, against the demo model at tp=1
behind real HTTP: many logprobs, slow or many connections, choices that do not fit the queue.

    python -m pytest tests/test_hostile_requests.py -q
"""

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from serving import MODEL, Server, lines_up, served_demo, sse

import tpserve
from tpserve.demo import demo_path
from tpserve.serve import app as app_module
from tpserve.serve import batch, logprobs, streams
from tpserve.serve.app import build_app
from tpserve.serve.engine import Engine, QueueFull
from tpserve.serve.logprobs import CompletionChoices, check_logprob_budget
from tpserve.serve.openai_protocol import ApiError
from tpserve.serve.requests import Event, RequestError
from tpserve.serve.sampling import TokenLogprob
from tpserve.serve.sampling_params import SamplingParams
from tpserve.serve.server import server_config

PROMPT = "Hello there"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from served_demo(tmp_path_factory, lambda llm, codec: {}, tp=1)


@pytest.fixture
def prompt_logprob_calls(monkeypatch):
    """The engine's prompt-logprob computations, one entry per engine request that asked."""
    calls, real = [], batch.prompt_logprobs

    def counted(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(batch, "prompt_logprobs", counted)
    return calls


# ---- logprobs ------------------------------------------------------------------------------
def test_prompt_logprobs_are_computed_once_per_request(env, prompt_logprob_calls):
    """n choices echo the same prompt logprobs: choice 0 computes them, the others share them."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 3,
            "temperature": 1.0, "seed": 5, "ignore_eos": True}
    one = env.client.post("/v1/completions", json=body).json()["choices"][0]
    n_prompt = len(env.codec.encode(PROMPT))
    echoed = {key: v[:n_prompt] for key, v in one["logprobs"].items()}
    del prompt_logprob_calls[:]
    r = env.client.post("/v1/completions", json={**body, "n": 4})
    assert r.status_code == 200, r.text
    assert len(prompt_logprob_calls) == 1
    shared = {key: v[:n_prompt] for key, v in r.json()["choices"][0]["logprobs"].items()}
    for c in r.json()["choices"]:
        lp = c["logprobs"]
        assert c["text"].startswith(PROMPT) and len(lp["tokens"]) == n_prompt + 3
        assert {key: v[:n_prompt] for key, v in lp.items()} == shared
        lines_up(c, env.codec)
    # The same as one choice's own (a prefill batched with others sums in another order).
    assert (shared["tokens"], shared["text_offset"]) == (echoed["tokens"], echoed["text_offset"])
    assert shared["token_logprobs"][1:] == pytest.approx(echoed["token_logprobs"][1:], abs=1e-4)

    del prompt_logprob_calls[:]
    chunks = sse(env.client, "/v1/completions", {**body, "n": 4, "stream": True})
    assert len(prompt_logprob_calls) == 1
    firsts = {}
    for c in chunks:
        firsts.setdefault(c["choices"][0]["index"], c["choices"][0])
    assert sorted(firsts) == [0, 1, 2, 3]
    for c in firsts.values():
        assert c["text"].startswith(PROMPT)
        assert {key: v[:n_prompt] for key, v in c["logprobs"].items()} == \
            {key: v[:n_prompt] for key, v in firsts[0]["logprobs"].items()}
    assert firsts[0]["logprobs"]["tokens"][:n_prompt] == echoed["tokens"]


def test_streamed_choices_wait_for_the_prompt_logprobs_of_choice_0(env):
    """A choice whose first event comes before choice 0's is held until choice 0's brings the
    prompt's logprobs, then sent with them."""
    prompt = env.codec.encode("ab", add_special_tokens=False)
    prompt_lps = [TokenLogprob(prompt[0], None, [])] + [
        TokenLogprob(t, -0.5, [(t, -0.5), (7, -1.5)]) for t in prompt[1:]]
    out = CompletionChoices(env.codec, "ab", echo=True, k=1)

    def event(choice, token, finished=False, first_of_0=False):
        return Event(choice, [token], env.codec.decode([token]), finished,
                     "length" if finished else None, logprobs=[TokenLogprob(token, -1.0, [])],
                     prompt_logprobs=prompt_lps if first_of_0 else None)
    a, b, c, d = env.codec.encode("ABCD", add_special_tokens=False)
    assert list(out.chunks(1, event(1, a), True)) == []
    assert list(out.chunks(1, event(1, b, finished=True), False)) == []
    sent = list(out.chunks(0, event(0, c, first_of_0=True), True))
    assert [c["index"] for c in sent] == [0, 1, 1]
    assert [c["text"] for c in sent] == ["abC", "abA", "B"]
    assert sent[0]["logprobs"]["tokens"][:len(prompt)] == \
        sent[1]["logprobs"]["tokens"][:len(prompt)] == [env.codec.decode([t]) for t in prompt]
    assert sent[1]["logprobs"]["token_logprobs"] == [None, *[-0.5] * (len(prompt) - 1), -1.0]
    assert sent[2]["logprobs"]["text_offset"] == [3] and sent[2]["finish_reason"] == "length"
    assert [c["index"] for c in out.chunks(1, event(1, d), False)] == [1]  # none held now


def test_the_logprob_budget_names_the_figures_and_the_fix():
    with pytest.raises(ApiError) as e:
        check_logprob_budget(128, 5000, 16, 20)
    assert (e.value.status, e.value.param) == (400, "logprobs")
    assert e.value.message == (
        "n=128 choices x (5000 echoed prompt tokens + 16 max_tokens) x (20 logprobs + 1) = "
        "13,483,008 logprob entries, over the 4,194,304 this server returns for one request; "
        "ask for fewer choices, tokens or logprobs")
    with pytest.raises(ApiError) as e:  # a product past Python's int-to-str limit: still a 400
        check_logprob_budget(2, 0, int("9" * 4000), 1)
    assert "= more than 10^30 logprob entries" in e.value.message
    check_logprob_budget(128, 1022, 2, 20)  # the demo's largest request fits
    check_logprob_budget(128, 10**6, 10**6, None)  # no logprobs asked: nothing to bound


@pytest.mark.parametrize("path,body,param,sentence", [
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 20, "n": 128,
                         "max_tokens": 16}, "logprobs",
     "n=128 choices x (2 echoed prompt tokens + 16 max_tokens) x (20 logprobs + 1) = 48,384"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 5, "n": 8, "max_tokens": 100,
                         "stream": True}, "logprobs",
     "n=8 choices x 100 max_tokens x (5 logprobs + 1) = 4,800 logprob entries, over the 1,000"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 20, "n": 4,
                              "max_completion_tokens": 50}, "top_logprobs",
     "n=4 choices x 50 max_completion_tokens x (20 top_logprobs + 1) = 4,200"),
])
def test_requests_over_the_logprob_budget_are_refused_before_the_engine(
        env, monkeypatch, path, body, param, sentence):
    monkeypatch.setattr(logprobs, "MAX_LOGPROB_ENTRIES", 1000)  # the demo's context is short
    if path == "/v1/completions":
        body = {**body, "prompt": env.codec.encode(PROMPT)[:2]}
    submitted, real = [], env.engine.submit_many
    monkeypatch.setattr(env.engine, "submit_many", lambda *a: submitted.append(a) or real(*a))
    r = env.client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert sentence in err["message"] and err["param"] == param, err
    assert err["message"].endswith("ask for fewer choices, tokens or logprobs")
    assert submitted == []
    small = {**body, "n": 1, "max_tokens": 2, "max_completion_tokens": None}  # within budget
    assert env.client.post(path, json=small).status_code == 200 and len(submitted) == 1


def test_a_chat_without_max_tokens_gets_as_many_tokens_as_its_logprobs_allow(env, monkeypatch):
    """No max_tokens means the rest of the context; with logprobs, at most the tokens that keep
    n x tokens x (top_logprobs + 1) within the budget (not a 400 for a context longer than the
    budget covers, however short the answer would be)."""
    monkeypatch.setattr(logprobs, "MAX_LOGPROB_ENTRIES", 1000)  # the demo's context is short
    body = {"messages": CHAT, "logprobs": True, "top_logprobs": 4, "n": 2, "ignore_eos": True}
    r = env.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 2 * 100  # 1000 // (2 x 5) each
    assert all(c["finish_reason"] == "length" and len(c["logprobs"]["content"]) == 100
               for c in out["choices"])
    r = env.client.post("/v1/chat/completions", json={**body, "max_tokens": 101})
    assert r.status_code == 400 and "x 101 max_tokens x" in r.json()["error"]["message"], r.text
    for bad in ({"top_logprobs": -1}, {"n": 0}):  # refused by their own checks, not a 500
        r = env.client.post("/v1/chat/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] in bad, r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 1}),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "n": 2}),
])
def test_a_max_tokens_of_thousands_of_digits_is_a_400(env, path, body):
    """The logprob budget's product of such a number cannot be printed by Python (4300-digit
    limit): it once became a 500 that echoed the exception."""
    r = env.client.post(path, content=json.dumps(body)[:-1] + ', "max_tokens": ' + "9" * 4000
                        + "}", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert "internal error" not in r.text
    assert len(r.json()["error"]["message"]) < 300  # the number is not echoed whole


def test_a_sampling_parameter_of_thousands_of_digits_is_not_echoed_whole(env):
    r = env.client.post("/v1/completions", content='{"prompt": "x", "top_k": ' + "7" * 4000 + "}",
                        headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("top_k=7777777777777777... (4000 characters)")


DIGITS = "9" * 4000


@pytest.mark.parametrize("path,body,quoted", [
    ("/v1/completions", '{"prompt": "x", "max_tokens": %s}', "max_tokens=9999"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], '
                             '"max_completion_tokens": %s}', "max_completion_tokens=9999"),
    ("/v1/completions", '{"prompt": "x", "stop_token_ids": [%s]}', "token id 9999"),
    ("/v1/completions", '{"prompt": [%s]}', "token id 9999"),
    ("/v1/completions", '{"prompt": [[1], [%s]]}', "token id 9999"),
    ("/detokenize", '{"tokens": [%s]}', "token id 9999"),
    ("/v1/completions", '{"prompt": "x", "n": %s}', "n=9999"),
    ("/v1/completions", '{"prompt": "x", "best_of": %s}', "best_of=9999"),
])
def test_a_number_of_thousands_of_digits_is_quoted_cut_short(env, path, body, quoted):
    """Each refusal names the value, cut short: a 4000-digit number echoed whole made a 4 KB
    error message."""
    r = env.client.post(path, content=body % DIGITS, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    message = r.json()["error"]["message"]
    assert quoted in message and "(4000 characters)" in message and len(message) < 200, message[:300]


def test_a_streamed_echo_with_logprobs_is_encoded_off_the_event_loop(env, monkeypatch):
    """The first chunk of a streamed echo carries the prompt's logprobs (seconds of JSON at a
    long prompt and many choices): encoded in pieces in a worker thread, as whole answers are."""
    from tpserve.serve import streams
    monkeypatch.setattr(streams, "PIECE", 1)  # the demo's prompts are short: every list is "long"
    on_loop, real = [], streams.encode

    def spy(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args)
    monkeypatch.setattr(streams, "encode", spy)
    body = {"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 2, "ignore_eos": True,
            "temperature": 0}
    whole = env.client.post("/v1/completions", json=body).json()["choices"][0]
    on_loop.clear()
    chunks = sse(env.client, "/v1/completions", {**body, "stream": True})
    assert on_loop and not any(on_loop), on_loop
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_tokenizing_a_long_prompt_lets_other_threads_run(env):
    """Tokenizers' encode held the GIL for the whole call (a 4M-character prompt froze the event
    loop for seconds); the codec's encode releases it, with the same ids."""
    text = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    assert env.codec.encode(text[:5000]) == env.codec.tokenizer.encode(text[:5000]).ids
    ticks, worker = 0, threading.Thread(target=env.codec.encode, args=(text,))
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        ticks += 1
    assert ticks >= 20, f"the main thread ran {ticks} times while the prompt was encoded"


def test_whole_answers_with_logprobs_are_built_off_the_event_loop(env, monkeypatch):
    on_loop = []
    for module, name in ((logprobs, "completion_logprobs"), (app_module, "chat_logprobs")):
        def spy(*args, real=getattr(module, name)):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:  # a worker thread: no event loop runs here
                on_loop.append(False)
            return real(*args)
        monkeypatch.setattr(module, name, spy)
    r = env.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 2,
                                                 "echo": True, "logprobs": 2})
    assert r.status_code == 200 and len(r.json()["choices"][1]["logprobs"]["tokens"]) > 2
    r = env.client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                      "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"]) == 2
    assert on_loop and not any(on_loop), on_loop


# ---- slow and many connections -------------------------------------------------------------
@contextlib.contextmanager
def served(config: uvicorn.Config, sndbuf: int | None = None):
    """uvicorn with `config` in a thread, on a port the OS picked -> (host, port). `sndbuf`: the
    kernel send buffer of its connections (they inherit the listening socket's)."""
    sock = socket.socket()
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server, sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def read_until(conn: socket.socket, end: bytes) -> bytes:
    """What the server sends up to and including `end`, and whatever came with it in the same
    segment (a body may arrive with its headers)."""
    conn.settimeout(10)
    out = b""
    while end not in out:
        chunk = conn.recv(65536)
        assert chunk, f"the server closed the connection after {out[-300:]!r}"
        out += chunk
    return out


def read_until_closed(conn: socket.socket, within: float) -> bytes:
    """What the server sends until it closes the connection; fails after `within` seconds."""
    conn.settimeout(within)
    out = b""
    try:
        while chunk := conn.recv(65536):
            out += chunk
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {within} s; it sent {out[:300]!r}")
    return out


REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s")


@pytest.mark.parametrize("head,sent", [
    (b"Content-Length: 100\r\n\r\n", b'{"prompt":'),
    (b"Transfer-Encoding: chunked\r\n\r\n", b'a\r\n{"prompt":\r\n'),
])
def test_a_body_that_stalls_is_refused_with_408(env, head, sent):
    server = Server(build_app(env.engine, env.codec, MODEL, body_timeout=0.5))
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n" + head + sent)
            t0 = time.monotonic()
            reply = read_until_closed(conn, 5)
        assert 0.4 < time.monotonic() - t0 < 3
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower()
        err = json.loads(body)["error"]
        assert err["message"].startswith("the request body did not arrive within 0.5 s")
        assert err["type"] == "invalid_request_error"
        metrics = httpx.get(f"{server.url}/metrics").text  # this app's own
        assert metric(metrics, "tpserve_http_errors_total", code="408") == 1
    finally:
        server.close()


def test_headers_that_do_not_arrive_in_time_close_the_connection(env):
    T = 0.25  # the header deadline here; 120 streamed tokens take longer
    app = build_app(env.engine, env.codec, MODEL)
    with served(server_config(app, log_level="warning", header_timeout=T)) as (_, addr):
        for sent in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(addr) as conn:
                conn.sendall(sent)
                t0 = time.monotonic()
                assert read_until_closed(conn, 5) == b""
                assert 0.8 * T < time.monotonic() - t0 < T + 2.5
        # A keep-alive connection: a whole request is answered, however long it runs; then the
        # next request's headers have the same deadline.
        body = json.dumps({"prompt": PROMPT, "max_tokens": 120, "ignore_eos": True,
                           "stream": True}).encode()
        with socket.create_connection(addr) as conn:
            conn.sendall(REQUEST % (len(body), body))
            t0 = time.monotonic()
            reply = read_until(conn, b"\r\n0\r\n\r\n")  # the end of a chunked body
            assert time.monotonic() - t0 > T, "the stream must outlast the header deadline"
            assert reply.startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" in reply
            time.sleep(0.5 * T)  # under the deadline and the keep-alive timeout: still served
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until(conn, b'"ok"}').startswith(b"HTTP/1.1 200 ")
            conn.sendall(b"GET /health HTTP/1.1\r\n")
            t0 = time.monotonic()
            assert read_until_closed(conn, 5) == b""
            assert 0.8 * T < time.monotonic() - t0 < T + 2.5


def test_connections_beyond_max_connections_get_503(env):
    app = build_app(env.engine, env.codec, MODEL)
    with served(server_config(app, log_level="warning", max_connections=2)) as (server, addr):
        url = f"http://{addr[0]}:{addr[1]}/health"
        with socket.create_connection(addr) as idle:
            assert httpx.get(url).status_code == 200  # 2 connections: the idle one and this
            with socket.create_connection(addr):
                deadline = time.monotonic() + 5
                while len(server.server_state.connections) < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                assert httpx.get(url).status_code == 503
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")


BIG = 32 << 20  # more than the loopback's send and receive buffers hold together
WHOLE = 16 << 20


async def big_response_app(scope, receive, send):
    """An ASGI app answering /big with BIG bytes in 1 MiB chunks, anything else with 'ok'."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/whole":  # one body written at once, as a whole JSON answer is
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(WHOLE).encode())]})
        await send({"type": "http.response.body", "body": bytes(WHOLE)})
        return
    big = scope["path"] == "/big"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(BIG if big else 2).encode())]})
    for i in range(BIG >> 20 if big else 1):
        await send({"type": "http.response.body", "body": bytes(1 << 20) if big else b"ok",
                    "more_body": big and i < (BIG >> 20) - 1})


def small_window_connection(addr) -> socket.socket:
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    conn.connect(addr)
    return conn


def test_a_client_that_stops_reading_is_cut_off_and_a_slow_reader_is_not():
    T = 0.5  # the write-stall deadline here
    config = server_config(big_response_app, log_level="warning", max_connections=1,
                           write_timeout=T, min_drain=16 << 10)  # 32 KB/s at least
    with served(config) as (server, addr):
        url = f"http://{addr[0]}:{addr[1]}/health"
        # A client that reads a little now and then (~20 KB/s) to keep its connection is cut off.
        with small_window_connection(addr) as drip:
            start = time.monotonic()
            drip.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            drip.settimeout(5)
            time.sleep(0.2)
            t0 = time.monotonic()
            while server.server_state.connections:  # (the kernel's queue still reaches it after)
                assert drip.recv(2048), "closed"
                assert time.monotonic() - t0 < 6 * T + 2, "the dripping reader was kept"
                time.sleep(0.1)
            assert time.monotonic() - start > T  # a whole period of too little drained
            assert httpx.get(url).status_code == 200  # its slot is free again
        with small_window_connection(addr) as stalled:
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            time.sleep(0.2)
            assert httpx.get(url).status_code == 503  # the stalled response holds the one slot
            t0 = time.monotonic()
            while server.server_state.connections:
                assert time.monotonic() - t0 < 3 * T + 2, "the stalled connection was kept"
                time.sleep(0.02)
            assert time.monotonic() - t0 > 0.5 * T
            assert httpx.get(url).status_code == 200  # its slot is free again
            # Aborted: what the kernel held still arrives, then the end, short of the body.
            assert len(read_until_closed(stalled, 5)) < BIG
        # A client that reads slowly but steadily, for longer than the deadline, gets it all.
        with small_window_connection(addr) as slow:
            slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.settimeout(5)
            got, head, t0 = 0, b"", time.monotonic()
            while got < BIG:
                chunk = slow.recv(1 << 20)
                assert chunk, f"the server closed a reading client's connection after {got} bytes"
                if head is not None:  # the headers may take more than one recv
                    head += chunk
                    if b"\r\n\r\n" not in head:
                        continue
                    chunk, head = head[head.index(b"\r\n\r\n") + 4:], None
                got += len(chunk)
                if time.monotonic() - t0 < 2 * T:
                    time.sleep(0.05)  # slower than the socket drains, for two deadlines
            assert got == BIG and time.monotonic() - t0 > 2 * T


def test_a_stream_read_slower_than_it_is_made_is_cut_and_its_choices_cancelled(env, monkeypatch):
    """A client that keeps its socket full but its connection alive: the request's waiting
    events stop at BACKLOG_MAX_BYTES, its choices are cancelled long before max_tokens, and what
    the client reads at last ends with an error chunk and [DONE]; a reading client of the same
    request is not cut."""
    monkeypatch.setattr(streams, "BACKLOG_MAX_BYTES", 64 << 10)
    body = {"model": MODEL, "prompt": PROMPT, "n": 2, "max_tokens": 1000, "ignore_eos": True,
            "stream": True, "logprobs": 5}
    payload = json.dumps(body).encode()
    cancelled = env.engine.stats.requests_cancelled
    # small kernel buffers on both ends (loopback's would hold this whole generation)
    config = uvicorn.Config(build_app(env.engine, env.codec, MODEL), log_level="warning")
    with served(config, sndbuf=4096) as (_, addr), small_window_connection(addr) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        deadline = time.monotonic() + 60
        while env.engine.stats.requests_cancelled < cancelled + 2:
            assert time.monotonic() < deadline, "the slow reader's choices kept running"
            time.sleep(0.02)
        text = read_until(conn, b"data: [DONE]\n\n\r\n0\r\n\r\n").decode()  # the last chunk
        metrics = httpx.get(f"http://{addr[0]}:{addr[1]}/metrics").text
        assert metric(metrics, "tpserve_streams_cut_total") == 1
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]
    assert "the stream was cut" in events[-1]["error"]["message"], events[-1]
    tokens = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-1])
    assert 0 < tokens < 2 * 1000, tokens
    assert not env.engine.running
    # read as it comes, the same request runs to the end
    events = sse(env.client, "/v1/completions", {**body, "max_tokens": 300})
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events) == 2 * 300
    # a whole answer is gathered as it comes: never cut, whatever the limit
    monkeypatch.setattr(streams, "BACKLOG_MAX_BYTES", 1)
    r = env.client.post("/v1/completions", json={**body, "max_tokens": 300, "stream": False})
    assert r.status_code == 200, r.text
    assert [len(c["logprobs"]["tokens"]) for c in r.json()["choices"]] == [300, 300]


def test_a_large_whole_response_must_drain_in_proportion():
    """A whole 16 MiB body written at once (as a big logprobs answer is): a client draining ~200
    KB/s, well above min_drain, is cut because it would hold the body far longer than max_hold;
    one that reads as it comes gets it all."""
    T = 0.5
    config = server_config(big_response_app, log_level="warning", max_connections=2,
                           write_timeout=T, min_drain=1 << 10, max_hold=4.0)  # 12% a period
    with served(config, sndbuf=1 << 16) as (server, addr):
        with small_window_connection(addr) as drip:
            drip.sendall(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n")
            drip.settimeout(5)
            got, t0 = 0, time.monotonic()
            while chunk := drip.recv(20 << 10):
                got += len(chunk)
                assert time.monotonic() - t0 < 20, "the slow reader of a large body was kept"
                time.sleep(0.1)
            assert got < WHOLE // 2  # cut long before the end
        with small_window_connection(addr) as fast:
            fast.sendall(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n")
            fast.settimeout(5)
            body = read_until(fast, b"\r\n\r\n")
            got = len(body) - body.index(b"\r\n\r\n") - 4
            while got < WHOLE:
                chunk = fast.recv(1 << 20)
                assert chunk, f"a reading client was cut after {got} bytes"
                got += len(chunk)


def test_bytes_pipelined_behind_a_running_request_are_not_read_without_bound(env):
    """A non-streamed request, then a next request's header that never ends: while the first
    runs, the server must stop reading the connection (the kernel's buffers fill and the client's
    sends block) instead of taking in more of it every so often into the parser's buffer, which
    grew ~0.5 MB/s a connection. (A client that pipelines is heard again once its response is
    written: the request is cancelled here through the engine, to end the test.)"""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 900, "n": 2, "ignore_eos": True}).encode()
    with socket.create_connection(env.url.removeprefix("http://").split(":")) as conn:
        conn.sendall(REQUEST % (len(body), body) + b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        conn.setblocking(False)
        pad, accepted = b"a" * 65536, []
        t0 = time.monotonic()
        while (t := time.monotonic() - t0) < 4.0:
            try:
                accepted.append((t, conn.send(pad)))
            except BlockingIOError:
                time.sleep(0.02)
        assert env.engine.running, "the request must still run while the bytes arrive"
        late = sum(n for t, n in accepted if t > 2.0)  # the kernel's buffers are full by now
        assert late < 128 << 10, f"the server took in {late} more bytes behind the request"
        for r in list(env.engine.running) + list(env.engine.waiting):
            env.engine.cancel(r.id)
        wait_idle(env.engine)


def test_a_client_gone_before_its_whole_answer_cancels_it(env):
    """A non-streamed request whose client closes the connection mid-way: the server hears the
    close while the request runs and cancels its choices (their KV slots free at once)."""
    cancelled = env.engine.stats.requests_cancelled
    body = json.dumps({"prompt": PROMPT, "max_tokens": 900, "n": 2, "ignore_eos": True}).encode()
    with socket.create_connection(env.url.removeprefix("http://").split(":")) as conn:
        conn.sendall(REQUEST % (len(body), body))
        deadline = time.monotonic() + 30
        while not env.engine.running:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    t0 = time.monotonic()
    wait_idle(env.engine)
    assert env.engine.stats.requests_cancelled == cancelled + 2
    assert time.monotonic() - t0 < 10, "the closed connection was heard only at the end"


def wait_idle(engine, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the engine still runs the abandoned requests"
        time.sleep(0.05)
    assert sorted(engine.free_slots) == list(range(engine.num_slots))


# ---- choices that do not fit the queue -----------------------------------------------------
def test_choices_are_queued_all_or_none(env):
    engine = Engine(env.llm, max_queue=3)  # never started: it runs no step, queued stays queued
    engine.submit([1, 2], SamplingParams(max_tokens=2), lambda ev: None)
    with pytest.raises(QueueFull, match=r"full for 3 choices \(1 of 3 waiting\)"):
        engine.submit_many([1, 2], [SamplingParams(max_tokens=2)] * 3, [lambda ev: None] * 3)
    assert len(engine.waiting) == 1 and engine.stats.requests_cancelled == 0
    ids = engine.submit_many([1, 2], [SamplingParams(max_tokens=2)] * 2, [lambda ev: None] * 2)
    assert len(ids) == 2 and len(engine.waiting) == 3


def test_n_choices_share_their_parameters_checks_and_stop_automata(env):
    """An n = 128 request with 1024 stop ids, 300 biases and 16 long stop strings cost ~0.14 s of
    the event loop per request, even when refused for a full queue: each choice revalidated its
    parameters and built its own stop automata. Choices now share what does not differ."""
    stops = tuple(f"{c}{'ab' * 200}" for c in "abcdefghijklmnop")
    vocab = env.llm.cfg.vocab_size  # the demo's: 1024 stop ids repeat its ids
    params = SamplingParams(max_tokens=2, temperature=1.0, seed=2**63 - 2, stop=stops,
                            stop_token_ids=tuple(t % vocab for t in range(1024)), prompt_logprobs=2,
                            logit_bias=tuple((t, 0.5) for t in range(min(300, vocab))))
    choices = [params] + [params.for_choice(i) for i in range(1, 4)]
    for i, c in enumerate(choices[1:], 1):  # as dataclasses.replace makes them, but sharing
        assert c == dataclasses.replace(params, seed=(params.seed + i) % 2**63,
                                        prompt_logprobs=None)
        assert c.stop_token_ids is params.stop_token_ids and c.logit_bias is params.logit_bias
    engine = Engine(env.llm, tokenizer=env.codec, max_queue=8)  # never started
    engine.submit_many([1, 2], choices, [lambda ev: None] * 4)
    first, *others = engine.waiting
    shared = first.stop_text.automata
    assert all(a is b for r in others for a, b in zip(r.stop_text.automata, shared))
    assert len(first.stop_text.automata) == 16
    assert all(r.stop_text is not first.stop_text for r in others)  # each its own state
    # a choice that differs in more than its seed is still checked on its own
    with pytest.raises(RequestError, match="max_tokens=5000 exceeds"):
        engine.check([1, 2], [params, dataclasses.replace(params, max_tokens=5000)])
    with pytest.raises(QueueFull, match="full for 5 choices"):  # before any is built
        engine.check_room(5)


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted({"model_name": MODEL, **labels}.items()))
    return float(re.search(rf"^{name}{{{want}}} (\S+)$", text, re.M).group(1))


def test_a_429_for_choices_that_do_not_fit_counts_no_cancellation(env):
    """One KV slot held by a long request, one request waiting, a queue of 2: a request of n=2
    gets 429, and nothing of it shows as a cancellation or an abort in /metrics."""
    llm = tpserve.load(demo_path(), tp=1, dtype=torch.float32, num_slots=1)
    engine = Engine(llm, tokenizer=env.codec, max_queue=2).start()
    server = Server(build_app(engine, env.codec, MODEL))
    body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c, \
                c.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a closed iterator closes the connection
            assert next(line for line in lines if line.startswith("data: "))
            with c.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200 and engine.queue_depth == 1
                before = c.get("/metrics").text
                r = c.post("/v1/completions", json={**body, "stream": False, "n": 2})
                assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                # what can never run is a 400 in a full queue too: a retry would not help
                r = c.post("/v1/completions", json={**body, "stream": False,
                                                    "max_tokens": 10 ** 6})
                assert r.status_code == 400 and "exceeds the context" in r.text, r.text
                steps = engine.stats.steps  # the engine drops cancelled requests between steps
                deadline = time.monotonic() + 30
                while engine.stats.steps < steps + 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                after = c.get("/metrics").text
                for name, labels in (("tpserve_requests_cancelled_total", {}),
                                     ("tpserve_request_success_total", {"finished_reason":
                                                                        "abort"}),
                                     ("tpserve_queue_depth", {})):
                    assert metric(after, name, **labels) == metric(before, name, **labels), name
                assert engine.queue_depth == 1 and len(engine.running) == 1
    finally:
        server.close()
        engine.stop()
        llm.close()


def _launch_without_serving(monkeypatch) -> tuple[list[str], dict]:
    """`tpserve launch` argv on a free port, and what it hands the server (`app` and the keyword
    arguments) in place of serving."""
    from tpserve.serve import server
    got = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port, **kw: got.update(kw, app=app))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return ["launch", "--backend", "local", "--tp", "1", "--port", port], got


def test_launch_passes_max_connections_to_the_server(env, monkeypatch, caplog):
    from tpserve.cli import main
    argv, got = _launch_without_serving(monkeypatch)
    assert main([*argv, "--max-connections", "0"]) == 2
    assert "--max-connections 0 must be at least 1" in caplog.text and not got
    assert main([*argv, "--max-connections", "3"]) == 0 and got["max_connections"] == 3


def test_the_body_limit_follows_the_context():
    """JSON is parsed on the event loop, so the body limit is what the longest prompt the
    context holds could take, not a fixed 16 MiB: the longest prompt fits, written as token ids
    (the largest ids, indented) or as escaped CJK text (at least one character per token)."""
    from tpserve.serve.middleware import body_limit
    assert body_limit(1024) == 1 << 20 and body_limit(131072) == 4 << 20
    for n in (1024, 8192, 131072):
        ids = json.dumps({"model": "m", "prompt": [128255] * n, "max_tokens": 1}, indent=4)
        text = json.dumps({"model": "m", "prompt": "\u4e2d" * (2 * n)}, ensure_ascii=True)
        assert max(len(ids), len(text)) <= body_limit(n), n


def test_launch_takes_a_body_limit(env, monkeypatch, caplog):
    from starlette.testclient import TestClient
    from tpserve.cli import main
    argv, got = _launch_without_serving(monkeypatch)
    assert main([*argv, "--max-body-mb", "0"]) == 2
    assert "--max-body-mb 0 must be in [1, 1024]" in caplog.text and not got
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1, "pad": "x" * (3 << 19)})  # 1.5 MiB
    for flags, refused in (([], True), (["--max-body-mb", "2"], False)):
        assert main([*argv, *flags]) == 0
        with TestClient(got.pop("app")) as client:  # its engine has stopped: 503 past the limit
            r = client.post("/v1/completions", content=body,
                            headers={"content-type": "application/json"})
        assert r.status_code == (413 if refused else 503), (flags, r.text)

