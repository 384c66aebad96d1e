"""KV slots are shared out between client requests: a waiting request of the client request
running the fewest sequences starts first (`fair_share.py`), so a request queued behind one of
many choices starts at the next free slot; the large request's choices still share their
prompt's prefill and produce what separate requests do."""

import threading

import pytest
import torch

import tpserve
from engine_runs import drive, run_together, tokens
from tpserve.serve.engine import Engine
from tpserve.serve.fair_share import hand_over, next_admission
from tpserve.serve.requests import Group, Request
from tpserve.serve.sampling_params import SamplingParams
from tpserve.serve.shared_prompts import share_prompt
from test_rank_sampling import SMALL

PROMPT = [1, 17, 42, 99, 3, 250, 128, 64, 7, 9]


def _group(n: int, start: int) -> list[Request]:
    """n choices of one prompt, one client request's (ids from `start`)."""
    group = Group()
    reqs = [Request(start + i, list(PROMPT), SamplingParams(), print, group=group)
            for i in range(n)]
    share_prompt(reqs)
    return reqs


def test_the_group_holding_fewest_slots_goes_first():
    a, b = _group(3, 0), _group(1, 10)
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
    """A first choice that ends hands its slot to the next choice of its prompt unless another
    client waits running fewer sequences (or as many, having had fewer slots); then the choices
    still waiting copy the prompt's rows from a running choice of it, not prefill it again."""
    a, b = _group(4, 0), _group(1, 10)
    a[1].output.append(5)
    a[0].group.admitted = 2
    assert hand_over(a[0], a[2:], [a[1]]) is a[2]  # no one else waits
    assert a[3].share is a[2] and a[2].slot == a[0].slot and a[0].group.admitted == 3
    a, b = _group(4, 0), _group(1, 10)
    a[1].output.append(5)
    waiting = a[2:] + b
    assert hand_over(a[0], waiting, [a[1]]) is None and waiting == a[2:] + b  # b runs none
    assert a[2].share is a[1] and a[3].share is a[1]  # a[1] holds the prompt's rows
    a, b = _group(3, 0), _group(1, 10)
    assert hand_over(a[0], a[2:] + b, [a[1]]) is None  # a[1] has not run yet: nothing to copy
    assert a[2].share is None
    a, b = _group(3, 0), _group(1, 10)
    assert hand_over(a[0], a[2:] + b, [b[0]]) is a[2]  # b already runs one, a none
    a, b = _group(3, 0), _group(1, 10)
    a[0].group.admitted = 1
    assert hand_over(a[0], a[2:] + b, []) is None  # both run none; b has had no slot yet


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
    drive(engine, done, total)
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
    batch = Group()
    _, firsts, _ = _run(two_slots, [([PROMPT], one, batch), ([[8, 9]], one, batch),
                                    ([[5, 6, 7]], one, None)])
    assert firsts == [(0, 0), (2, 0), (1, 0)], firsts
    _, firsts, _ = _run(two_slots, [([PROMPT], one, None), ([[8, 9]], one, None),
                                    ([[5, 6, 7]], one, None)])
    assert firsts == [(0, 0), (1, 0), (2, 0)], firsts  # three clients: arrival order


def test_choices_still_share_their_prompt_after_a_refused_hand_over(two_slots):
    """Four choices of one prompt on two slots; another client arrives while the second choice
    runs; the first choice ends: its slot goes to the other client, and the third and fourth
    choices copy the prompt's rows from the second instead of prefilling it again."""
    engine, events = Engine(two_slots), []
    many = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (2, 9, 3, 3)]
    engine.submit_many(PROMPT, many, [events.append] * 4)
    engine._admit()
    engine._step()  # the first choice runs the prompt
    engine._admit()  # the second copies its rows
    engine.submit([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                  events.append)
    engine._step()  # the first choice ends; the other client waits running none
    second = engine.running[0]
    assert len(engine.free_slots) == 1 and [r.share for r in engine.waiting] == [second, second,
                                                                                 None]
    while engine.waiting or engine.running:
        engine._admit()
        engine._step()
    assert engine.stats.prompt_tokens_shared == 3 * (len(PROMPT) - 1)
    assert sorted(engine.free_slots) == [0, 1] and sum(ev.finished for ev in events) == 5


def test_on_one_slot_a_request_behind_many_choices_runs_after_the_current_one():
    """With one KV slot the clients take turns: the one-choice request runs right after the
    first of the large request's choices, not after all of them."""
    llm = tpserve.load(SMALL, tp=1, dtype=torch.float32, max_model_len=40, num_slots=1)
    try:
        many = [SamplingParams(max_tokens=2, temperature=0.8, seed=s, ignore_eos=True)
                for s in range(4)]
        one = [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)]
        _, firsts, _ = _run(llm, [([PROMPT], many, None), ([[5, 6, 7]], one, None)])
        assert firsts == [(0, 0), (1, 0), (0, 1), (0, 2), (0, 3)], firsts
    finally:
        llm.close()
