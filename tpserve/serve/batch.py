"""One executor call for the engine's running requests: a batched step or a decode burst.

A step lays each request's new tokens (its last token while it decodes, its whole prompt when it
starts: prefill; only the prompt's last token where it copies the rest from another choice of its
request, `StepPlan.copies`) side by side in one `StepPlan`, runs one `LLM.step` (embedding, every rank, every
layer, every all-reduce, the head: at the coordinator or on rank 0) and samples each request's last
row with the batched sampler, which takes the step's argmax as it is where every row is plain
greedy; where the ranks sample (`sample_ids`: rank 0 of Ray ranks holding the head, or one
in-process rank), they sample it. A decode burst asks the executor for K decode steps at once:
greedy ones (`Executor.decode_ids`) where the ranks hold the head, sampled ones where they also
sample (`sample_burst`); each step's token feeds the next on the ranks. What the tokens mean for
each request (stops, events, slots) is the engine's business, not this module's.
"""

from __future__ import annotations

import torch

from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan
from tpserve.model.rank_head import MAX_DECODE_STEPS
from tpserve.serve.requests import Request
from tpserve.serve.rank_sampling import sample_each
from tpserve.serve.sampling import needs_logits, prompt_logprobs


def check_decode_steps(k) -> int:
    """`--decode-steps` / `decode_steps`, refused in one sentence outside [1, MAX_DECODE_STEPS]."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DECODE_STEPS:
        raise TpserveError(f"decode_steps={k!r} must be an integer in [1, {MAX_DECODE_STEPS}] "
                           f"(--decode-steps); 1 runs one step at a time")
    return k


def burst_len(reqs: list[Request], decode_steps: int, waiting: bool, max_len: int,
              sampled: bool = False) -> int:
    """How many decode steps to ask the ranks for in one go (they may answer None: then one):
    more than 1 only while every running request decodes, greedily without logits
    (`Executor.decode_ids`) or, where `sampled` (`Executor.ranks_sample`), in any way;
    no request waits (a burst would delay its admission, and a request that stops early would
    hold its slot to the burst's end); and each has at least that many tokens left before its
    limit."""
    if decode_steps == 1 or waiting or any(not r.output for r in reqs) or \
            not sampled and needs_logits([r.row for r in reqs]):
        return 1
    left = min(min(r.params.max_tokens - len(r.output),
                   max_len - len(r.prompt) - len(r.output)) for r in reqs)
    return max(1, min(decode_steps, left))


def decode_burst(executor, reqs: list[Request], k: int) -> list[list[tuple]] | None:
    """k decode steps of `reqs` in one executor call -> k rows of (token, logprob) per request,
    as `sample_each` gives them; None where the executor cannot (the caller steps one at a
    time)."""
    plan = StepPlan(slots=[r.slot for r in reqs], starts=[r.position for r in reqs],
                    lens=[1] * len(reqs))
    ids = torch.as_tensor([r.output[-1] for r in reqs], dtype=torch.long)
    if needs_logits([r.row for r in reqs]):  # sampled: the ranks sample each step
        return executor.sample_burst(ids, plan, reqs, k)
    toks = executor.decode_ids(ids, plan, k)
    return None if toks is None else [[(t, None) for t in row] for row in toks.tolist()]


def step_batch(llm, reqs: list[Request]) -> tuple[list[tuple], dict[int, list]]:
    """One step of `reqs` -> ((token, logprob) per request, as `sample_rows` gives them; the
    prompt logprobs of each request `i` that asked for them, by `i`)."""
    ids, slots, starts, lens, out_rows, spans, echoed = [], [], [], [], [], [], []
    copies = [req.copy for req in reqs if req.copy is not None]
    for i, req in enumerate(reqs):
        req.copy = None  # made by this step
        # decode token, or the prompt (past the rows copied from another choice)
        new = req.output[-1:] if req.output else req.prompt[req.cached:]
        first, row = len(out_rows), len(ids)
        if not req.output and req.params.prompt_logprobs is not None:
            out_rows.extend(range(row, row + len(new)))  # every prompt row: echo's logprobs
            echoed.append(i)
        else:
            out_rows.append(row + len(new) - 1)
        spans.append((first, len(out_rows)))
        ids.extend(new)
        slots.append(req.slot)
        starts.append(req.position)
        lens.append(len(new))
    plan = StepPlan(slots=slots, starts=starts, lens=lens, out_rows=out_rows, copies=copies)
    ids = torch.as_tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        need = len(out_rows) != len(reqs) or bool(echoed) or needs_logits([r.row for r in reqs])
        ranked = llm.executor.sample_ids(ids, plan, reqs, bool(echoed)) if need else None
        if ranked is not None:  # rank 0 sampled (`rank_sampling`); logits only for echo
            sampled, logits = ranked
            return sampled, {i: prompt_logprobs(logits[spans[i][0]:spans[i][1]], reqs[i].prompt,
                                                reqs[i].params.prompt_logprobs) for i in echoed}
        logits, argmax = llm.step(ids, plan, need)
        if len(out_rows) != len(reqs):  # prompt rows too: each request's last row
            last_rows = [b - 1 for _, b in spans]
            last = logits[last_rows]
            argmax = None if argmax is None else argmax[last_rows]
        else:
            last = logits
        sampled = sample_each(last, [r.row for r in reqs], argmax)
        prompt_lps = {i: prompt_logprobs(logits[spans[i][0]:spans[i][1]], reqs[i].prompt,
                                         reqs[i].params.prompt_logprobs) for i in echoed}
    return sampled, prompt_lps

