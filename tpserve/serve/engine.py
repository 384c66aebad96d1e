"""The engine: a request queue, continuous batching over KV slots, and token streaming.

One thread runs the step loop. Between steps, waiting requests take free KV slots (their whole
prompts are prefilled together in the next step, beside the running sequences' decode tokens);
finished requests leave and free their slots. Each step is one `executor.step` (every rank, every
layer, every all-reduce) followed by the head and the sampler at the coordinator.

Callers get events through a callback invoked on the engine thread; `tpserve.serve.server` turns them
into asyncio queues.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan
from tpserve.serve.sampling import SamplingParams, make_generator, sample

log = logging.getLogger(__name__)


class QueueFull(TpserveError):
    """The request queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass
class Event:
    request_id: int
    token_ids: list[int]  # new tokens in this event
    text: str  # new text in this event (stop strings already cut)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    slot: int = -1
    output: list[int] = field(default_factory=list)
    text_sent: str = ""
    generator: torch.Generator | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def position(self) -> int:
        """Tokens already in the KV cache."""
        return len(self.prompt) + len(self.output) - 1 if self.output else 0


@dataclass
class Stats:
    steps: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    step_seconds: float = 0.0
    last_step_seconds: float = 0.0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    recoveries: int = 0


class Engine:
    def __init__(self, llm, tokenizer=None, max_queue: int = 256):
        self.llm, self.executor, self.head, self.cfg = llm, llm.executor, llm.head, llm.cfg
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_len = self.executor.max_len
        self.free_slots = list(range(self.executor.num_slots))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stats = Stats()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._cancelled: set[int] = set()
        self._thread: threading.Thread | None = None

    # ---- API -----------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="tpserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cancel(self, request_id: int) -> None:
        """Drop a request (its client went away); its KV slot frees before the next step."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> int:
        if not prompt:
            raise TpserveError("the prompt is empty; send at least one token")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise TpserveError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(prompt) + 1 > self.max_len:
            raise TpserveError(f"the prompt has {len(prompt)} tokens but the context holds "
                               f"{self.max_len}; shorten the prompt")
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            req = Request(next(self._ids), list(prompt), params, on_event,
                          generator=make_generator(params))
            self.waiting.append(req)
        self._wake.set()
        return req.id

    def generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """Blocking convenience: run one request through the batching loop."""
        done, out, err = threading.Event(), [], []

        def on_event(ev: Event):
            out.extend(ev.token_ids)
            if ev.finished:
                if ev.error:
                    err.append(ev.error)
                done.set()
        self.submit(prompt, params, on_event)
        done.wait()
        if err:
            raise TpserveError(err[0])
        return out

    # ---- the loop ------------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        new = []
        with self._lock:
            if self._cancelled:
                kept = collections.deque(r for r in self.waiting if r.id not in self._cancelled)
                self.stats.requests_cancelled += len(self.waiting) - len(kept)
                self.waiting = kept
                for req in [r for r in self.running if r.id in self._cancelled]:
                    self.running.remove(req)
                    self.free_slots.append(req.slot)
                    self.stats.requests_cancelled += 1
                self._cancelled.clear()
            while self.waiting and self.free_slots:
                req = self.waiting.popleft()
                req.slot = self.free_slots.pop(0)
                new.append(req)
        self.running.extend(new)
        return new

    def _loop(self) -> None:
        while not self._stop:
            self._admit()
            if not self.running:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # a failed step fails every request in it, loudly
                log.error("step failed: %s: %s", type(e).__name__, e)
                self._fail_all(str(e) if isinstance(e, TpserveError) else f"{type(e).__name__}: {e}")
                self._recover()

    def _step(self) -> None:
        t0 = time.perf_counter()
        ids, slots, starts, lens = [], [], [], []
        for req in self.running:
            if req.output:  # decode: the last sampled token
                ids.append(req.output[-1])
                starts.append(req.position)
                lens.append(1)
            else:  # prefill: the whole prompt
                ids.extend(req.prompt)
                starts.append(0)
                lens.append(len(req.prompt))
                self.stats.prompt_tokens += len(req.prompt)
            slots.append(req.slot)
        plan = StepPlan(slots=slots, starts=starts, lens=lens)
        plan.out_rows = plan.last_rows()
        with torch.inference_mode():
            h = self.head.embed(torch.as_tensor(ids, dtype=torch.long))
            logits = self.head.logits(self.executor.step(h, plan))
        for req, row in zip(list(self.running), logits):
            self._advance(req, sample(row, req.params, req.generator))
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.step_seconds += dt
        self.stats.last_step_seconds = dt

    def _advance(self, req: Request, tok: int) -> None:
        now = time.monotonic()
        req.first_token_at = req.first_token_at or now
        req.output.append(tok)
        self.stats.tokens_generated += 1
        p = req.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.cfg.eos_token_ids))
        reason = None
        if tok in stops:
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            reason = "length"
        new_text = ""
        if self.tokenizer is not None:
            # Decode the whole output each time: byte-level tokens may complete a character late.
            text = self.tokenizer.decode(req.output, skip_special_tokens=True)
            hit = min((text.find(s) for s in p.stop if s and s in text), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop"
            if not text.endswith("\ufffd") or reason:
                new_text, req.text_sent = text[len(req.text_sent):], text
        req.on_event(Event(req.id, [tok], new_text, reason is not None, reason))
        if reason is not None:
            self._finish(req)

    def _finish(self, req: Request) -> None:
        self.running.remove(req)
        with self._lock:
            self.free_slots.append(req.slot)
        self.stats.requests_finished += 1

    def _recover(self) -> None:
        """Rebuild the ranks (Ray executor) so the server serves again without a restart."""
        while not self._stop:
            try:
                self.executor.recover()
                self.stats.recoveries += 1
                return
            except Exception as e:
                log.error("recovery failed (%s); retrying in 5s", e)
                time.sleep(5)

    def _fail_all(self, message: str) -> None:
        for req in list(self.running):
            self.running.remove(req)
            with self._lock:
                self.free_slots.append(req.slot)
            self.stats.requests_failed += 1
            req.on_event(Event(req.id, [], "", True, "error", message))
