"""What a request's prompt becomes before the engine sees it: text encoded, chat messages rendered
through the template and encoded, token ids checked, each refused with a 400 that names the field
before it costs the event loop or the tokenizer much (`app.py` routes through one `Prompts`)."""

from __future__ import annotations

import re
import secrets

from starlette.concurrency import run_in_threadpool

from tpserve.errors import shown
from tpserve.serve.openai_protocol import ApiError, check_text
from tpserve.serve.text import RESERVED


def _marks() -> tuple[str, str]:
    """A pair of strings around message contents that no client can send (random, private-use
    characters), found again in the rendered text."""
    tag = secrets.token_hex(8)
    return f"\ue000{tag}\ue001", f"\ue002{tag}\ue003"


def _strings(value) -> list[tuple[str, tuple | None]]:
    """(string, where) for every string inside a JSON value, keys included; `where` is a link to
    its parent's (parent's where, key or index), spelled out by `_path` only where needed (no
    recursion, and no path copied per item: a body may nest deeply or hold long keys)."""
    found, todo = [], [(value, None)]
    while todo:
        v, where = todo.pop()
        if isinstance(v, str):
            found.append((v, where))
        elif isinstance(v, dict):
            for k, item in v.items():
                found.append((k, (where, k)))
                todo.append((item, (where, k)))
        elif isinstance(v, list):
            todo.extend((item, (where, i)) for i, item in enumerate(v))
    return found


def _path(where: tuple | None) -> str:
    """A `_strings` link as the JSON path it stands for, e.g. '.a.b[1]'."""
    parts = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    path = "".join(reversed(parts))
    return path if len(path) <= 60 else f"...{path[-57:]}"  # its end names the string


class Prompts:
    def __init__(self, engine, codec):
        self.engine, self.codec = engine, codec
        # The fewest tokens a text can encode to: no token covers more characters than its
        # longest vocabulary entry (halved, for normalizers that drop characters). Longer texts
        # than the context allows are refused before the tokenizer spends seconds on them.
        self.chars_per_token = 2 * max((len(t) for t in codec.tokenizer.get_vocab(True)),
                                       default=1) if codec is not None else 1

    def need_codec(self, param: str) -> None:
        if self.codec is None:
            raise ApiError(400, "this model has no tokenizer; send token ids", param)

    def token_ids(self, tokens: list[int], param: str) -> list[int]:
        """tokens, if the context holds them and the vocabulary has each (checked in that order:
        the cheap bound first)."""
        max_len, vocab = self.engine.max_len, self.engine.cfg.vocab_size
        if len(tokens) > max_len:
            raise ApiError(400, f"'{param}' holds {len(tokens)} token ids, more than the context "
                                f"of {max_len}; shorten it", param)
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {shown(bad[0])} is outside the vocabulary [0, {vocab})",
                           param)
        return tokens

    async def completion(self, prompt, echo: bool) -> list[tuple[list[int], str]]:
        """/v1/completions' prompt (a text, token ids, or a batch of either) -> per prompt, its
        token ids and the text its echo starts with."""
        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        out = []
        for p in prompt if batch else [prompt]:
            if isinstance(p, str):
                out.append((await self.text(check_text(p, "prompt"), "prompt"), p))
            else:
                self.token_ids(p, "prompt")  # before the echo's decode
                # echoed with its special tokens, as its logprobs' tokens are (their text_offset)
                out.append((p, await self.decode(p, skip_special_tokens=False)
                            if self.codec is not None and echo else ""))
        return out

    async def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return await run_in_threadpool(self.codec.decode, tokens, skip_special_tokens)

    async def text(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """A text's token ids (encoded off the event loop); the caller has checked the text."""
        self.need_codec(param)
        self.check_length(text, param)
        return await run_in_threadpool(self.codec.encode, text, add_special_tokens)

    def check_length(self, text: str, param: str) -> None:
        """Refuse a text longer than the context could hold, before the tokenizer spends on it."""
        if len(text) > self.chars_per_token * self.engine.max_len:
            raise ApiError(400, f"the {param} has {len(text)} characters, more tokens than the "
                                f"context of {self.engine.max_len} holds; shorten it", param)

    async def chat(self, messages, template_kwargs: dict | None = None,
                   add_generation_prompt: bool | None = True,
                   continue_final: bool | None = False) -> list[int]:
        """The token ids of chat messages rendered through the model's template, with the
        client's `chat_template_kwargs` as more template variables; `continue_final`: the text
        ends where the last (assistant) message's does, for the model to continue it."""
        taken = sorted(set(template_kwargs or ()) & RESERVED)
        if taken:
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(taken)}: tpserve "
                                f"sets them", "chat_template_kwargs")
        if continue_final and add_generation_prompt is not False:
            raise ApiError(400, "continue_final_message continues the last message, which a "
                                "generation prompt would close; set add_generation_prompt to "
                                "false with it", "continue_final_message")
        self.need_codec("messages")
        if template_kwargs:
            await run_in_threadpool(self._no_control_tokens, template_kwargs)
        if not messages:
            raise ApiError(400, "'messages' is empty; send at least one message", "messages")
        rendered = []
        for m in messages:
            if (m.tool_calls or m.tool_call_id is not None or m.role == "function"
                    or (m.model_extra or {}).get("function_call") is not None):
                raise ApiError(400, "'messages' with tool or function calls or their results "
                                    "are not supported: tpserve has no tool-call parser; send "
                                    "text messages only", "messages")
            content = m.content or ""
            if isinstance(content, list):
                kinds = sorted({p.type for p in content} - {"text"})
                if kinds:
                    more = f" and {len(kinds) - 3} more" if len(kinds) > 3 else ""
                    raise ApiError(400, f"content parts of type {', '.join(map(shown, kinds[:3]))}"
                                        f"{more} are not supported; this model reads text only",
                                   "messages")
                content = "".join(p.text or "" for p in content)
            rendered.append({"role": check_text(m.role, "messages"),
                             "content": check_text(content, "messages")}
                            | ({} if m.name is None else {"name": check_text(m.name, "messages")}))
        if sum(len(m["content"]) + len(m["role"]) + len(m.get("name", "")) + 1
               for m in rendered) > \
                self.chars_per_token * self.engine.max_len:  # +1: a message renders to a token
            raise ApiError(400, f"the messages hold more tokens than the context of "
                                f"{self.engine.max_len}; shorten them", "messages")
        # A message holding a control token's text (e.g. "</s>", a turn marker) would end its
        # turn or forge another once the rendered text is encoded: such contents are marked, and
        # encoded with special-token strings as text (the template's own markers stay tokens).
        # (searched off the event loop: hundreds of special tokens over megabytes of messages)
        holds = await run_in_threadpool(self._contents_holding_control_tokens, rendered)
        marks = _marks() if any(holds) else None
        if marks is not None:
            rendered = [m | {"content": f"{marks[0]}{m['content']}{marks[1]}"} if has else m
                        for m, has in zip(rendered, holds)]
        if continue_final:  # where the last message's text ends: a mark after it (the same
            # text may also stand after it, in the template's own markers)
            if rendered[-1]["role"] != "assistant":
                raise ApiError(400, "continue_final_message needs a last assistant message",
                               "continue_final_message")
            end_mark, last = _marks()[0], rendered[-1]["content"]
            kept = last.rstrip()  # the mark before trailing whitespace: a template may trim it
            trailing = last[len(kept):]
            rendered[-1] = rendered[-1] | {"content": kept + end_mark + trailing}
        try:
            text = await run_in_threadpool(self.codec.render_chat, rendered, template_kwargs,
                                           add_generation_prompt is not False)
        except Exception as e:  # TpserveError from raise_exception, or a jinja2 error
            why = str(e) if len(str(e)) <= 300 else f"{str(e)[:300]}..."
            raise ApiError(400, f"the chat template cannot render these messages: {why}",
                           "messages") from None
        if template_kwargs:  # the messages' text is checked above; only these may add more
            check_text(text, "chat_template_kwargs")
        if continue_final:
            if text.count(end_mark) != 1:
                raise ApiError(400, "continue_final_message needs a last assistant message with "
                                    "text that the chat template renders as sent",
                               "continue_final_message")
            at = text.index(end_mark)  # the trailing whitespace where the template kept it
            text = text[:at] + (trailing if text.startswith(trailing, at + len(end_mark)) else "")
        if marks is None:
            return await self.text(text, "messages", add_special_tokens=False)
        return await run_in_threadpool(
            lambda: self.codec.encode_parts(self.marked_parts(text, marks)))

    def _contents_holding_control_tokens(self, rendered: list[dict]) -> list[bool]:
        """Which messages' contents hold a control token's text (to be marked); a role or name
        holding one is refused: templates print them as their own text."""
        labels = [(i, f, m[f]) for i, m in enumerate(rendered) for f in ("role", "name") if f in m]
        for (i, field, _), held in zip(labels, self.codec.first_specials([t for *_, t in labels])):
            if held is not None:
                raise ApiError(400, f"messages[{i}].{field} holds {shown(held)}, a control token "
                                    f"of this model, which the chat template would render as "
                                    f"that token; remove it", "messages")
        return [held is not None
                for held in self.codec.first_specials([m["content"] for m in rendered])]

    def _no_control_tokens(self, template_kwargs: dict) -> None:
        """Template variables render as the template's own text, where a control token's text
        becomes that token (a turn marker forged from a variable): refused, unlike message
        contents, which are marked and encoded as plain text."""
        strings = _strings(template_kwargs)
        for (_, where), held in zip(strings, self.codec.first_specials([t for t, _ in strings])):
            if held is not None:
                raise ApiError(400, f"chat_template_kwargs at '{_path(where)}' holds "
                                    f"{shown(held)}, a control token of this model, which the "
                                    f"template would render as that token; remove it",
                               "chat_template_kwargs")

    def marked_parts(self, text: str, marks: tuple[str, str]) -> list[tuple[str, bool]]:
        """The rendered text's parts, (text, plain): the marked message contents plain."""
        self.check_length(text, "messages")
        pieces = re.split(f"{re.escape(marks[0])}(.*?){re.escape(marks[1])}", text, flags=re.S)
        parts = [(p, i % 2 == 1) for i, p in enumerate(pieces)]
        if any(marks[0] in p or marks[1] in p for p, _ in parts):
            raise ApiError(400, f"a message holds {shown(self.codec.specials_in(text)[0])}, a "
                                f"control token of this model, and its chat template changes such "
                                f"messages' text; remove it from the message", "messages")
        return parts
