"""The engine: a request queue, continuous batching over KV slots, and token streaming.

One thread runs the step loop. Between steps, waiting requests take free KV slots, the fewest-
holding client request first (`fair_share.py`; whole prompts prefilled together in the next step,
beside the running decode tokens); finished requests free theirs. Each step is one executor call
(`tpserve.serve.batch`): one `LLM.step` and the batched sampler, or, where every running request
decodes greedily (or sampled where the ranks sample: rank 0 holding the head) and none waits, a
burst of up to `decode_steps` decode steps.

Callers get events through a callback invoked on the engine thread; `tpserve.serve.app` turns them
into asyncio queues, and queues a request's n choices all or none (`submit_many`). Without the
thread (`start()` not called), `generate()` drives the same steps in the caller's thread (that is
`LLM.generate`: one generation loop, one stop logic).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Callable

from tpserve.errors import TpserveError, client_message
from tpserve.serve.batch import burst_len, check_decode_steps, decode_burst, step_batch
from tpserve.serve.fair_share import hand_over, next_admission
from tpserve.serve import request_checks
from tpserve.serve.request_checks import check_request
from tpserve.serve.requests import Event, Group, QueueFull, Request, Stats
from tpserve.serve.sampling import SampleRow, TokenLogprob
from tpserve.serve.sampling_params import SamplingParams
from tpserve.serve.shared_prompts import copy_prompt, share_prompt
from tpserve.serve.stop import StopText

log = logging.getLogger(__name__)
# Prompt tokens one step prefills (whole prompts: the requests admitted for the step until the
# next would pass this; a single longer prompt still runs, alone): every free slot prefilling
# a long prompt in one step would need activations for all of them at once.
DEFAULT_MAX_PREFILL_TOKENS = 8192
# Request ids, unique in the process: engines over one LLM share its executor, whose rank-0
# sampler keeps state by request id (`tpserve.serve.rank_sampling`).
_REQUEST_IDS = itertools.count()


class Engine:
    def __init__(self, llm, tokenizer=None, max_queue: int = 256, decode_steps: int = 1,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS):
        self.llm, self.executor, self.head, self.cfg = llm, llm.executor, llm.head, llm.cfg
        self.tokenizer, self.max_queue = tokenizer, max_queue
        if not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise TpserveError(f"max_prefill_tokens={max_prefill_tokens!r} must be a positive "
                               f"integer (--max-prefill-tokens)")
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_steps = check_decode_steps(decode_steps)
        # Bursts (greedy or sampled) need the head in the ranks' step, where they also sample.
        self._sampled_bursts = self.executor.ranks_sample
        self.max_len, self.num_slots = self.executor.max_len, self.executor.num_slots
        self.free_slots = list(range(self.num_slots))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stats, self._ids = Stats(), _REQUEST_IDS
        self._lock, self._wake, self._stop = threading.Lock(), threading.Event(), False
        self._cancelled: set[int] = set()
        self._thread: threading.Thread | None = None

    # ---- API -----------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self.decode_steps > 1:
            log.info("decode: %s", f"bursts of up to {self.decode_steps} steps per call while "
                     f"every request decodes and none waits (the ranks hold the head)"
                     if self._sampled_bursts else "one step per call (the head runs at the "
                     "coordinator; --head-at rank0 puts it on rank 0, where steps can burst)")
        self._thread = threading.Thread(target=self._loop, name="tpserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    queue_depth = property(lambda self: len(self.waiting))
    alive = property(lambda self: self._thread is not None and self._thread.is_alive())

    def cancel(self, request_id: int) -> None:
        """Drop a request (its client went away); its KV slot frees before the next step."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def check(self, prompt: list[int], params: list[SamplingParams]) -> None:
        """Refuse what cannot run here, in one sentence (the HTTP layer answers it with 400)."""
        check_request(prompt, params, self.cfg.vocab_size, self.max_len)

    def check_room(self, n: int) -> None:
        """QueueFull unless n more requests fit the queue (checked again under the lock)."""
        QueueFull.check(len(self.waiting), n, self.max_queue)

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> int:
        return self.submit_many(prompt, [params], [on_event])[0]

    def submit_many(self, prompt: list[int], params: list[SamplingParams],
                    on_events: list[Callable[[Event], None]], checked: bool = False,
                    group: Group | None = None) -> list[int]:
        """One request per params (the n choices of one prompt), queued all or none: where the
        queue has no room for all of them, QueueFull with nothing queued (nothing to withdraw);
        `checked`: the caller ran `check` (HTTP, on choice 0: `for_choice` relaxes the others);
        `group`: the client request they belong to (`fair_share.py`; default: their own)."""
        group = Group() if group is None else group
        if not checked:
            self.check(prompt, params)
        automata: dict = {}  # one stop string's automaton serves every choice (read-only)
        stops = [StopText(self.tokenizer, p.stop, automata) if self.tokenizer is not None else None
                 for p in params]
        with self._lock:
            self.check_room(len(params))
            reqs = [Request(next(self._ids), list(prompt), p, on_event, stop, group=group)
                    for p, on_event, stop in zip(params, on_events, stops)]
            share_prompt(reqs)  # prefilled once (`_admit`, `shared_prompts.py`)
            for req in reqs:
                req.row = SampleRow(req.params, req.prompt, req.output,
                                    tuple(self.cfg.eos_token_ids))
            self.waiting.extend(reqs)
        self._wake.set()
        return [req.id for req in reqs]

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
            tokens = logit_bytes = 0  # what this step's prefills take: at least one request
            while self.waiting and self.free_slots:
                pick = next_admission(self.waiting, new, self.running)
                if pick is None:
                    break  # later choices, after the step that runs their prompt
                req, shared = pick
                tokens += len(req.prompt) - shared
                if req.params.prompt_logprobs is not None:
                    logit_bytes += len(req.prompt) * self.cfg.vocab_size * 4
                if new and (tokens > self.max_prefill_tokens or
                            logit_bytes > request_checks.PROMPT_LOGITS_BYTES):
                    break  # the next step takes it
                self.waiting.remove(req)
                req.slot, req.group.admitted = self.free_slots.pop(0), req.group.admitted + 1
                self.stats.prompt_tokens_shared += copy_prompt(req, shared)
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
                self._fail_all(client_message("the engine's step failed", e, log))
                self._recover()

    def _step(self) -> None:
        reqs = list(self.running)
        k = burst_len(reqs, self.decode_steps, bool(self.waiting), self.max_len,
                      self._sampled_bursts)
        if k > 1 and self._decode_burst(reqs, k):
            return
        t0 = time.perf_counter()
        self.stats.prompt_tokens += sum(len(r.prompt) for r in reqs if not r.output)
        sampled, prompt_lps = step_batch(self.llm, reqs)
        for i, (req, (tok, lp)) in enumerate(zip(reqs, sampled)):
            if tok is None:
                self._fail(req, lp)
            else:
                self._advance(req, tok, lp, prompt_lps.get(i))
        self._timed(1, time.perf_counter() - t0)

    def _decode_burst(self, reqs: list[Request], k: int) -> bool:
        """k decode steps of `reqs` in one executor call; False where the executor cannot."""
        t0 = time.perf_counter()
        toks = decode_burst(self.executor, reqs, k)
        if toks is None:
            return False
        live = {r.id for r in reqs}
        for row in toks:  # a request that stops drops the tokens computed after it
            for req, (tok, lp) in zip(reqs, row):
                if req.id not in live:
                    continue
                if tok is None:
                    self._fail(req, lp)
                else:
                    self._advance(req, tok, lp, None)
            live = {r.id for r in self.running}
        self._timed(k, time.perf_counter() - t0)
        return True

    def _timed(self, steps: int, seconds: float) -> None:
        """Count `steps` steps that took `seconds` together (a burst's steps share its time)."""
        self.stats.steps += steps
        self.stats.step_seconds += seconds
        self.stats.last_step_seconds = seconds / steps

    def _advance(self, req: Request, tok: int, lp: TokenLogprob | None,
                 prompt_lps: list | None) -> None:
        req.output.append(tok)
        self.stats.tokens_generated += 1
        p = req.params
        if req.stops is None:  # once per request, not per token
            req.stops = frozenset(p.stop_token_ids).union(() if p.ignore_eos
                                                          else self.cfg.eos_token_ids)
        reason = None
        if tok in req.stops and len(req.output) >= p.min_tokens:
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            reason = "length"
        text = ""
        if req.stop_text is not None:  # a stop token ends the answer, not its text (as vLLM)
            shown = req.output[:-1] if reason == "stop" else req.output
            text, hit = req.stop_text.update(shown, reason is not None,
                                             len(req.output) >= p.min_tokens)
            reason = "stop" if hit else reason
        req.on_event(Event(req.id, [tok], text, reason is not None, reason,
                           logprobs=None if lp is None else [lp], prompt_logprobs=prompt_lps))
        if reason is not None:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        self.running.remove(req)
        with self._lock:
            heir = None if reason == "error" else hand_over(req, self.waiting, self.running)
            if heir is None:
                self.free_slots.append(req.slot)
        if heir is not None:  # a later choice of its prompt runs in its slot
            self.stats.prompt_tokens_shared += heir.cached
            self.running.append(heir)
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
