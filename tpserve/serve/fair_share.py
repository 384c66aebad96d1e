"""Which waiting request takes a free KV slot: the first, in arrival order, of those whose client
request runs the fewest sequences, and among those has had the fewest slots (the engine's
admission asks this).

Requests wait one per choice, and one HTTP request may queue up to --max-queue of them (n
choices of each of its prompts, `Request.group`). Taken strictly in arrival order, a request of
128 choices that run to the end of the context held every slot until its last choices started:
a one-token request behind it waited minutes. Here a slot goes to the group running the fewest
sequences (ties: the one that has had fewer slots, then arrival order), so a request arriving
behind a large one starts at the next free slot (with one slot: after the choice running now),
and a lone client still gets every slot. A first choice that ends hands its slot to a later
choice of its prompt (`shared_prompts.take_over`) only where that is as fair.
"""

from __future__ import annotations

import collections

from tpserve.serve.requests import Request
from tpserve.serve.shared_prompts import shared_rows, take_over


def _loads(running, new=()) -> collections.Counter:
    load = collections.Counter(r.group for r in running)
    load.update(r.group for r in new)
    return load


def next_admission(waiting, new: list[Request],
                   running: list[Request]) -> tuple[Request, int] | None:
    """(the waiting request to admit next, its prompt rows to copy from another choice:
    `shared_rows`), or None where none can start in this step. The caller counts the admission
    (`Group.admitted`)."""
    load = _loads(running, new)
    unstarted = {r.id for r in waiting} | {r.id for r in new}
    best = None
    for req in waiting:
        key = (load[req.group], req.group.admitted)
        if best is not None and key >= best[2]:
            continue  # no better than the one found (the same group's later choices: cheap)
        shared = shared_rows(req, unstarted, running)
        if shared is None:  # its first choice has not run its prompt yet
            continue
        best = (req, shared, key)
        if key == (0, 0):
            break
    return None if best is None else best[:2]


def hand_over(req: Request, waiting, running: list[Request]) -> Request | None:
    """Finished first choice `req`'s slot to a later choice of its prompt (`take_over`) -> that
    heir, where fair: no other group waits that runs fewer sequences than req's, or as many but
    has had fewer slots. Else None (the slot frees), and the choices waiting for req's prompt
    rows copy them from a running choice of the same prompt instead, where one holds them (a
    request of 128 choices would otherwise prefill its prompt 127 more times)."""
    load = _loads(r for r in running if r is not req)
    mine = (load[req.group], req.group.admitted)
    if not any((load[r.group], r.group.admitted) < mine for r in waiting
               if r.group is not req.group):
        heir = take_over(req, waiting)
        if heir is not None:
            heir.group.admitted += 1
        return heir
    source = next((r for r in running if r.group is req.group and r is not req
                   and (r.output or r.cached) and r.prompt == req.prompt), None)
    for r in waiting:
        if r.share is req:
            r.share = source
    return None
