"""KV slots are shared out between client requests: a waiting request of the client request
running the fewest sequences starts first (`fair_share.py`), so a request queued behind one of
many choices starts at the next free slot; the large request's choices still share their
prompt's prefill and produce what separate requests do."""

import threading

import pytest
import torch

import tpserve
from engine_runs import run_together, tokens
from tpserve.serve.engine import Engine
from tpserve.serve.fair_share import heir_may_take_slot, next_admission
from tpserve.serve.requests import Request
from tpserve.serve.sampling_params import SamplingParams
from tpserve.serve.shared_prompts import share_prompt
from test_rank_sampling import SMALL

PROMPT = [1, 17, 42, 99, 3, 250, 128, 64, 7, 9]


def _group(name: str, n: int, start: int) -> list[Request]:
    """n choices of one prompt, one client request's (ids from `start`)."""
    reqs = [Request(start + i, list(PROMPT), SamplingParams(), print, group=name)
            for i in range(n)]
    share_prompt(reqs)
    return reqs


def test_the_group_holding_fewest_slots_goes_first():
    a, b = _group("a", 3, 0), _group("b", 1, 10)
    assert next_admission(a + b, [], []) == (a[0], 0)  # arrival order among equals
    # a[1:] wait for a[0]'s prompt step: b starts beside a[0] rather than a step later
    assert next_admission(a[1:] + b, [a[0]], []) == (b[0], 0)
    a[0].output.append(5)
    # a runs two, b none: b's choice goes first although queued last
    assert next_admission(a[2:] + b, [], a[:2]) == (b[0], 0)
    # a lone client gets every slot, its later choices copying the first one's prompt rows
    assert next_admission(a[2:], [], a[:2]) == (a[2], len(PROMPT) - 1)
    assert next_admission(a[1:], [b[0]], [a[0]]) == (a[1], len(PROMPT) - 1)


def test_an_ended_first_choice_keeps_its_slot_for_its_prompt_only_where_fair():
    a, b = _group("a", 3, 0), _group("b", 1, 10)
    assert heir_may_take_slot(a[0], a[2:], [a[1]])  # no one else waits
    assert not heir_may_take_slot(a[0], a[2:] + b, [a[1]])  # b runs none, a one
    assert heir_may_take_slot(a[0], a[2:] + b, [b[0]])  # b already runs one, a none


@pytest.fixture(scope="module")
def two_slots():
    llm = tpserve.load(SMALL, tp=1, dtype=torch.float32, max_model_len=40, num_slots=2)
    yield llm
    llm.close()


def _run(llm, groups: list[tuple[list[list[int]], list[SamplingParams], object]]):
    """Queue each (prompts, choices' params, group) in order before the loop starts -> each
    choice's tokens per group, the order their first tokens came in, the engine's stats."""
    engine, lock, done = Engine(llm), threading.Lock(), threading.Semaphore(0)
    got, firsts, total = [], [], 0
    for k, (prompts, params, group) in enumerate(groups):
        got.append([[] for _ in range(len(prompts) * len(params))])
        for p, prompt in enumerate(prompts):
            def on_event(ev, key):
                with lock:
                    if not got[key[0]][key[1]]:
                        firsts.append(key)
                    got[key[0]][key[1]].extend(ev.token_ids)
                if ev.finished:
                    done.release()
            engine.submit_many(prompt, params, [lambda ev, key=(k, p * len(params) + i):
                                                on_event(ev, key) for i in range(len(params))],
                               group=group)
            total += len(params)
    engine.start()
    try:
        for _ in range(total):
            assert done.acquire(timeout=120), "a request did not finish"
    finally:
        engine.stop()
    assert sorted(engine.free_slots) == list(range(engine.num_slots))
    return got, firsts, engine.stats


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_a_request_behind_one_of_many_choices_starts_in_the_first_step(two_slots, penalty):
    """Two slots, six choices of one request (8 tokens each) queued first, one greedy request
    after them: it runs beside the first choice from the first step (in arrival order it would
    wait for five choices to start), also where the choices prefill their own prompts (a
    repetition penalty) and could start together; sharing choices still prefill the prompt
    once, and the six give what six separate requests do."""
    many = [SamplingParams(max_tokens=8, temperature=0.8, seed=s, ignore_eos=True,
                           repetition_penalty=penalty) for s in range(6)]
    one = [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)]
    got, firsts, stats = _run(two_slots, [([PROMPT], many, None), ([[5, 6, 7]], one, None)])
    assert firsts[:2] == [(0, 0), (1, 0)], firsts
    assert stats.prompt_tokens_shared == (5 * (len(PROMPT) - 1) if penalty == 1 else 0)
    alone = run_together(Engine(two_slots), [PROMPT] * 6 + [[5, 6, 7]], many + one)
    assert got == [[tokens(e) for e in alone[:6]], [tokens(alone[6])]]


def test_the_prompts_of_one_batch_count_as_one_client_request(two_slots):
    """Two prompts of one batch (one group) and a request of its own: the second slot goes to
    the other client, not to the batch's second prompt."""
    one = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]
    batch = object()
    _, firsts, _ = _run(two_slots, [([PROMPT], one, batch), ([[8, 9]], one, batch),
                                    ([[5, 6, 7]], one, None)])
    assert firsts == [(0, 0), (2, 0), (1, 0)], firsts
    _, firsts, _ = _run(two_slots, [([PROMPT], one, None), ([[8, 9]], one, None),
                                    ([[5, 6, 7]], one, None)])
    assert firsts == [(0, 0), (1, 0), (2, 0)], firsts  # three clients: arrival order
