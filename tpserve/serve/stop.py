"""The text of one output as its tokens arrive, with stop strings applied.

Text is handed out only once it is final: a tail that could still grow into a stop string is held
back (streamed or not, a stop string never leaks its first part), and so is a trailing U+FFFD,
which byte-level tokens turn into a character a token later.

The text grows incrementally: each update decodes only the tokens since the last complete
character plus the ones before them (`prefix`..`read`), and appends the difference, so a token
costs the same at position 8000 as at 10 (decoding the whole output every token made the engine
thread quadratic in the output length). Decoding the window with its preceding tokens keeps
what a decoder does at a text's start (a dropped leading space, a partial UTF-8 character) on
both sides of the difference.
"""

from __future__ import annotations


class StopText:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.sent = ""  # text already handed out; always a prefix of the final text
        self.search_from = 0  # stop strings count from here (min_tokens moves it)
        self.text = ""  # the output decoded so far (up to the last complete character)
        self.prefix = self.read = 0  # output[prefix:read] decoded to the end of `text`

    def held(self, text: str) -> int:
        """How many trailing characters of `text` are not final yet."""
        end = len(text.rstrip("\ufffd"))
        cut = end
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):  # longest proper prefix of s ending here
                if text.endswith(s[:k], 0, end):
                    cut = min(cut, end - k)
                    break
        return len(text) - cut

    def update(self, output: list[int], final: bool, stops_active: bool = True) -> tuple[str, bool]:
        """(new final text, whether a stop string ended the output) after `output` grew."""
        text = self._decoded(output, final)
        hit = False
        if stops_active:
            found = [i for i in (text.find(s, self.search_from) for s in self.stops) if i >= 0]
            if found:
                text, hit, final = text[:min(found)], True, True
        if not final:
            text = text[:len(text) - (self.held(text) if stops_active else
                                      len(text) - len(text.rstrip("\ufffd")))]
        new = text[len(self.sent):] if len(text) > len(self.sent) else ""
        self.sent += new
        if not stops_active:
            self.search_from = len(self.sent)
        return new, hit

    def _decoded(self, output: list[int], final: bool) -> str:
        """The whole output's text, decoding only the tokens not yet turned into text (with the
        previous window's tokens as context)."""
        decode = self.tokenizer.decode
        before = decode(output[self.prefix:self.read], skip_special_tokens=True)
        after = decode(output[self.prefix:], skip_special_tokens=True)
        if not after.startswith(before):  # the decoder rewrote earlier text: decode it all
            self.text = decode(output, skip_special_tokens=True)
            self.prefix, self.read = max(0, len(output) - 1), len(output)  # the last as context
            return self.text
        tail = after[len(before):]
        if tail and (final or not tail.endswith("\ufffd")):  # complete characters: keep them
            self.text += tail
            self.prefix, self.read = self.read, len(output)
            return self.text
        return self.text + tail  # a partial character: shown as pending, decoded again later
