"""Sampling parameters, validated once where a request enters (HTTP, `LLM.generate`, the wire to
rank 0): every number finite and in range, so the sampler (`tpserve.serve.sampling`) never meets
a value that would turn its fp32 math into NaN or overflow."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tpserve.errors import TpserveError, shown

MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
# top_k above any vocabulary keeps every token; bounded so the value fits the wire to rank 0
# (msgpack's integers stop at 2**64 - 1) and the sampler's int64 tensors
MAX_TOP_K = 2**31 - 1
MAX_STOP_IDS = 1024  # stop_token_ids per request: each decode step checks them
# repetition_penalty in [1/100, 100]: logits are divided or multiplied by it in fp32, where a
# penalty of 1e-300 is 0 (every logit inf, NaN probabilities, token 0 every time)
MIN_REPETITION_PENALTY = 0.01
# Above this, logits / temperature would round to 0 or overflow in fp32 (1e39 is inf there, and
# a banned token's -inf / inf is NaN): sampling is uniform long before it.
MAX_TEMPERATURE = 1e6
# Below this temperature sampling is greedy: dividing by it would overflow fp32 logits.
MIN_TEMPERATURE = 1e-5


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TpserveError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(name: str, x, lo: float, hi: float = math.inf, lo_open: bool = False,
            note: str = "") -> None:
    where = (f"{'>' if lo_open else '>='} {lo:g}" if hi == math.inf
             else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    number = isinstance(x, (int, float)) and not isinstance(x, bool)
    _check(number and math.isfinite(x),
           f"{name}={shown(x)} is not a finite number; send one {where}")
    _check((x > lo if lo_open else x >= lo) and x <= hi,
           f"{name}={shown(x)} must be {where}{note}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    min_tokens: int = 0  # eos and stop_token_ids are banned until this many tokens exist
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self):
        _check(_is_int(self.max_tokens) and self.max_tokens > 0,
               f"max_tokens={shown(self.max_tokens)} must be a positive integer")
        _number("temperature", self.temperature, 0, MAX_TEMPERATURE, note=" (0 means greedy)")
        _number("top_p", self.top_p, 0, 1, lo_open=True)
        _check(_is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K,
               f"top_k={shown(self.top_k)} must be an integer in [0, {MAX_TOP_K}] (0 turns it off)")
        _number("min_p", self.min_p, 0, 1)
        _check(self.seed is None or _is_int(self.seed) and -MAX_SEED - 1 <= self.seed <= MAX_SEED,
               f"seed={shown(self.seed)} must be an integer in [-2**63, 2**63 - 1]")
        if self.seed is not None and self.seed < 0:  # vLLM's range (clients send -1); s mod 2**63
            object.__setattr__(self, "seed", self.seed % (MAX_SEED + 1))
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens={shown(self.min_tokens)} must be an integer in [0, max_tokens]")
        _number("presence_penalty", self.presence_penalty, -2, 2)
        _number("frequency_penalty", self.frequency_penalty, -2, 2)
        _number("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY,
                1 / MIN_REPETITION_PENALTY)
        for tok, bias in self.logit_bias:
            _check(_is_int(tok) and tok >= 0,
                   f"logit_bias key {shown(tok)} must be a token id >= 0")
            _number(f"logit_bias[{shown(tok)}]", bias, -100, 100)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            _check(k is None or _is_int(k) and 0 <= k <= MAX_LOGPROBS,
                   f"{name}={shown(k)} must be an integer in [0, {MAX_LOGPROBS}]")
        _check(len(self.stop_token_ids) <= MAX_STOP_IDS,
               f"stop_token_ids has {len(self.stop_token_ids)} entries; send at most {MAX_STOP_IDS}")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids={list(self.stop_token_ids)[:8]!r} must be token ids >= 0")

    def for_choice(self, i: int) -> "SamplingParams":
        """Choice i >= 1 of n: seed + i (mod 2**63), no prompt logprobs (choice 0 computes the
        prompt's). A copy that shares the validated tuples: an n = 128 request with 1024 stop ids
        must not validate them 127 times more."""
        new = object.__new__(SamplingParams)
        new.__dict__.update(self.__dict__)
        seed = None if self.seed is None else (self.seed + i) % (MAX_SEED + 1)
        object.__setattr__(new, "seed", seed)
        object.__setattr__(new, "prompt_logprobs", None)
        return new

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1)
