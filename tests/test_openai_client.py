"""The official `openai` Python client against tpserve: completions, chat, streaming, n, logprobs
and penalties, as a user of OpenAI's SDK writes them.

    python -m pytest tests/test_openai_client.py -q
"""

import openai
import pytest
from serving import MODEL, served_demo

PROMPT = "Hello"
MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    def references(llm, codec):
        return {"greedy": llm.generate(codec.encode(PROMPT), max_tokens=8, ignore_eos=True),
                "chat": llm.generate(codec.encode_chat(MESSAGES), max_tokens=6,
                                     ignore_eos=True)}
    for env in served_demo(tmp_path_factory, references):
        env.sdk = openai.OpenAI(base_url=f"{env.url}/v1", api_key="unused", max_retries=0)
        yield env


def test_completion_stream_and_logprobs(env):
    want = env.codec.decode(env.ref["greedy"])
    out = env.sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert out.choices[0].text == want and out.usage.completion_tokens == 8
    assert len(out.choices[0].logprobs.token_logprobs) == 8
    assert all(lp <= 0 for lp in out.choices[0].logprobs.token_logprobs)
    stream = env.sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == want


def test_chat_stream_n_and_logprobs(env):
    want = env.codec.decode(env.ref["chat"])
    out = env.sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want
    assert [len(c.top_logprobs) for c in out.choices[0].logprobs.content] == [2] * 6
    stream = env.sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    many = env.sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3,
                                           temperature=1.0, seed=5,
                                           extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) == 3


def test_penalties_and_refusals(env):
    plain = env.sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    rewarded = env.sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                          temperature=0, frequency_penalty=-2.0,
                                          presence_penalty=-2.0,
                                          extra_body={"ignore_eos": True}).choices[0].text
    assert rewarded != plain  # repeats rewarded: the greedy text changes
    with pytest.raises(openai.BadRequestError, match="response_format type 'json_object'"):
        env.sdk.chat.completions.create(model=MODEL, messages=MESSAGES,
                                        response_format={"type": "json_object"})
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
        env.sdk.completions.create(model="gpt-4o", prompt=PROMPT)
    assert [m.id for m in env.sdk.models.list()] == [MODEL]
    assert env.sdk.models.retrieve(MODEL).id == MODEL
