"""Several decode steps per engine step (`Engine(decode_steps=k)`: `Executor.decode_ids`, and
`sample_burst` where rank 0 samples): over real Ray ranks that hold the head, each step's token
feeds the next on the ranks, and the tokens are those of one step at a time, whatever stops a
request inside a burst."""

import logging

import pytest
import torch

from engine_runs import run_together, tokens
from tpserve.errors import TpserveError
from tpserve.serve.engine import Engine
from tpserve.serve.sampling_params import SamplingParams

PROMPTS = [[1, 17, 42, 99, 3, 250, 128, 64], [5, 6, 7], [200, 2, 11, 90, 45]]


def _together(engine: Engine, prompts, params) -> list[list[int]]:
    """Requests admitted in one step, run to their ends by the engine's loop."""
    return [tokens(evs) for evs in run_together(engine, prompts, params)]


def test_bursts_give_the_tokens_of_single_steps(ranks, single):
    want = [single.generate(p, max_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (5, 11, 19))]
    stop_at = want[2][3]  # a stop token inside the first burst of the third request
    want[2] = want[2][:want[2].index(stop_at) + 1]
    params = [SamplingParams(max_tokens=5, ignore_eos=True),
              SamplingParams(max_tokens=11, ignore_eos=True),
              SamplingParams(max_tokens=19, ignore_eos=True, stop_token_ids=[stop_at])]
    got = _together(Engine(ranks, decode_steps=8), PROMPTS, params)
    assert got == want


def test_a_burst_is_one_message_and_stops_at_the_context_end(ranks, single):
    coord = ranks.executor.coord
    engine = Engine(ranks, decode_steps=8)
    before = coord.step_id
    got = engine.generate(PROMPTS[0], SamplingParams(max_tokens=17, ignore_eos=True))
    # the prompt's step, then 16 tokens in two bursts of 8
    assert coord.step_id - before == 3
    assert got == single.generate(PROMPTS[0], max_tokens=17, ignore_eos=True)
    # the whole context of 40: bursts of 8, 8, 8, then the 7 positions left
    before = coord.step_id
    long = engine.generate(PROMPTS[0], SamplingParams(max_tokens=32, ignore_eos=True))
    assert len(PROMPTS[0]) + len(long) == 40 and coord.step_id - before == 5
    assert long == single.generate(PROMPTS[0], max_tokens=32, ignore_eos=True)


def test_sampled_rows_burst_where_rank0_samples(ranks, single, caplog):
    """A sampled row beside a greedy one: rank 0 samples the burst (`rank_sampling`), with the
    tokens one step at a time gives."""
    caplog.set_level(logging.INFO, logger="tpserve.serve.engine")
    coord = ranks.executor.coord
    before = coord.step_id
    sampled = SamplingParams(max_tokens=6, temperature=0.7, seed=3)
    got = _together(Engine(ranks, decode_steps=8), PROMPTS[:2],
                    [SamplingParams(max_tokens=6, ignore_eos=True), sampled])
    assert coord.step_id - before == 2  # the prompts, then one burst of 5
    assert "decode: bursts of up to 8 steps per call" in caplog.text
    assert got[0] == single.generate(PROMPTS[0], max_tokens=6, ignore_eos=True)
    assert got[1] == single.generate(PROMPTS[1], max_tokens=6, temperature=0.7, seed=3)


def test_sampled_rows_step_one_at_a_time_where_the_ranks_do_not_sample(single, monkeypatch,
                                                                       caplog):
    """In-process ranks at tp=2 hold no head: the engine steps one at a time (and says so), with
    the same tokens."""
    caplog.set_level(logging.INFO, logger="tpserve.serve.engine")
    calls, real = [], single.step
    monkeypatch.setattr(single, "step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sampled = SamplingParams(max_tokens=6, temperature=0.7, seed=3)
    got = _together(Engine(single, decode_steps=8), PROMPTS[:2],
                    [SamplingParams(max_tokens=6, ignore_eos=True), sampled])
    assert len(calls) == 6 and "decode: one step per call (the head runs at the" in caplog.text
    monkeypatch.undo()
    assert got[1] == single.generate(PROMPTS[1], max_tokens=6, temperature=0.7, seed=3)


def test_no_burst_while_a_request_waits_for_a_slot(ranks, single):
    """Four slots, five requests: the fifth waits, so the four step one at a time (a burst would
    hold a finished request's slot and the queue); alone, the fifth bursts."""
    coord = ranks.executor.coord
    prompts = [[3 + i, 40 + i, 7] for i in range(5)]
    before = coord.step_id
    got = _together(Engine(ranks, decode_steps=8), prompts,
                    [SamplingParams(max_tokens=9, ignore_eos=True)] * 5)
    # 4 prompts, 8 single steps, then the fifth's prompt and one burst of 8
    assert coord.step_id - before == 1 + 8 + 2
    assert got == [single.generate(p, max_tokens=9, ignore_eos=True) for p in prompts]


def test_decode_steps_out_of_range_is_refused(single):
    for bad in (0, 65, True, 2.0):
        with pytest.raises(TpserveError, match=r"must be an integer in \[1, 64\]"):
            Engine(single, decode_steps=bad)


def test_a_step_prefills_at_most_max_prefill_tokens(single):
    """Requests are admitted whole, in order, until the next would pass the step's prompt-token
    budget (a longer prompt alone still runs): three prompts of 8, 3 and 5 tokens under a budget
    of 10 take two prefill steps, and their tokens are those of each alone."""
    engine = Engine(single, max_prefill_tokens=10)
    params = [SamplingParams(max_tokens=4, ignore_eos=True)] * 3
    assert engine._admit() == []
    ids = [engine.submit(p, sp, lambda ev: None) for p, sp in zip(PROMPTS, params)]
    assert [r.id for r in engine._admit()] == ids[:1]  # 8 + 3 > 10
    engine._step()
    assert [r.id for r in engine._admit()] == ids[1:]  # 3 + 5 <= 10
    for i in ids:  # their slots come back
        engine.cancel(i)
    engine._admit()
    assert len(engine.free_slots) == engine.num_slots
    with pytest.raises(TpserveError, match="max_prefill_tokens=0 must be a positive integer"):
        Engine(single, max_prefill_tokens=0)
    got = _together(Engine(single, max_prefill_tokens=10), PROMPTS, params)
    assert got == [single.generate(p, max_tokens=4, ignore_eos=True) for p in PROMPTS]


def test_prompt_logprobs_of_a_one_token_prompt_with_the_head_on_a_rank(ranks):
    """A greedy request asking for its prompt's logprobs, whose prompt is one token: the step must
    still bring the logits back (one prompt row is also the one output row)."""
    engine, events = Engine(ranks), []
    engine.submit([5], SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=1),
                  events.append)
    while not (events and events[-1].finished):
        engine._admit()
        engine._step()
    first = events[0].prompt_logprobs
    assert [(lp.token, lp.logprob) for lp in first] == [(5, None)]
    assert [t for ev in events for t in ev.token_ids] == \
        ranks.generate([5], max_tokens=2, ignore_eos=True)


@pytest.mark.parametrize("vocab,chunks", [(4096, 128), (1000, 40), (96, 32)])
def test_greedy_in_slices_is_torch_argmax(vocab, chunks):
    """The two-pass argmax (`rank_head.greedy`, what a captured step runs on a GPU) gives
    torch.argmax's index: the first maximum, also where the maximum is tied across slices or
    within one, at a slice's edges, and where a row holds NaN or only -inf."""
    from tpserve.model.rank_head import _chunks, greedy
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(9, vocab, generator=gen).round(decimals=1)  # ties within a row are common
    w = vocab // chunks
    rows[1, [w - 1, 3 * w]] = 50.0  # tied across slices: the earlier, at a slice's last column
    rows[2, [5 * w, 5 * w + 1]] = 50.0  # tied within a slice, at its first column
    rows[3, -1] = 50.0  # the last column
    rows[4, 7] = float("nan")
    rows[5] = float("-inf")
    rows[6] = 0.0
    got = greedy(rows, chunks)
    assert torch.equal(got, rows.argmax(-1)), (got, rows.argmax(-1))
    assert _chunks(128256) == 128 and _chunks(151936) == 128 and _chunks(1031) == 0  # a prime
