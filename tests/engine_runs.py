"""Running an engine's requests to their ends, for tests that compare what they produced."""

from __future__ import annotations

import threading

from tpserve.serve.requests import Event


def run_together(engine, prompts, params, timeout: float = 120) -> list[list[Event]]:
    """Submit every request before the engine's loop starts (the first step admits them
    together), run them to their ends, stop the engine -> each request's events, in order."""
    events, done = [[] for _ in prompts], threading.Semaphore(0)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        def on_event(ev, i=i):
            events[i].append(ev)
            if ev.finished:
                done.release()
        engine.submit(p, sp, on_event)
    drive(engine, done, len(prompts), timeout)
    return events


def drive(engine, done: threading.Semaphore, n: int, timeout: float = 120) -> None:
    """Start the engine's loop, wait until `done` is released n times (each request's end),
    stop the engine."""
    engine.start()
    try:
        for _ in range(n):
            assert done.acquire(timeout=timeout), "a request did not finish"
    finally:
        engine.stop()


def tokens(events: list[Event]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]
