"""The text of one output as its tokens arrive, with stop strings applied.

Text is handed out only once it is final: a tail that could still grow into a stop string is held
back (streamed or not, a stop string never leaks its first part), and so is a trailing U+FFFD,
which byte-level tokens turn into a character a token later.
"""

from __future__ import annotations


class StopText:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.sent = ""  # text already handed out; always a prefix of the final text
        self.search_from = 0  # stop strings count from here (min_tokens moves it)

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
        text = self.tokenizer.decode(output, skip_special_tokens=True)
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
