"""The text of one output as its tokens arrive, with stop strings applied.

Text is handed out only once it is final: a tail that could still grow into a stop string is held
back (streamed or not, a stop string never leaks its first part), and so is a trailing U+FFFD of
the tokens not yet decoded for good, which byte-level tokens turn into a character a token later.

The engine thread runs this for every token of every request, so each update costs the same at
position 20000 as at 10, whatever the stop strings and the output:
- Decoding: each update decodes only the tokens since the last complete character plus the ones
  before them (`prefix`..`read`), and appends the difference. Decoding the window with its
  preceding tokens keeps what a decoder does at a text's start (a dropped leading space, a partial
  UTF-8 character) on both sides of the difference. An output of bytes that never form a
  character (a lone continuation byte decodes to U+FFFD for good) moves the window on once more
  than MAX_CHAR_BYTES tokens followed the U+FFFD and left it as it was: no character is longer.
- Stop strings: a Knuth-Morris-Pratt automaton per stop string reads each final character once;
  its state is the longest prefix of the stop string that ends the text, which is both what finds
  a stop string and what must be held back.
- Text: only the part not yet handed out or read by the automata (plus a stop string's length)
  is kept, from `base` on; positions stay those of the whole text. The kept part is cut once it
  is mostly behind those marks (`_trim`), so appending a token's text copies a short string, not
  the whole output.
"""

from __future__ import annotations

MAX_CHAR_BYTES = 4  # UTF-8: a character is at most 4 bytes, so at most 4 tokens
TRIM_CHARS = 4096  # the kept text is cut when this much (and half of it) lies behind the marks


class _Automaton:
    """One stop string's KMP automaton (state: the length of the longest prefix of it that ends
    the text read so far)."""

    def __init__(self, s: str):
        self.s, fail, k = s, [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        self.fail = fail

    def read(self, state: int, text: str, start: int, end: int) -> tuple[int, int]:
        """(state after text[start:end], where the first match ends, else -1)."""
        s, fail, n = self.s, self.fail, len(self.s)
        for i in range(start, end):
            ch = text[i]
            while state and s[state] != ch:
                state = fail[state - 1]
            if s[state] == ch:
                state += 1
                if state == n:
                    return state, i + 1
        return state, -1


class StopText:
    def __init__(self, tokenizer, stops: tuple[str, ...] = (), automata: dict | None = None):
        """`automata`: stop string -> its automaton, shared by the StopTexts of one request's
        choices (an automaton is read-only; its state lives here)."""
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        made = {} if automata is None else automata
        for s in self.stops:
            if s not in made:
                made[s] = _Automaton(s)
        self.automata = [made[s] for s in self.stops]
        self.states = [0] * len(self.stops)  # after the text's [search_from:fed]
        self.fed = -1  # < search_from: (re)start the automata there
        self.sent = 0  # characters handed out: what they were is always a prefix of the final text
        self.search_from = 0  # stop strings count from here (min_tokens moves it)
        self.base = 0  # the whole text's position of text[0]
        self.text = ""  # the output decoded for good so far, from `base` on
        self.hold = max(map(len, self.stops), default=0)  # a match may start this far before fed
        self.prefix = self.read = 0  # output[prefix:read] decoded to the end of `text`
        self.unsure = 0  # trailing U+FFFD of `text` that a rewrite left (a character may follow)

    def update(self, output: list[int], final: bool, stops_active: bool = True) -> tuple[str, bool]:
        """(new final text, whether a stop string ended the output) after `output` grew."""
        text = self._decoded(output, final)  # the whole text from `base` on
        b = self.base
        # the text a stop string may end in: all but a trailing U+FFFD not yet final
        end = b + (len(text) if final else
                   max(len(self.text) - self.unsure, len(text.rstrip("\ufffd"))))
        hit, cut = False, end
        if stops_active and self.stops:
            if self.fed < self.search_from:
                self.states, self.fed = [0] * len(self.stops), self.search_from
            first, matched = None, set()  # where the earliest stop string starts
            for i, a in enumerate(self.automata):  # the final text: read once, states kept
                self.states[i], m = a.read(self.states[i], self.text, self.fed - b, len(self.text))
                if m >= 0:
                    matched.add(i)
                    first = b + m - len(a.s) if first is None else min(first, b + m - len(a.s))
            self.fed = max(self.fed, b + len(self.text))
            longest = 0  # the longest stop-string prefix ending the text: held back
            for i, a in enumerate(self.automata):  # the tail: read from a copy of the state
                if i in matched:  # its state is a whole match: an earlier start is another's
                    continue
                state, m = a.read(self.states[i], text, self.fed - b, end - b)
                if m >= 0:
                    first = b + m - len(a.s) if first is None else min(first, b + m - len(a.s))
                longest = max(longest, state if m < 0 else 0)
            if first is not None:
                text, hit, final = text[:max(first - b, 0)], True, True
            else:
                cut = end - longest
        if not final:
            text = text[:max(cut - b, 0)]  # (before `base`: all of it was handed out)
        new = text[self.sent - b:] if b + len(text) > self.sent else ""
        self.sent += len(new)
        if not stops_active:
            self.search_from = self.sent
        self._trim()
        return new, hit

    def _trim(self) -> None:
        """Drop the kept text before both marks (what was handed out; where the automata read,
        less the longest stop string, where a match could still start) once that is most of it:
        amortised, each character is copied a bounded number of times."""
        if not self.stops:
            mark = self.sent
        elif self.fed >= self.search_from:
            mark = self.fed - self.hold
        else:  # the automata restart at search_from (min_tokens: not yet active)
            mark = self.search_from
        keep = min(self.sent, mark, self.base + len(self.text))  # (sent may reach the tail)
        drop = keep - self.base
        if drop > TRIM_CHARS and 2 * drop > len(self.text):
            self.text, self.base = self.text[drop:], keep

    def _decoded(self, output: list[int], final: bool) -> str:
        """The whole output's text, decoding only the tokens not yet turned into text (with the
        previous window's tokens as context)."""
        decode = self.tokenizer.decode
        before = decode(output[self.prefix:self.read], skip_special_tokens=True)
        after = decode(output[self.prefix:], skip_special_tokens=True)
        if not after.startswith(before):  # the decoder rewrote earlier text: decode it all
            self.text, self.base = decode(output, skip_special_tokens=True), 0
            self.prefix, self.read = max(0, len(output) - 1), len(output)  # the last as context
            self.fed = -1  # the automata read the new text again
            self.unsure = 0 if final else len(self.text) - len(self.text.rstrip("\ufffd"))
            return self.text
        tail = after[len(before):]
        if tail and (final or not tail.endswith("\ufffd")):  # complete characters: keep them
            self.text += tail
            self.prefix, self.read, self.unsure = self.read, len(output), 0
            return self.text
        if len(output) - self.read > 2 * MAX_CHAR_BYTES:  # bytes that never form a character
            upto = len(output) - MAX_CHAR_BYTES
            settled = decode(output[self.prefix:upto], skip_special_tokens=True)
            if settled.startswith(before) and after.startswith(settled):  # MAX_CHAR_BYTES more
                self.text += settled[len(before):]  # tokens left it as it was: it is final
                self.prefix, self.read, self.unsure = self.read, upto, 0
                return self.text + after[len(settled):]
        return self.text + tail  # a partial character: shown as pending, decoded again later
