"""The n choices of one request prefill their prompt once: the later choices copy the first
one's KV rows but the last (`StepPlan.copies`, applied by every rank before the step) and run
only the prompt's last token. Their tokens are those of separate requests that each prefill the
prompt, over real Ray ranks and the in-process ones."""

import threading

import pytest
import torch

import tpserve
from engine_runs import drive, run_together, tokens
from tpserve.serve.engine import Engine
from tpserve.serve.sampling_params import SamplingParams
from test_rank_sampling import SMALL

PROMPT = [1, 17, 42, 99, 3, 250, 128, 64, 7, 9]


def _choices(llm, prompt, params) -> tuple[list[list[int]], int]:
    """One request of len(params) choices (as the server submits n), run to its end -> each
    choice's tokens, and the prompt tokens the engine did not prefill."""
    engine, events, done = Engine(llm), [[] for _ in params], threading.Semaphore(0)

    def on_event(ev, i):
        events[i].append(ev)
        if ev.finished:
            done.release()
    engine.submit_many(prompt, params, [lambda ev, i=i: on_event(ev, i) for i in range(len(params))])
    drive(engine, done, len(params))
    assert sorted(engine.free_slots) == list(range(engine.num_slots))  # every slot came back
    return [tokens(evs) for evs in events], engine.stats.prompt_tokens_shared


def _separate(llm, prompt, params) -> list[list[int]]:
    engine = Engine(llm)
    got = [tokens(evs) for evs in run_together(engine, [prompt] * len(params), params)]
    assert engine.stats.prompt_tokens_shared == 0  # one choice each: nothing to share
    return got


@pytest.mark.parametrize("fixture", ["ranks", "single"])
def test_n_choices_prefill_their_prompt_once(fixture, request):
    llm = request.getfixturevalue(fixture)
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=s, ignore_eos=True,
                             logprobs=1 if s == 5 else None) for s in (3, 5, 11)]
    got, shared = _choices(llm, PROMPT, params)
    assert shared == 2 * (len(PROMPT) - 1)
    assert got == _separate(llm, PROMPT, params)
    assert all(len(t) == 6 for t in got) and len({tuple(t) for t in got}) == 3


@pytest.mark.parametrize("fixture", ["ranks", "single"])
def test_choices_with_a_repetition_penalty_prefill_their_own_prompts(fixture, request):
    """A repetition penalty reads the prompt, which the ranks' sampler takes from a request's
    prefill step: such choices do not share, and sample as separate requests do. The prompt
    holds the token the model would pick next (not as its last token), so a choice whose
    sampler saw only the last prompt token would pick it where the penalty forbids it."""
    llm = request.getfixturevalue(fixture)
    prompt = list(PROMPT)
    for _ in range(8):
        likely = int(llm.logits(prompt)[-1].argmax())
        if likely in prompt[:-1]:
            break
        prompt = [likely] + prompt
    else:
        pytest.fail("no prompt holds the token the model picks after it")
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, repetition_penalty=100)
              for _ in range(3)]
    got, shared = _choices(llm, prompt, params)
    assert shared == 0 and got == _separate(llm, prompt, params)
    assert all(t[0] != likely for t in got)


def test_a_choice_whose_first_choice_has_ended_takes_over_its_slot():
    """Two KV slots for three choices: the second copies the first's rows; the third waits
    until the first has ended and takes over its slot and prompt rows (no prefill of its own).
    A first choice that ends at its prompt step (one token) hands its slot to the second, and
    the third copies from that one: n choices of max_tokens=1 prefill the prompt once."""
    llm = tpserve.load(SMALL, tp=1, dtype=torch.float32, max_model_len=40, num_slots=2)
    try:
        params = [SamplingParams(max_tokens=n, temperature=0.8, seed=s, ignore_eos=True)
                  for n, s in ((2, 1), (9, 2), (4, 3))]
        got, shared = _choices(llm, PROMPT, params)
        assert shared == 2 * (len(PROMPT) - 1)
        assert got == _separate(llm, PROMPT, params)
        params = [SamplingParams(max_tokens=n, seed=s, temperature=0.5, ignore_eos=True)
                  for n, s in ((1, 1), (3, 2), (1, 3), (2, 4))]
        got, shared = _choices(llm, PROMPT, params)
        assert shared == 3 * (len(PROMPT) - 1) and [len(t) for t in got] == [1, 3, 1, 2]
        assert got == _separate(llm, PROMPT, params)
    finally:
        llm.close()


def test_an_echoing_first_choice_still_shares_its_prompt(single):
    """Echo's prompt logprobs are asked of the first choice only (the server's n choices): it
    prefills every prompt row for them, and the later choices still copy its KV rows."""
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]
    engine, events, done = Engine(single), [[], []], threading.Semaphore(0)
    for_choice = [lambda ev, i=i: (events[i].append(ev), ev.finished and done.release())
                  for i in range(2)]
    engine.submit_many(PROMPT, params, for_choice)
    drive(engine, done, 2)
    assert engine.stats.prompt_tokens_shared == len(PROMPT) - 1
    prompt_lps = [ev.prompt_logprobs for ev in events[0] if ev.prompt_logprobs is not None]
    assert len(prompt_lps) == 1 and len(prompt_lps[0]) == len(PROMPT)
    assert tokens(events[0]) == tokens(events[1])  # greedy: the same answer
