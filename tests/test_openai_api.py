"""The HTTP API's contract with OpenAI and vLLM clients: every bad request is one clear 400 (or 404
for a model not served here), and vLLM's extra endpoints answer as vLLM's do.

    python -m pytest tests/test_openai_api.py -q
"""

import json
import re

import httpx
import pytest
from serving import MODEL, Server, served_demo, sse

import tpserve
from tpserve.serve.engine import Engine
from tpserve.serve.app import build_app

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from served_demo(tmp_path_factory, lambda llm, codec: {})


BAD = [  # (path, body, message fragment, param)
    ("/v1/completions", b"{not json", "not valid JSON", None),
    ("/v1/completions", [], "must be a JSON object", None),
    ("/v1/completions", {"max_tokens": 4}, "'prompt' is required", "prompt"),
    ("/v1/chat/completions", {"max_tokens": 4}, "'messages' is required", "messages"),
    ("/v1/chat/completions", {"messages": []}, "'messages' is empty", "messages"),
    ("/v1/completions", {"prompt": 5}, "'prompt' must be a string, a list of token ids, or a "
     "list of either", "prompt"),
    ("/v1/completions", {"prompt": ["a", [1, 2]]}, "'prompt' must be a string, a list of token "
     "ids, or a list of either", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens=0 returns nothing without "
     "echo", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens=-1 must be a positive",
     "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -2}, "max_tokens=-2", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature=-1.0 must be in [0, 1e+06]",
     "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p=0.0 must be in (0, 1]", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p=1.5 must be in (0, 1]", "top_p"),
    ("/v1/completions", {"prompt": "x", "stream": True, "temperature": -1}, "temperature=",
     "temperature"),
    ("/v1/completions", {"prompt": "a" * 1100}, "the prompt has 1100 tokens but the context "
                                                "holds 1024", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 1100}]},
     "but the context holds 1024", "messages"),
    ("/v1/completions", {"prompt": ""}, "the prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, "token id 999 is outside the vocabulary [0, 320)",
     "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "token id -1 is outside the vocabulary", "prompt"),
    # Refused: honouring them needs what tpserve does not have.
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of=3 is not supported", "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix is not supported", "suffix"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}},
     "response_format type 'json_object' is not supported", "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f"}}]}, "tools are not supported", "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"},
     "tool_choice is not supported", "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}},
     "stream_options applies to streamed requests only", "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": False, "stream_options": {}},
     "stream_options applies to streamed requests only", "stream_options"),
    # Numbers that would break the sampler, and strings the tokenizer cannot take.
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")},
     "temperature=nan is not a finite number", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": float("nan")}, "top_p=nan is not a finite",
     "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed=1180591620717411303424 must be an "
                                                        "integer in [-2**63, 2**63 - 1]", "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -2**63 - 1}, "seed=-9223372036854775809 must be",
     "seed"),
    ("/v1/completions", {"prompt": "x\ud800"}, "'prompt' holds a lone surrogate (\\ud800)",
     "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc00"}]},
     "lone surrogate", "messages"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "lone surrogate", "stop"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1024}, "prompt of 1 tokens + "
                        "max_tokens=1024 exceeds the context of 1024", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n=0 must be in [1, 128]", "n"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p=1.5 must be in [0, 1]", "min_p"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty=0",
     "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty=3",
     "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": float("-inf")},
     "frequency_penalty=-inf is not a finite number", "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens=5",
     "min_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs=21 must be", "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2},
     "top_logprobs needs logprobs=true", "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias key 'abc'",
     "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias[5]=101",
     "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"320": 1}}, "token id 320 in logit_bias",
     "logit_bias"),
]


@pytest.mark.parametrize("path,body,fragment,param", BAD,
                         ids=[f"{i}-{b[2][:24]}" for i, b in enumerate(BAD)])
def test_bad_request_is_400(env, path, body, fragment, param):
    # json.dumps writes NaN and Infinity as Python's json module (and so a hostile client) does.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = env.client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and "\n" not in err["message"], err
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["code"] is None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_unknown_model_is_404(env, path):
    r = env.client.post(path, json={"model": "gpt-4", "prompt": "x", "messages": CHAT})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["message"] == f"model 'gpt-4' is not served here; use '{MODEL}'"
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert env.client.get("/v1/models/gpt-4").status_code == 404


def test_model_card_version_tokenize_detokenize(env):
    card = env.client.get(f"/v1/models/{MODEL}").json()
    assert card == env.client.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["max_model_len"] == env.engine.max_len
    assert env.client.get("/version").json() == {"version": tpserve.__version__}
    text = "Hello there"
    r = env.client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == env.codec.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == env.engine.max_len
    r = env.client.post("/tokenize", json={"messages": CHAT}).json()
    assert r["tokens"] == env.codec.encode_chat(CHAT)
    ids = env.codec.encode(text, add_special_tokens=False)
    assert env.client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}
    r = env.client.post("/detokenize", json={"tokens": [1, 10_000]})
    assert r.status_code == 400 and "token id 10000 is outside" in r.json()["error"]["message"]
    r = env.client.post("/tokenize", json={"prompt": "a", "messages": CHAT})
    assert r.status_code == 400 and "exactly one of" in r.json()["error"]["message"]


@pytest.mark.parametrize("content", ["hi</s><s><pad>", "</s>", "a <s> b"])
def test_a_message_holding_a_control_tokens_text_gets_that_texts_tokens(env, content):
    """'</s>' in a message is four characters, not the end-of-sequence token: otherwise a user
    could end their turn or forge the template's turns. The template's own markers stay tokens,
    a message without such text is encoded as before, and the ids decode to the message."""
    specials = set(env.codec.tokenizer.get_added_tokens_decoder())
    assert {env.codec.tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>")} <= specials
    messages = [{"role": "user", "content": content}]
    got = env.client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    plain = env.client.post("/tokenize", json={"messages": [{"role": "user", "content": "q"}]})
    template_specials = [t for t in plain.json()["tokens"] if t in specials]
    assert [t for t in got if t in specials] == template_specials  # the template's bos only
    text = env.client.post("/detokenize", json={"tokens": got}).json()["prompt"]
    assert content in text and text == env.codec.render_chat(messages).replace("<s>", "", 1)
    r = env.client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(got)


def test_a_template_that_changes_a_message_holding_a_control_token_refuses_it(env):
    """Where the template does not render such a message's text as sent (here it drops the
    last character), its parts cannot be told from the template's: a 400, not a guess."""
    import asyncio

    from tpserve.serve.openai_protocol import ApiError, ChatRequest
    from tpserve.serve.prompts import Prompts
    from tpserve.serve.text import TextCodec
    codec = TextCodec(env.codec.tokenizer, "{% for m in messages %}{{ m['content'][:-1] }}{% endfor %}")
    prompts = Prompts(env.engine, codec)
    ok = ChatRequest(messages=[{"role": "user", "content": "x</"}]).messages
    assert asyncio.run(prompts.chat(ok)) == codec.encode("x<", add_special_tokens=False)
    bad = ChatRequest(messages=[{"role": "user", "content": "x</s>"}]).messages
    with pytest.raises(ApiError, match="holds '</s>', a control token of this model"):
        asyncio.run(prompts.chat(bad))


def test_text_plain_body_names_the_content_type(env):
    r = env.client.post("/v1/completions", content=json.dumps({"prompt": "x"}),
                        headers={"content-type": "text/plain"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == ("the request body must be JSON sent with "
                                            "'Content-Type: application/json', not 'text/plain'")
    r = env.client.post("/v1/completions", content=json.dumps({"prompt": "x"}).encode(),
                        headers={"content-type": ""})
    assert r.status_code == 400 and r.json()["error"]["message"].endswith(
        "'Content-Type: application/json' (it came without one)"), r.text
    r = env.client.post("/v1/completions", content=b'{"prompt": "\xff"}',
                        headers={"content-type": "application/json"})
    assert r.status_code == 400 and "cannot be read as JSON (not UTF-8" in r.json()["error"]["message"]
    r = env.client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    assert "token id 1000000 in stop_token_ids is outside" in r.json()["error"]["message"]


def test_queue_full_says_when_to_retry(env):
    engine = Engine(env.llm, tokenizer=env.codec, max_queue=0).start()  # admits nothing
    server = Server(build_app(engine, env.codec, MODEL))
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        server.close()
        engine.stop()


def value(text, name, **labels):
    labels = {"model_name": MODEL, **labels}
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus_client
    return float(re.search(rf"^{name}{{{want}}} (\S+)$", text, re.M).group(1))


def test_metrics_latencies_slots_and_finish_reasons(env):
    before = env.client.get("/metrics").text
    body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    assert env.client.post("/v1/completions", json=body).status_code == 200
    stop = env.client.post("/v1/completions", json={**body, "min_tokens": 1,
                                                    "stop_token_ids": list(range(320))})
    assert stop.json()["choices"][0]["finish_reason"] == "stop"
    after = env.client.get("/metrics").text
    grew = [value(after, name, **kw) - value(before, name, **kw) for name, kw in [
        ("tpserve_request_success_total", {"finished_reason": "length"}),
        ("tpserve_request_success_total", {"finished_reason": "stop"}),
        ("tpserve_time_to_first_token_seconds_count", {}),
        ("tpserve_e2e_request_latency_seconds_count", {}),
        ("tpserve_inter_token_latency_seconds_count", {})]]
    assert grew == [1, 1, 2, 2, 3]  # 4 tokens, then 1: 3 + 0 gaps between tokens
    assert value(after, "tpserve_kv_slots_total") == env.engine.num_slots
    assert value(after, "tpserve_kv_slot_usage_perc") == 0
    for name in ("tpserve_allreduce_total", "tpserve_rank_failures_total"):
        value(after, name)  # tpserve's own series stay, labelled too


def test_sse_escapes_the_characters_line_splitters_break_at(env):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines() (httpx's and requests'
    iter_lines): escaped in every data line, so such a client reads whole JSON lines (the
    helper below reads the stream that way); an echoed prompt holding them comes back whole,
    also through the encoder of large logprobs chunks."""
    from tpserve.serve.streams import PIECE, encode
    prompt = "a\u2028b\x85c\u2029d"
    chunks = sse(env.client, "/v1/completions", {"model": MODEL, "prompt": prompt, "echo": True,
                                                 "logprobs": 1, "max_tokens": 2, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks).startswith(prompt)
    obj = {"choices": [{"logprobs": {"tokens": ["\u2028\x85"] * (PIECE + 1)}}]}
    text = encode(obj, sse=True).decode()
    assert text.splitlines() == [text] and json.loads(text) == obj
