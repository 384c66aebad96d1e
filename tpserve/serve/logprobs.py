"""Logprobs in OpenAI's two shapes, how many one response may carry, and the choices of a
/v1/completions request, whose echoed prompt is built once for all of them.

A request with n choices is n engine requests, but only choice 0's asks for the prompt's logprobs
(echo): the echoed part of every choice's logprobs is the same (tokens, logprobs, text offsets),
so it is built once and shared. Each token's text is decoded once per response (`TokenTexts`): a
response with 20 logprobs per token names the same vocabulary entries many times.
"""

from __future__ import annotations

import codecs

from tpserve.errors import shown
from tpserve.serve.openai_protocol import ApiError
from tpserve.serve.requests import Event
from tpserve.serve.sampling import TokenLogprob

# Logprob entries (a token's own, or one of its top alternatives) one response may carry: each is
# built on the server and becomes ~15-30 bytes of JSON (4M entries: ~100 MB).
MAX_LOGPROB_ENTRIES = 1 << 22


def logprob_tokens(n: int, k: int | None) -> int | None:
    """Tokens per choice that n choices with k logprobs each may generate within
    MAX_LOGPROB_ENTRIES (None: no logprobs, no bound): what a chat without max_tokens gets."""
    if k is None or not (isinstance(k, int) and k >= 0 and isinstance(n, int) and n >= 1):
        return None  # (no bound here: the parameters' own checks refuse a bad k or n)
    return MAX_LOGPROB_ENTRIES // (n * (k + 1))


def check_logprob_budget(n: int, echoed: int, max_tokens: int, k: int | None,
                         param: str = "logprobs", tokens_param: str = "max_tokens") -> None:
    """Refuse (400) a request whose logprobs would pass MAX_LOGPROB_ENTRIES, before it runs:
    n choices x (echoed prompt tokens + max_tokens) x (k + 1) entries."""
    if k is None:
        return
    total = n * (echoed + max_tokens) * (k + 1)
    if total > MAX_LOGPROB_ENTRIES:
        tokens = (f"({echoed} echoed prompt tokens + {shown(max_tokens)} {tokens_param})"
                  if echoed else f"{shown(max_tokens)} {tokens_param}")
        count = f"{total:,}" if total < 10 ** 30 else "more than 10^30"  # str() of a 4300-digit
        # product raises (Python's int-to-str limit): a huge max_tokens would become a 500
        raise ApiError(400, f"n={n} choices x {tokens} x ({k} {param} + 1) = {count} logprob "
                            f"entries, over the {MAX_LOGPROB_ENTRIES:,} this server returns for "
                            f"one request; ask for fewer choices, tokens or logprobs", param)


class TokenTexts:
    """A token's text (its id where there is no tokenizer), decoded once per response."""

    def __init__(self, codec):
        self.codec, self.texts, self.utf8, self.control, self.names = codec, {}, {}, {}, {}

    def __call__(self, token: int) -> str:
        text = self.texts.get(token)
        if text is None:
            text = self.texts[token] = (str(token) if self.codec is None else
                                        self.codec.decode([token], skip_special_tokens=False))
        return text

    def bytes(self, token: int) -> list[int]:
        """The token's own bytes: those of a partial character, where its text shows U+FFFD."""
        out = self.utf8.get(token)
        if out is None:
            out = self.utf8[token] = list(str(token).encode() if self.codec is None
                                          else self.codec.token_bytes(token))
        return out

    def in_text(self, token: int) -> bool:
        """Whether the token's text shows in a choice's text: not a control token (a BOS the
        tokenizer added to the prompt, the EOS that ended the answer), which decoding skips."""
        shown = self.control.get(token)
        if shown is None:
            shown = self.control[token] = self.codec is None or self.codec.decode([token]) != ""
        return shown

    def name(self, token: int) -> str:
        """The token as /v1/completions names it: its text, or where its bytes are part of a
        character (its text alone would be U+FFFD, shared by every such token) "bytes:\\xNN..",
        as OpenAI's legacy API writes them."""
        name = self.names.get(token)
        if name is None:
            raw = bytes(self.bytes(token))
            try:
                raw.decode("utf-8")
                name = self(token)
            except UnicodeDecodeError:
                name = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.names[token] = name
        return name


class TextOffsets:
    """Where each token of a choice starts in its text: the characters completed before it (a
    token that begins inside a character starts where that character does). A control token
    takes no room in generated text (decoding skips it); in an echoed prompt (`text`) it does
    where its text stands there (token ids echoed with it), not where the tokenizer added it."""

    def __init__(self, texts: TokenTexts, start: int = 0, text: str | None = None):
        self.texts, self.chars, self.text = texts, start, text
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token: int) -> int:
        at = self.chars
        if self.texts.in_text(token):
            raw, held = bytes(self.texts.bytes(token)), self.utf8.getstate()[0]
            if held and raw:  # bytes of a character begun before: does this token's first
                probe = codecs.getincrementaldecoder("utf-8")(errors="replace")  # byte end it,
                probe.setstate((held, 0))  # go on with it, or show it was none (U+FFFD first)?
                shown = len(probe.decode(raw[:1]))
                at += max(shown - (0 if probe.getstate()[0] else 1), 0)
            self.chars += len(self.utf8.decode(raw))
        elif self.text is not None and self.text.startswith(self.texts(token), at):
            self.chars += len(self.texts(token))
        return at


def completion_logprobs(lps: list[TokenLogprob], texts: TokenTexts,
                        offsets: TextOffsets) -> dict:
    """/v1/completions: parallel lists; `offsets` places each token in the choice's text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        out["tokens"].append(texts.name(lp.token))
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(None if lp.logprob is None else {  # echo's first token: None
            **{texts.name(t): v for t, v in lp.top}, texts.name(lp.token): lp.logprob})
        out["text_offset"].append(offsets.next(lp.token))
    return out


def chat_logprobs(lps: list[TokenLogprob], texts: TokenTexts) -> list[dict]:
    """/v1/chat/completions: `choices[i].logprobs.content`, one entry per token."""
    def entry(token, logprob):
        return {"token": texts(token), "logprob": logprob, "bytes": texts.bytes(token)}
    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps]


class CompletionChoices:
    """The choices of one /v1/completions request, whole (`choices`) or streamed (`chunks`).
    With echo, the prompt's text leads each choice, and with logprobs the prompt's logprobs,
    which choice 0's engine request alone computes (`echoed`)."""

    def __init__(self, codec, prompt_text: str, echo: bool, k: int | None, output: bool = True):
        """output False: the prompt is scored (echo, max_tokens 0): the generated token is not
        shown, the choice ends for `length`."""
        self.texts, self.prompt_text, self.echo, self.k = TokenTexts(codec), prompt_text, echo, k
        self.output = output
        self.echoed: dict | None = None  # the prompt's logprobs, shared by every choice
        self.offsets: dict[int, TextOffsets] = {}  # choice -> where its next token starts
        self.held: list[tuple] = []  # streamed events that came before choice 0's first

    def _echo(self, prompt_lps: list[TokenLogprob] | None) -> None:
        self.echoed = completion_logprobs(prompt_lps or [], self.texts,
                                          TextOffsets(self.texts, 0, self.prompt_text))

    def choice(self, i: int, text: str, lps: list | None, reason: str | None, first: bool):
        """Choice i, or one streamed chunk of it: `text` and `lps` are its new tokens'."""
        if not self.output:
            text, lps, reason = "", [], reason and "length"
        echo = self.echo and first
        out = None
        if self.k is not None:
            if i not in self.offsets:  # generated text starts after the echoed prompt's
                self.offsets[i] = TextOffsets(self.texts, len(self.prompt_text) if self.echo else 0)
            out = completion_logprobs(lps or [], self.texts, self.offsets[i])
            if echo:  # new lists over the shared items: each choice's own tokens follow
                out = {key: self.echoed[key] + out[key] for key in out}
        return {"index": i, "text": self.prompt_text + text if echo else text, "logprobs": out,
                "finish_reason": reason}

    def choices(self, results: list) -> list[dict]:
        """Every choice of the whole answer (`streams.Choice` per choice)."""
        if self.echo and self.k is not None:
            self._echo(results[0].prompt_logprobs)
        return [self.choice(i, r.text, r.logprobs, r.reason, True) for i, r in enumerate(results)]

    def chunks(self, i: int, ev: Event, first: bool):
        """The streamed chunks of choice i's event. While choice 0's first event (with the
        prompt's logprobs) has not come, the other choices' events wait; chunks carry their
        index, so choices may interleave in any order."""
        events = [(i, ev, first)]
        if self.echo and self.k is not None and self.echoed is None:
            if i != 0:
                self.held.append((i, ev, first))
                return
            self._echo(ev.prompt_logprobs)
            events, self.held = events + self.held, []
        for i, ev, first in events:
            if ev.finished or (self.echo and first) or self.output and (
                    ev.text or (self.k is not None and ev.logprobs)):
                yield self.choice(i, ev.text, ev.logprobs, ev.finish_reason, first)


class BatchChoices:
    """The choices of a batch of prompts (`CompletionChoices` each): choice i is prompt i // n's
    choice i % n, OpenAI's order; one prompt is a batch of one."""

    def __init__(self, parts: list[CompletionChoices], n: int):
        self.parts, self.n = parts, n

    def choices(self, results: list) -> list[dict]:
        n = self.n
        return [{**c, "index": g * n + c["index"]} for g, part in enumerate(self.parts)
                for c in part.choices(results[g * n:(g + 1) * n])]

    def chunks(self, i: int, ev: Event, first: bool):
        g = i // self.n
        for c in self.parts[g].chunks(i % self.n, ev, first):  # held events keep their own index
            yield {**c, "index": g * self.n + c["index"]}
