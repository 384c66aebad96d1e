"""Text in and out: the checkpoint's tokenizer.json (via `tokenizers`) and its chat template."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer

from tpserve.errors import TpserveError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode), character -> the byte it stands
    for: printable bytes stand for themselves, the others for 256 + their rank."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(rest)}


_BYTE_LEVEL = _byte_level_chars()
# what tpserve gives a chat template itself (a client's chat_template_kwargs may not set them)
RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                      "raise_exception"})
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback tokens


def _decoders(d: dict | None) -> list[str]:
    if not d:
        return []
    return [t for x in d.get("decoders", []) for t in _decoders(x)] + [d.get("type")]


class TextCodec:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None
        # the decoders (for token_bytes), read once here: serializing a large vocabulary takes
        # ~0.3 s, which a first logprobs request must not spend on the event loop
        self._kinds = _decoders(json.loads(tokenizer.to_str()).get("decoder"))
        # control tokens (eos, turn markers, ...): their text in a client's message stays text
        self.specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()
                         if t.special and t.content]
        self._plain = None  # reads special-token strings as text (`encode_parts`)

    @classmethod
    def load(cls, path: str | Path) -> "TextCodec | None":
        """The codec of a checkpoint folder, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise TpserveError(f"{path / 'tokenizer.json'} cannot be loaded ({e}); re-download "
                               f"it") from None
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: tokenizers' encode holds the GIL for the whole call (a
        # 4M-character prompt froze the server's event loop for 2.4 s); encode_batch releases it.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def specials_in(self, text: str) -> list[str]:
        """The special tokens whose text occurs in `text`."""
        return [t for t in self.specials if t in text]

    def first_specials(self, texts: list[str]) -> list[str | None]:
        """Per text, the first special token whose text occurs in it, or None; one search over
        all of them first (a body may hold 100000 short strings)."""
        if not self.specials_in("\0".join(texts)):
            return [None] * len(texts)
        return [next(iter(self.specials_in(t)), None) for t in texts]

    def encode_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """The token ids of text parts in order, each (text, plain): plain text is encoded with
        special-token strings as ordinary text (a message holding "</s>" gets the tokens of those
        characters, not the control token), the rest as `encode(add_special_tokens=False)`."""
        if self._plain is None:
            plain = Tokenizer.from_str(self.tokenizer.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        ids = []
        for text, plain in parts:
            if text:
                tok = self._plain if plain else self.tokenizer
                ids += tok.encode_batch([text], add_special_tokens=False)[0].ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes (the logprobs' `bytes`): a byte-level token may hold part of a
        character, which its decoded text shows as U+FFFD; so may a byte-fallback token <0xE4>."""
        piece = self.tokenizer.id_to_token(token)
        if piece is not None:
            kinds = self._kinds
            if "ByteLevel" in kinds and all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            m = _BYTE_TOKEN.fullmatch(piece)
            if m and "ByteFallback" in kinds:
                return bytes([int(m.group(1), 16)])
        return self.decode([token], skip_special_tokens=False).encode("utf-8")

    def render_chat(self, messages: list[dict], extra: dict | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The template's text for `messages`; `extra`: more template variables (none of
        RESERVED); add_generation_prompt: whether it ends opening the assistant's turn."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TpserveError(f"the chat template refused the messages: {message}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template or FALLBACK_TEMPLATE)
        return self._template.render(**(extra or {}), messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes the special tokens itself (e.g. bos); do not add them twice.
        return self.encode(self.render_chat(messages), add_special_tokens=False)
