"""Which waiting request takes a free KV slot: the first, in arrival order, of those whose client
request holds the fewest slots (the engine's admission asks this).

Requests wait one per choice, and one HTTP request may queue up to --max-queue of them (n
choices of each of its prompts, `Request.group`). Taken strictly in arrival order, a request of
128 choices that run to the end of the context held every slot until its last choices started:
a one-token request behind it waited minutes. Here a slot goes to the group running the fewest
sequences (ties: arrival order), so a request arriving behind a large one starts at the next
free slot, and a lone client still gets every slot. A first choice that ends hands its slot to a
later choice of its prompt (`shared_prompts.take_over`) only where no other group waits with
fewer slots.
"""

from __future__ import annotations

import collections

from tpserve.serve.requests import Request
from tpserve.serve.shared_prompts import shared_rows


def next_admission(waiting, new: list[Request],
                   running: list[Request]) -> tuple[Request, int] | None:
    """(the waiting request to admit next, its prompt rows to copy from another choice:
    `shared_rows`), or None where none can start in this step."""
    load = collections.Counter(r.group for r in running)
    load.update(r.group for r in new)
    unstarted = {r.id for r in waiting} | {r.id for r in new}
    best = None
    for req in waiting:
        held = load[req.group]
        if best is not None and held >= best[2]:
            continue  # no better than the one found (the same group's later choices: cheap)
        shared = shared_rows(req, unstarted, running)
        if shared is None:  # its first choice has not run its prompt yet
            continue
        best = (req, shared, held)
        if held == 0:
            break
    return None if best is None else best[:2]


def heir_may_take_slot(req: Request, waiting, running: list[Request]) -> bool:
    """Whether finished `req`'s slot may pass to a later choice of its prompt: unless another
    group waits that runs fewer sequences than req's will without it."""
    load = collections.Counter(r.group for r in running if r is not req)
    mine = load[req.group]
    return not any(load[r.group] < mine for r in waiting if r.group is not req.group)
