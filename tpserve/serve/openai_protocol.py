"""The OpenAI wire format: request bodies, their validation and errors (the logprobs of a response:
`tpserve.serve.logprobs`).

Every parameter that changes the answer is either honoured or refused with a 400 that names it;
none is silently dropped. Numbers are checked by `SamplingParams` (finite, in range, seeds in
[0, 2**63 - 1]); strings must be valid Unicode (a lone surrogate such as "\\ud800" is a 400).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from tpserve.errors import TpserveError, shown
from tpserve.serve.sampling_params import MAX_STOP_IDS, SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}
MAX_N = 128  # OpenAI's own bound on n
MAX_STOP, MAX_STOP_CHARS = 16, 512  # stop strings per request, characters per stop string
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request
MAX_MESSAGES = 4096  # chat messages per request
MAX_PARTS = 4096  # content parts per chat message
MAX_IDS = 1 << 20  # token ids in a prompt or a /detokenize body (the context bounds them again)
MAX_PROMPTS = 128  # prompts in one /v1/completions batch (their n choices each also in the queue)


def _at_most(n: int):
    """A list or object of more than n items is refused before its items are validated (pydantic
    validates every item first: 1.3M chat messages took seconds on the event loop), and its
    validation stops at the first bad item (one error, not one per item: 200K floats in a prompt
    of token ids made 200K errors, ~1 s of the event loop)."""
    def check(v):
        if isinstance(v, (list, dict)) and len(v) > n:
            raise ValueError(f"holds {len(v)} items; send at most {n}")
        return v
    return BeforeValidator(check)


def _list(item, n: int):
    """A list of at most n items, its validation stopped at the first bad one (`_at_most`)."""
    return Annotated[list[item], Field(fail_fast=True), _at_most(n)]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    message = " ".join(message.splitlines())  # one line, even for a multi-line exception
    # a message quoting the request (a lone surrogate, say) must still encode as UTF-8 JSON
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


# ---- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    """Strict types, as OpenAI's: "2" is not an integer, 1 not a boolean (an int is a float).
    Unknown fields are kept aside (`model_extra`): clients send many that change nothing, and
    those that would change the answer are refused by name (`FOREIGN`)."""
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Common(_Body):
    """Fields both endpoints share."""
    model: str | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None  # extension; 0 or -1 turn it off
    min_p: float | None = 0.0  # extension
    seed: int | None = None
    stop: str | _list(str, MAX_STOP) | None = None
    stop_token_ids: _list(int, MAX_STOP_IDS) | None = None  # extension
    ignore_eos: bool | None = False  # extension
    min_tokens: int | None = 0  # extension
    stream: bool | None = False  # null: not streamed (OpenAI allows it)
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0  # extension
    logit_bias: Annotated[dict[str, float], _at_most(MAX_LOGIT_BIAS)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_Common):
    # one prompt (text or token ids), or a batch of them (OpenAI's list of prompts)
    prompt: (str | _list(StrictInt, MAX_IDS) | _list(str, MAX_PROMPTS)
             | _list(_list(StrictInt, MAX_IDS), MAX_PROMPTS))
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | _list(ContentPart, MAX_PARTS) | None = None
    name: str | None = None  # passed to the chat template
    # tool calls and their results: refused (`Prompts.chat`), never dropped
    tool_calls: _list(Any, MAX_PARTS) | None = None
    tool_call_id: str | None = None


class ChatRequest(_Common):
    messages: _list(ChatMessage, MAX_MESSAGES)
    # extensions (vLLM's): more variables for the chat template, e.g. Qwen3's enable_thinking;
    # whether the template opens the assistant's turn (false: the prompt ends with the messages)
    chat_template_kwargs: Annotated[dict[str, Any], _at_most(64)] | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False  # the last (assistant) message is continued
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: _list(ChatMessage, MAX_MESSAGES) | None = None
    chat_template_kwargs: Annotated[dict[str, Any], _at_most(64)] | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: _list(StrictInt, MAX_IDS)


# ---- validation ----------------------------------------------------------------------------
def check_text(text: str, param: str) -> str:
    """Strings go to the tokenizer as UTF-8; JSON can carry lone surrogates that have none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end].encode("unicode_escape").decode()
        raise ApiError(400, f"'{param}' holds a lone surrogate ({bad}), which is not valid "
                            f"Unicode; send well-formed text", param) from None
    return text


# Fields of OpenAI's older API and of other OpenAI-style servers that tpserve does not implement
# and whose dropping would change the answer: refused unless they ask for what it does anyway
# (the values listed). Others (user, metadata, store, service_tier, priority, ...) change nothing.
FOREIGN = {
    "functions": (None, []), "function_call": (None, "none"),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "structured_outputs": (None,), "bad_words": (None, []),
    "allowed_token_ids": (None,), "use_beam_search": (None, False), "length_penalty": (None, 1),
    "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,), "logits_processors": (None, []),
    "chat_template": (None,), "documents": (None,), "echo": (None, False),
    "modalities": (None, ["text"]), "audio": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,),
    # text-generation-inference / transformers and llama.cpp spellings
    "max_new_tokens": (None,), "do_sample": (None,), "stop_sequences": (None, []),
    "typical_p": (None, 1), "num_beams": (None, 1), "repeat_penalty": (None, 1),
    "mirostat": (None, 0), "grammar": (None,), "json_schema": (None,)}


def _same(value, ok) -> bool:
    if ok is None or isinstance(ok, bool):
        return value is ok
    if isinstance(ok, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == ok
    return value == ok


def refuse_unsupported(req: _Common) -> None:
    """Fields whose silent dropping would change the answer are refused, not ignored."""
    for name, value in (req.model_extra or {}).items():
        if name in FOREIGN and not any(_same(value, ok) for ok in FOREIGN[name]):
            raise ApiError(400, f"'{name}'={shown(value)} is not supported by tpserve; leave it "
                                f"out", name)
    fmt = (req.response_format or {}).get("type", "text")
    unsupported = [
        ("n", req.n is not None and not 1 <= req.n <= MAX_N, f"n={shown(req.n)} must be in [1, {MAX_N}]"),
        ("response_format", fmt != "text",
         f"response_format type {shown(fmt)} is not supported: tpserve has no constrained (JSON or "
         f"grammar) decoding; leave response_format unset or {{\"type\": \"text\"}}"),
        ("tools", bool(req.tools), "tools are not supported: tpserve has no tool-call parser; "
                                   "leave tools unset"),
        ("tool_choice", req.tool_choice not in (None, "none"),
         "tool_choice is not supported: tpserve has no tool-call parser; leave it unset"),
        ("stream_options", req.stream_options is not None and not req.stream,
         "stream_options applies to streamed requests only; set stream to true or leave it out")]
    if isinstance(req, CompletionRequest):
        unsupported += [
            ("best_of", req.best_of not in (None, 1, req.n),
             f"best_of={shown(req.best_of)} is not supported; leave it unset (n choices are returned)"),
            ("suffix", bool(req.suffix), "suffix is not supported: this is not an insertion "
                                         "model; leave it null")]
    if isinstance(req, ChatRequest):
        unsupported += [("top_logprobs", req.top_logprobs is not None and not req.logprobs,
                         "top_logprobs needs logprobs=true")]
    for param, bad, message in unsupported:
        if bad:
            raise ApiError(400, message, param)
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []  # at most MAX_STOP
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise ApiError(400, f"a stop string of {len(s)} characters exceeds "
                                f"{MAX_STOP_CHARS}; shorten it", "stop")
        check_text(s, "stop")


def sampling_params(req: _Common, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    bias, seen = [], set()  # at most MAX_LOGIT_BIAS entries (`_at_most`)
    for key, value in (req.logit_bias or {}).items():
        if not re.fullmatch(r"[0-9]{1,10}", key):  # ASCII digits only: int() reads others too
            raise ApiError(400, f"logit_bias key {key[:40]!r} is not a token id", "logit_bias")
        if int(key) in seen:
            raise ApiError(400, f"logit_bias names token {int(key)} twice", "logit_bias")
        seen.add(int(key))
        bias.append((int(key), value))
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p, min_p=req.min_p or 0.0, seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()), stop=tuple(stop),
            ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=tuple(bias), logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except TpserveError as e:  # its messages start with the field: "top_p=1.5 must be ..."
        m = re.match(r"(\w+)", str(e))
        raise ApiError(400, str(e), m.group(1) if m else None) from None


def validation_message(err: dict, content_type: str) -> tuple[str, str | None]:
    """One line from pydantic's first error. Its loc is ("body", field, index, ..., union tag)."""
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error')})", None
    where = []
    for x in err["loc"][1:]:
        if not isinstance(x, int) and not re.fullmatch(r"[a-z_][a-z0-9_]*", x) or x in (
                "str", "int", "float", "bool"):
            break  # a union member's tag, not a field
        where.append(str(x))
    if not where:  # the body as a whole: not parsed (no JSON content type), or not an object
        if content_type.split(";")[0].strip() != "application/json":
            sent = f", not '{content_type}'" if content_type else " (it came without one)"
            return (f"the request body must be JSON sent with 'Content-Type: application/json'"
                    f"{sent}", None)
        return "the request body must be a JSON object", None
    path = ".".join(where)
    if err["type"] == "value_error":  # ours (`_at_most`): "holds N items; send at most M"
        return f"'{path}' {err['msg'].removeprefix('Value error, ')}", where[0]
    if err["type"] == "missing":
        return f"'{path}' is required", where[0]
    if path == "prompt":  # a union: pydantic's first message names only one of its types
        return ("'prompt' must be a string, a list of token ids, or a list of either (a batch "
                "of prompts)", "prompt")
    return f"'{path}' is invalid: {err['msg']}", where[0]
