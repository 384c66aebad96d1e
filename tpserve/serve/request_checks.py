"""What a request must satisfy to run on this model (`Engine.check`, before it is queued): each
refusal one sentence naming the field and the fix, which the HTTP layer answers with 400."""

from __future__ import annotations

from tpserve.errors import shown
from tpserve.serve.requests import RequestError
from tpserve.serve.sample_sync import wire_problem
from tpserve.serve.sampling_params import SamplingParams

# prompt_logprobs: the fp32 logits of every prompt row are computed (and, with the head on rank 0,
# shipped) at once; a request may ask for this much of them (2048 tokens of a 128K vocabulary).
PROMPT_LOGITS_BYTES = 1 << 30


def check_request(prompt: list[int], params: list[SamplingParams], vocab: int,
                  max_len: int) -> None:
    """The prompt once, then each choice's parameters, for a `vocab`-token model whose context
    holds `max_len` tokens."""
    if not prompt:
        raise RequestError("the prompt is empty; send at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {shown(bad[0])} is outside the vocabulary [0, {vocab})")
    if len(prompt) + 1 > max_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens but the context holds "
                           f"{max_len}; shorten the prompt")
    for p in params:
        _check_params(len(prompt), p, vocab, max_len)


def _check_params(n: int, params: SamplingParams, vocab: int, max_len: int) -> None:
    if n + params.max_tokens > max_len:
        raise RequestError(f"prompt of {n} tokens + max_tokens={shown(params.max_tokens)} "
                           f"exceeds the context of {max_len}; shorten one of them", "max_tokens")
    if params.prompt_logprobs is not None and n * vocab * 4 > PROMPT_LOGITS_BYTES:
        raise RequestError(f"prompt_logprobs over a prompt of {n} tokens needs its "
                           f"{n} x {vocab} fp32 logits at once, over the "
                           f"{PROMPT_LOGITS_BYTES >> 20} MiB this server allows a request; "
                           f"shorten the prompt or leave prompt_logprobs out", "prompt_logprobs")
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                      ("stop_token_ids", params.stop_token_ids)):
        if ids and max(ids) >= vocab:
            raise RequestError(f"token id {shown(max(ids))} in {name} is outside the vocabulary "
                               f"[0, {vocab})", name)
    problem = wire_problem(params)
    if problem is not None:
        raise RequestError(f"the request cannot run: {problem}")
