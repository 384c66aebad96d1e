"""The OpenAI-compatible HTTP API, end to end over real HTTP: uvicorn on a free port in a thread,
the demo checkpoint at tp=2 with in-process ranks (the Ray path is tested elsewhere).

    python -m pytest tests/test_server.py -q
"""

import asyncio
import logging
import re
import time

import httpx
import pytest
from serving import MODEL, Server, served_demo, sse

from tpserve.runtime.coordinator import RankFailure
from tpserve.serve.engine import Engine
from tpserve.serve.app import build_app

PROMPT = "The quick brown fox"
IDS = [72, 101, 108, 108, 111, 44, 32, 119]  # "Hello, w" as byte tokens
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
N = 10  # max_tokens of the requests checked against llm.generate


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    def references(llm, codec):
        return {"prompt": llm.generate(codec.encode(PROMPT), max_tokens=N),
                "ids": llm.generate(IDS, max_tokens=N),
                "chat": llm.generate(codec.encode_chat(CHAT), max_tokens=N)}
    yield from served_demo(tmp_path_factory, references)


def finish_reason(env, tokens):
    return "stop" if tokens[-1] in env.llm.cfg.eos_token_ids else "length"


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- completions ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["prompt", "ids"])
def test_greedy_completion_equals_llm_generate(env, kind):
    prompt = PROMPT if kind == "prompt" else IDS
    out = complete(env.client, prompt=prompt, max_tokens=N, temperature=0)
    tokens = env.ref[kind]
    assert out["object"] == "text_completion" and out["model"] == MODEL
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    assert out["choices"] == [{"index": 0, "text": env.codec.decode(tokens), "logprobs": None,
                               "finish_reason": finish_reason(env, tokens)}]
    n_prompt = len(env.codec.encode(prompt) if kind == "prompt" else prompt)
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                            "total_tokens": n_prompt + len(tokens)}


def test_streamed_completion_equals_non_streamed(env):
    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0}
    whole = complete(env.client, **body)
    chunks = sse(env.client, "/v1/completions",
                 {**body, "stream": True, "stream_options": {"include_usage": True}})
    *text_chunks, last = chunks
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert last["choices"] == [] and last["usage"] == whole["usage"]


def test_stop_string_cuts_the_text(env):
    full = env.codec.decode(env.ref["prompt"])
    # A printable ASCII character whose first occurrence is not at the start: byte-level decoding
    # of a prefix ending in it matches the full decoding up to it.
    stop = next((c for c in full if c.isascii() and c.isprintable() and full.index(c) > 0), None)
    assert stop is not None, f"the reference {full!r} has no usable stop character"
    for s in (stop, [stop, "never-appears"]):
        out = complete(env.client, prompt=PROMPT, max_tokens=N, temperature=0, stop=s)
        assert out["choices"][0]["text"] == full[:full.index(stop)]
        assert out["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(env):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0.9, "top_k": 50, "top_p": 0.9,
            "seed": 7}
    assert complete(env.client, **body)["choices"] == complete(env.client, **body)["choices"]


# ---- chat ----------------------------------------------------------------------------------
def test_chat_equals_llm_generate(env):
    r = env.client.post("/v1/chat/completions",
                        json={"model": MODEL, "messages": CHAT, "max_tokens": N, "temperature": 0})
    assert r.status_code == 200, r.text
    out, tokens = r.json(), env.ref["chat"]
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant",
                                                       "content": env.codec.decode(tokens)},
                               "logprobs": None, "finish_reason": finish_reason(env, tokens)}]
    assert out["usage"]["prompt_tokens"] == len(env.codec.encode_chat(CHAT))
    assert out["usage"]["completion_tokens"] == len(tokens)


def test_chat_stream(env):
    chunks = sse(env.client, "/v1/chat/completions",
                 {"messages": CHAT, "max_tokens": N, "temperature": 0, "stream": True})
    tokens = env.ref["chat"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == finish_reason(env, tokens)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == env.codec.decode(tokens)


# ---- other endpoints -----------------------------------------------------------------------
def test_models_and_health(env):
    models = env.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
    r = env.client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def metric(text, name):
    """A series' value; every tpserve series carries a model_name label."""
    return float(re.search(rf'^{name}{{model_name="{MODEL}"}} (\S+)$', text, re.M).group(1))


def test_metrics(env):
    names = ["tpserve_generation_tokens_total", "tpserve_prompt_tokens_total",
             "tpserve_requests_finished_total", "tpserve_requests_failed_total",
             "tpserve_queue_depth", "tpserve_running_requests", "tpserve_step_seconds_last",
             "tpserve_step_seconds_mean", "tpserve_generation_tokens_per_second",
             "tpserve_allreduce_seconds_total", "tpserve_allreduce_total",
             "tpserve_coordinator_weight_bytes", "tpserve_time_to_first_token_seconds_count"]
    before = env.client.get("/metrics").text
    out = complete(env.client, prompt=PROMPT, max_tokens=3, temperature=0)
    r = env.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in names:
        metric(r.text, name)  # present, with a value
    grew = (metric(r.text, "tpserve_generation_tokens_total")
            - metric(before, "tpserve_generation_tokens_total"))
    assert grew >= out["usage"]["completion_tokens"] > 0
    assert metric(r.text, "tpserve_requests_finished_total") >= 1
    assert metric(r.text, "tpserve_step_seconds_mean") > 0
    head = env.llm.head  # the demo's lm_head is its own tensor, not tied to the embedding
    assert metric(r.text, "tpserve_coordinator_weight_bytes") == (
        head.embed_table.nbytes + head.lm_head.nbytes)


# ---- errors (bad requests: tests/test_openai_api.py) ------------------------------------
def test_api_key(env):
    server = Server(build_app(env.engine, env.codec, MODEL, api_key="sekret"))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                            {"Authorization": "Basic sekret"}, {"Authorization": "Bearersekret"},
                            {"Authorization": "Bearer sekret2"}):
                r = c.get("/v1/models", headers=headers)
                assert r.status_code == 401, r.text
                assert "API key" in r.json()["error"]["message"]
            # The key is checked before the body is even parsed.
            r = c.post("/v1/completions", content=b"{", headers={"content-type": "text/plain"})
            assert r.status_code == 401
            ok = {"Authorization": "Bearer sekret"}
            for scheme in ("bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
                r = c.get("/v1/models", headers={"Authorization": f"{scheme} sekret"})
                assert r.status_code == 200, scheme
            assert c.get("/v1/models", headers=ok).status_code == 200
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=ok)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            assert c.get("/health").status_code == 200
            assert c.get("/metrics").status_code == 200
            for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
                assert c.post(path, json=body).status_code == 401, path  # tokenizer work
                assert c.post(path, json=body, headers=ok).status_code == 200, path
    finally:
        server.close()


@pytest.mark.parametrize("key", [" sekret", "sekret ", "sekret\t"])
def test_an_api_key_no_header_could_carry_is_refused_at_start(env, key):
    """A header's value loses its outer white space, so such a key would lock every client out."""
    from tpserve.errors import TpserveError
    with pytest.raises(TpserveError, match="API key .* starts or ends with white space"):
        build_app(env.engine, env.codec, MODEL, api_key=key)


def test_more_choices_than_the_queue_holds_is_400_not_429(env):
    """n choices wait as n requests: with n above --max-queue a retry could never succeed."""
    engine = Engine(env.llm, tokenizer=env.codec, max_queue=2).start()
    server = Server(build_app(engine, env.codec, MODEL))
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "n": 3}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "n=3 exceeds the server's queue of 2" in r.json()["error"]["message"]
    finally:
        server.close()
        engine.stop()


def test_queue_full_is_429(env):
    engine = Engine(env.llm, tokenizer=env.codec, max_queue=0).start()  # admits nothing
    server = Server(build_app(engine, env.codec, MODEL))
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=60)
        assert r.status_code == 429
        assert "queue is full" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        server.close()
        engine.stop()


def test_engine_not_running_is_503(env):
    server = Server(build_app(Engine(env.llm, tokenizer=env.codec), env.codec, MODEL))
    try:
        assert httpx.get(f"{server.url}/health").status_code == 503
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=60)
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    finally:
        server.close()


def test_engine_error_is_503_or_error_chunk(env, monkeypatch, caplog):
    """A failed step fails its requests with a 503 (or a streamed error chunk) and the engine
    serves on. A tpserve error's own sentence (a lost rank) reaches the client; any other
    exception's text (paths, device messages) does not: the client gets a reference that the
    server's log repeats beside the exception."""
    executor, calls = env.llm.executor, []
    real_step = executor.step
    failure = [RankFailure("rank 1 (node n1) stopped answering; the engine rebuilds the group")]

    def step(h, plan):  # two good steps, then every step fails
        calls.append(1)
        if len(calls) > 2:
            raise failure[0]
        return real_step(h, plan)
    monkeypatch.setattr(executor, "step", step)
    chunks = sse(env.client, "/v1/completions",
                 {"prompt": PROMPT, "max_tokens": 8, "stream": True, "ignore_eos": True})
    assert "rank 1 (node n1) stopped answering" in chunks[-1]["error"]["message"]
    assert all("error" not in c for c in chunks[:-1])
    r = env.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 503, r.text
    assert "rank 1 (node n1) stopped answering" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    failure[0] = RuntimeError("CUDA error at /home/op/secret/kernels.py:12")
    with caplog.at_level(logging.ERROR, logger="tpserve.serve.engine"):
        r = env.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    message = r.json()["error"]["message"]
    assert r.status_code == 503 and "secret" not in message and "CUDA" not in message, message
    ref = re.search(r"reference ([0-9a-f]{12})", message).group(1)
    assert any(ref in rec.getMessage() and "/home/op/secret" in rec.getMessage()
               for rec in caplog.records)
    monkeypatch.undo()
    assert env.client.get("/health").status_code == 200  # the engine survives a failed step
    assert complete(env.client, prompt=IDS, max_tokens=N, temperature=0)["choices"][0]["text"] \
        == env.codec.decode(env.ref["ids"])


# ---- concurrency and disconnects -----------------------------------------------------------
def test_concurrent_requests_match_sequential(env):
    jobs = [("a", 3), ("Hello there, friend. " * 4, 9), (IDS, 6), ("xyz" * 10, 12),
            ([1, 2, 3], 5)]
    bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
              for p, n in jobs]
    sequential = [complete(env.client, **b)["choices"][0] for b in bodies]
    assert [c["finish_reason"] for c in sequential] == ["length"] * len(jobs)

    async def together():
        async with httpx.AsyncClient(base_url=env.url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0] for r in rs]
    # Batched prefill/decode runs different matmul shapes; fp32 greedy still picks the same tokens.
    assert asyncio.run(together()) == sequential


def test_client_disconnect_mid_stream(env):
    cancelled = env.engine.stats.requests_cancelled
    body = {"prompt": PROMPT, "max_tokens": 30, "stream": True, "ignore_eos": True}
    with env.client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The response is closed with tokens left to come: the engine cancels the request.
    out = complete(env.client, prompt=IDS, max_tokens=N, temperature=0)
    assert out["choices"][0]["text"] == env.codec.decode(env.ref["ids"])
    deadline = time.monotonic() + 30
    while env.engine.running or env.engine.stats.requests_cancelled < cancelled + 1:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.05)
    assert sorted(env.engine.free_slots) == list(range(env.engine.executor.num_slots))
    assert env.client.get("/health").status_code == 200
