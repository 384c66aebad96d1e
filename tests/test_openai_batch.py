"""/v1/completions with a batch of prompts (OpenAI's list of prompts, as evaluation harnesses send
them): choice i is prompt i // n's choice i % n, and each prompt's choices are those of a request
of its own, whole or streamed.

    python -m pytest tests/test_openai_batch.py -q
"""

import pytest
from serving import MODEL, served_demo, sse

PROMPTS = ["Hello there", "The cat", "x"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from served_demo(tmp_path_factory, lambda llm, codec: {}, tp=1)


def complete(env, **body):
    r = env.client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("sampling", [{"temperature": 0},
                                      {"temperature": 1.0, "seed": 7, "n": 2}])
@pytest.mark.parametrize("as_ids", [False, True])
def test_a_batch_answers_as_its_prompts_alone(env, sampling, as_ids):
    prompts = [env.codec.encode(p) for p in PROMPTS] if as_ids else PROMPTS
    body = {"max_tokens": 5, "ignore_eos": True, **sampling}
    n = body.get("n", 1)
    out = complete(env, prompt=prompts, **body)
    assert [c["index"] for c in out["choices"]] == list(range(len(prompts) * n))
    for g, p in enumerate(prompts):
        alone = complete(env, prompt=p, **body)
        got = [c["text"] for c in out["choices"][g * n:(g + 1) * n]]
        assert got == [c["text"] for c in alone["choices"]], (g, got)
    lens = [len(env.codec.encode(p)) for p in PROMPTS]
    assert out["usage"]["prompt_tokens"] == sum(lens)  # each prompt once, whatever n
    assert out["usage"]["completion_tokens"] == 5 * n * len(prompts)


def test_a_streamed_batch_with_echo_and_logprobs(env):
    """Chunks carry the batch's indices; each choice's text starts with its own prompt's echo and
    its logprobs' text_offset points into that text; the same as the whole answer."""
    body = {"prompt": PROMPTS[:2], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 2, "n": 2}
    whole = complete(env, **body)["choices"]
    texts, lps = {}, {}
    for chunk in sse(env.client, "/v1/completions", {"model": MODEL, **body, "stream": True}):
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            for key, v in (c["logprobs"] or {}).items():
                lps.setdefault(c["index"], {}).setdefault(key, []).extend(v)
    assert sorted(texts) == [0, 1, 2, 3]
    for c in whole:
        i = c["index"]
        assert texts[i] == c["text"] and c["text"].startswith(PROMPTS[i // 2])
        assert lps[i]["tokens"] == c["logprobs"]["tokens"]
        for token, offset in zip(c["logprobs"]["tokens"], c["logprobs"]["text_offset"]):
            assert c["text"][offset:offset + len(token)] == token


def test_a_batch_is_queued_all_or_none(env):
    """A prompt of the batch that cannot run refuses the whole batch (400), and a batch whose
    choices outnumber the queue is refused before any is queued; nothing stays in the engine."""
    vocab = env.llm.cfg.vocab_size
    for prompts, fragment in (([[1, 2], [vocab + 5]], f"token id {vocab + 5} is outside"),
                              (["a", ""], "the prompt is empty")):
        r = env.client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 2})
        assert r.status_code == 400 and fragment in r.text, r.text
    r = env.client.post("/v1/completions", json={"prompt": ["a"] * 100, "n": 3, "max_tokens": 2})
    assert r.status_code == 400 and "100 prompts x n=3 exceeds the server's queue" in r.text
    r = env.client.post("/v1/completions", json={"prompt": ["a"] * 129})
    assert r.status_code == 400 and "'prompt' holds 129 items; send at most 128" in r.text
    assert env.engine.queue_depth == 0 and not env.engine.running


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompts(env, stream):
    """What evaluation harnesses send for log-likelihoods (a batch of token-id prompts, echo,
    logprobs, max_tokens 0): each prompt's own tokens and logprobs, nothing generated; the same
    prompt logprobs as a request that generates one token."""
    prompts = [env.codec.encode(p) for p in PROMPTS]
    body = {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    if stream:
        choices = {}
        chunks = sse(env.client, "/v1/completions", {"model": MODEL, **body, "stream": True,
                                                     "stream_options": {"include_usage": True}})
        for chunk in chunks[:-1]:
            for c in chunk["choices"]:
                got = choices.setdefault(c["index"], {"text": "", "logprobs": {}})
                got["text"] += c["text"]
                got["finish_reason"] = c["finish_reason"]
                for key, v in (c["logprobs"] or {}).items():
                    got["logprobs"].setdefault(key, []).extend(v)
        choices = [choices[i] for i in sorted(choices)]
        usage = chunks[-1]["usage"]
    else:
        out = complete(env, **body)
        choices, usage = out["choices"], out["usage"]
    assert usage["completion_tokens"] == 0
    assert usage["prompt_tokens"] == sum(map(len, prompts))
    assert len(choices) == len(prompts)
    for p, c in zip(prompts, choices):
        one = complete(env, prompt=p, echo=True, logprobs=1, max_tokens=1, temperature=0)
        ref = one["choices"][0]["logprobs"]
        assert c["text"] == env.codec.decode(p, skip_special_tokens=False)
        assert c["finish_reason"] == "length"
        lp = c["logprobs"]
        assert lp["tokens"] == ref["tokens"][:len(p)] and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(ref["token_logprobs"][1:len(p)],
                                                          abs=1e-4)


def test_max_tokens_0_without_echo_is_refused(env):
    r = env.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens=0 returns nothing without echo" in r.text
    assert r.json()["error"]["param"] == "max_tokens"


def test_a_batchs_prompts_wait_as_one_client_request(env, monkeypatch):
    """Every choice of every prompt of one HTTP request is queued under one group (KV slots are
    shared out by group, `fair_share.py`), and another request under its own."""
    groups, real = [], env.engine.submit_many

    def spy(*args, **kwargs):
        groups.append(args[4] if len(args) > 4 else kwargs.get("group"))
        return real(*args, **kwargs)
    monkeypatch.setattr(env.engine, "submit_many", spy)
    complete(env, prompt=PROMPTS[:3], n=2, max_tokens=1)
    complete(env, prompt=PROMPTS[0], max_tokens=1)
    assert len(groups) == 4 and groups[0] is not None
    assert groups[0] is groups[1] is groups[2] and groups[3] is not groups[0]
