"""The engine: a request queue, continuous batching over KV slots, and token streaming.

One thread runs the step loop. Between steps, waiting requests take free KV slots (their whole
prompts are prefilled together in the next step, beside the running sequences' decode tokens);
finished requests leave and free their slots. Each step is one `LLM.step` (embedding, every rank,
every layer, every all-reduce, the head: at the coordinator or on rank 0) followed by the batched
sampler, which takes the step's argmax as it is where every row is plain greedy.

Callers get events through a callback invoked on the engine thread; `tpserve.serve.app` turns them
into asyncio queues. Without the thread (`start()` not called), `generate()` drives the same steps
in the caller's thread: that is `LLM.generate`, so there is one generation loop and one stop logic.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Callable

import torch

from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan
from tpserve.model.rank_head import MAX_DECODE_STEPS
from tpserve.serve.requests import Event, QueueFull, Request, RequestError, Stats
from tpserve.serve.sampling import (SampleRow, SamplingParams, TokenLogprob, needs_logits,
                                    prompt_logprobs, sample)
from tpserve.serve.stop import StopText

log = logging.getLogger(__name__)
# prompt_logprobs: the fp32 logits of every prompt row are computed (and, with the head on rank 0,
# shipped) at once; a request may ask for this much of them (2048 tokens of a 128K vocabulary).
PROMPT_LOGITS_BYTES = 1 << 30


def check_decode_steps(k) -> int:
    """`--decode-steps` / `decode_steps`, refused in one sentence outside [1, MAX_DECODE_STEPS]."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DECODE_STEPS:
        raise TpserveError(f"decode_steps={k!r} must be an integer in [1, {MAX_DECODE_STEPS}] "
                           f"(--decode-steps); 1 runs one step at a time")
    return k


class Engine:
    def __init__(self, llm, tokenizer=None, max_queue: int = 256, decode_steps: int = 1):
        self.llm, self.executor, self.head, self.cfg = llm, llm.executor, llm.head, llm.cfg
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.decode_steps = check_decode_steps(decode_steps)
        self.max_len = self.executor.max_len
        self.num_slots = self.executor.num_slots
        self.free_slots = list(range(self.num_slots))
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

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse what cannot run here, in one sentence (the HTTP layer answers it with 400)."""
        vocab = self.cfg.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty; send at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt) + 1 > self.max_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens but the context holds "
                               f"{self.max_len}; shorten the prompt")
        if len(prompt) + params.max_tokens > self.max_len:
            raise RequestError(f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} "
                               f"exceeds the context of {self.max_len}; shorten one of them",
                               "max_tokens")
        if params.prompt_logprobs is not None and len(prompt) * vocab * 4 > PROMPT_LOGITS_BYTES:
            raise RequestError(f"prompt_logprobs over a prompt of {len(prompt)} tokens needs its "
                               f"{len(prompt)} x {vocab} fp32 logits at once, over the "
                               f"{PROMPT_LOGITS_BYTES >> 20} MiB this server allows a request; "
                               f"shorten the prompt or leave prompt_logprobs out", "prompt_logprobs")
        if params.max_token_id() >= vocab:
            raise RequestError(f"token id {params.max_token_id()} in logit_bias or stop_token_ids"
                               f" is outside the vocabulary [0, {vocab})", "logit_bias")

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> int:
        self.check(prompt, params)
        stop_text = StopText(self.tokenizer, params.stop) if self.tokenizer is not None else None
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            req = Request(next(self._ids), list(prompt), params, on_event, stop_text)
            req.row = SampleRow(params, req.prompt, req.output, tuple(self.cfg.eos_token_ids))
            self.waiting.append(req)
        self._wake.set()
        return req.id

    def generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """Blocking: one request through the batching loop (in this thread if none runs)."""
        done, out, err = threading.Event(), [], []

        def on_event(ev: Event):
            out.extend(ev.token_ids)
            if ev.finished:
                if ev.error:
                    err.append(ev.error)
                done.set()
        rid = self.submit(prompt, params, on_event)
        if self._thread is None:
            try:
                while not done.is_set():
                    self._admit()
                    self._step()
            except BaseException:  # the caller sees the step's own error; the slot comes back
                self.cancel(rid)
                self._admit()
                raise
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

    def _burst(self, reqs: list[Request]) -> int:
        """How many greedy decode steps the ranks may run in one go (`Executor.decode_ids`): more
        than 1 only while every running request decodes greedily without logits, no request
        waits (a burst would delay its admission, and a request that stops early would hold its
        slot to the burst's end), and each has at least that many tokens left before its limit."""
        if self.decode_steps == 1 or self.waiting or \
                any(not r.output for r in reqs) or needs_logits([r.row for r in reqs]):
            return 1
        left = min(min(r.params.max_tokens - len(r.output),
                       self.max_len - len(r.prompt) - len(r.output)) for r in reqs)
        return max(1, min(self.decode_steps, left))

    def _decode_burst(self, reqs: list[Request], k: int) -> bool:
        """k decode steps of `reqs` in one executor call; False where the executor cannot."""
        t0 = time.perf_counter()
        plan = StepPlan(slots=[r.slot for r in reqs], starts=[r.position for r in reqs],
                        lens=[1] * len(reqs))
        ids = torch.as_tensor([r.output[-1] for r in reqs], dtype=torch.long)
        toks = self.executor.decode_ids(ids, plan, k)
        if toks is None:
            return False
        live = {r.id for r in reqs}
        for row in toks.tolist():  # a request that stops drops the tokens computed after it
            for req, tok in zip(reqs, row):
                if req.id in live:
                    self._advance(req, tok, None, None)
            live = {r.id for r in self.running}
        dt = time.perf_counter() - t0
        self.stats.steps += k
        self.stats.step_seconds += dt
        self.stats.last_step_seconds = dt / k
        return True

    def _step(self) -> None:
        reqs = list(self.running)
        k = self._burst(reqs)
        if k > 1 and self._decode_burst(reqs, k):
            return
        t0 = time.perf_counter()
        ids, slots, starts, lens, out_rows, spans = [], [], [], [], [], []
        for req in reqs:
            new = req.output[-1:] if req.output else req.prompt  # decode token, or whole prompt
            if not req.output:
                self.stats.prompt_tokens += len(new)
            first, row = len(out_rows), len(ids)
            if not req.output and req.params.prompt_logprobs is not None:
                out_rows.extend(range(row, row + len(new)))  # every prompt row: echo's logprobs
            else:
                out_rows.append(row + len(new) - 1)
            spans.append((first, len(out_rows)))
            ids.extend(new)
            slots.append(req.slot)
            starts.append(req.position)
            lens.append(len(new))
        plan = StepPlan(slots=slots, starts=starts, lens=lens, out_rows=out_rows)
        with torch.inference_mode():
            need = len(out_rows) != len(reqs) or needs_logits([r.row for r in reqs])
            logits, argmax = self.llm.step(torch.as_tensor(ids, dtype=torch.long), plan, need)
            if len(out_rows) != len(reqs):  # prompt rows too: each request's last row
                last_rows = [b - 1 for _, b in spans]
                last = logits[last_rows]
                argmax = None if argmax is None else argmax[last_rows]
            else:
                last = logits
            sampled = self._sample(last, reqs, argmax)
            prompt_lps = {i: prompt_logprobs(logits[a:b], reqs[i].prompt,
                                             reqs[i].params.prompt_logprobs)
                          for i, (a, b) in enumerate(spans) if b - a > 1}
        for i, (req, (tok, lp)) in enumerate(zip(reqs, sampled)):
            if tok is None:
                self._fail(req, lp)
            else:
                self._advance(req, tok, lp, prompt_lps.get(i))
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.step_seconds += dt
        self.stats.last_step_seconds = dt

    def _sample(self, logits: torch.Tensor, reqs: list[Request],
                argmax: torch.Tensor | None = None) -> list[tuple]:
        """(token, logprob) per request; (None, message) for a row that cannot be sampled.
        `argmax`: the logits' argmax where the step computed it with the head (greedy rows take
        it; `logits` may then be None, see `needs_logits`).

        Parameters are validated before they get here; should one row still break the batched
        sampler, the rows are redone one by one so only that request fails, never the step.
        """
        try:
            return list(zip(*sample(logits, [r.row for r in reqs], argmax)))
        except Exception as e:
            log.error("batched sampling failed (%s: %s); sampling row by row", type(e).__name__, e)
        out = []
        for i, req in enumerate(reqs):
            try:
                toks, lps = (sample(None, [req.row], argmax[i:i + 1]) if logits is None
                             else sample(logits[i:i + 1], [req.row]))
                out.append((toks[0], lps[0]))
            except Exception as e:
                out.append((None, f"sampling failed for this request: {type(e).__name__}: {e}"))
        return out

    def _advance(self, req: Request, tok: int, lp: TokenLogprob | None,
                 prompt_lps: list | None) -> None:
        req.output.append(tok)
        self.stats.tokens_generated += 1
        p = req.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.cfg.eos_token_ids))
        reason = None
        if tok in stops and len(req.output) >= p.min_tokens:
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            reason = "length"
        text = ""
        if req.stop_text is not None:
            text, hit = req.stop_text.update(req.output, reason is not None,
                                             len(req.output) >= p.min_tokens)
            reason = "stop" if hit else reason
        req.on_event(Event(req.id, [tok], text, reason is not None, reason,
                           logprobs=None if lp is None else [lp], prompt_logprobs=prompt_lps))
        if reason is not None:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        self.running.remove(req)
        with self._lock:
            self.free_slots.append(req.slot)
        self.stats.finish_reasons[reason] += 1
        if reason == "error":
            self.stats.requests_failed += 1
        else:
            self.stats.requests_finished += 1

    def _fail(self, req: Request, message: str) -> None:
        self._finish(req, "error")
        req.on_event(Event(req.id, [], "", True, "error", message))

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
            self._fail(req, message)
