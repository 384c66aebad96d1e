"""The n choices of one request prefill their prompt once (the engine's admission asks these).

Choices 1..n-1 point at choice 0 (`Request.share`). Admitted after choice 0 has run its prompt,
a later choice copies the prompt's KV rows but the last from choice 0's slot (`StepPlan.copies`,
made by the ranks before the step) and runs only the prompt's last token. Where choice 0 ends
while later choices still wait for a slot, the next of them takes over its slot, prompt rows and
all, and the rest copy from that one (`take_over`); where it failed or was cancelled, each
prefills its own prompt.
"""

from __future__ import annotations

from tpserve.serve.requests import Request


def share_prompt(reqs: list[Request]) -> None:
    """Point the later choices of one prompt at the first, where they may share its KV rows: echo's
    prompt logprobs, where asked for, come from the first choice's prefill; a repetition penalty
    reads the prompt, which rank 0's sampler takes from the prefill step's token ids
    (`rank_sampling`), so such choices prefill their own."""
    if len(reqs[0].prompt) > 1 and all(r.params.prompt_logprobs is None
                                       and r.params.repetition_penalty == 1 for r in reqs[1:]):
        for req in reqs[1:]:
            req.share = reqs[0]


def shared_rows(req: Request, unstarted: set[int], running: list[Request]) -> int | None:
    """For a later choice of a prompt (`Request.share`): None while the first choice waits or
    starts in this step (its id in `unstarted`: admit it after); the prompt's KV rows it can
    copy from the first choice's slot (all but the last) once that one has run its prompt and
    still holds its slot (or has taken over the slot of one that ended, `take_over`); 0 where
    it failed or was cancelled (a prefill of its own)."""
    src = req.share
    if src is None:
        return 0
    if src.id in unstarted:
        return None
    return len(req.prompt) - 1 if (src.output or src.cached) and src in running else 0


def copy_prompt(req: Request, shared: int) -> int:
    """A choice admitted into its slot with `shared` (`shared_rows`) of its prompt's rows to copy
    from its source's slot in the step that starts it (`Request.copy`) -> shared."""
    if shared:
        req.cached, req.copy = shared, (req.share.slot, req.slot, shared)
    req.share = None
    return shared


def take_over(req: Request, waiting) -> Request | None:
    """A first choice `req` that ends while a later choice of its prompt still waits gives that
    one its slot, prompt rows and all (it runs the prompt's last token there, as a copy would),
    taken out of `waiting`; the choices behind it copy from it. Else each would prefill the
    prompt again (a request of n choices and max_tokens=1 would prefill it n times) -> the heir
    (to run), or None. Under the engine's lock."""
    heirs = [r for r in waiting if r.share is req]
    if not heirs:
        return None
    heir = heirs[0]
    waiting.remove(heir)
    heir.slot, heir.cached, heir.share = req.slot, len(req.prompt) - 1, None
    for r in heirs[1:]:
        r.share = heir
    return heir
