"""What the engine keeps of a request, what it reports to its caller, and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tpserve.errors import TpserveError
from tpserve.serve.sampling import SampleRow, TokenLogprob
from tpserve.serve.sampling_params import SamplingParams
from tpserve.serve.stop import StopText

FINISH_REASONS = ("stop", "length", "error")


class QueueFull(TpserveError):
    """The request queue is at its bound: the caller should retry later (HTTP 429)."""

    @staticmethod
    def check(waiting: int, n: int, max_queue: int) -> None:
        """Raise unless n more requests fit a queue holding `waiting` of `max_queue`."""
        if waiting + n > max_queue:
            raise QueueFull(f"the request queue is full ({max_queue} waiting); retry later"
                            if n == 1 else f"the request queue is full for {n} choices "
                            f"({waiting} of {max_queue} waiting); retry later")


class RequestError(TpserveError):
    """A request this engine cannot run (HTTP 400); `param` names the field at fault."""

    def __init__(self, message: str, param: str = "prompt"):
        super().__init__(message)
        self.param = param


@dataclass
class Event:
    request_id: int
    token_ids: list[int]  # new tokens in this event
    text: str  # new text in this event (stop strings cut, possible stop-string starts held back)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # in the first event, when asked


class Group:
    """The choices of one client request (every prompt's n): how many of them have taken a KV
    slot so far (`fair_share.py` breaks ties between groups with it)."""
    __slots__ = ("admitted",)

    def __init__(self) -> None:
        self.admitted = 0


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    stop_text: StopText | None = None
    slot: int = -1
    output: list[int] = field(default_factory=list)
    row: SampleRow | None = None
    stops: frozenset[int] | None = None  # stop_token_ids and EOS ids (the engine's, once)
    # Another choice of the same prompt (the first of its request): where that one has run its
    # prompt by the time this one starts, this one copies the prompt's KV rows from its slot but
    # the last (`cached` of them, the copy itself in `copy` until the step that makes it) and
    # prefills only its last token.
    share: "Request | None" = field(default=None, repr=False, compare=False)
    cached: int = 0
    copy: tuple[int, int, int] | None = field(default=None, compare=False)
    # The client request it belongs to (every choice of every prompt of one HTTP request): slots
    # are shared out fairly between groups (`fair_share.py`)
    group: "Group | None" = field(default=None, repr=False, compare=False)

    @property
    def position(self) -> int:
        """Tokens already in the KV cache."""
        return len(self.prompt) + len(self.output) - 1 if self.output else self.cached


@dataclass
class Stats:
    steps: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    prompt_tokens_shared: int = 0  # of those, copied from another choice's KV rows
    step_seconds: float = 0.0
    last_step_seconds: float = 0.0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    recoveries: int = 0
    finish_reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
