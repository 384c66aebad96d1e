"""Sampling on rank 0 (tpserve/serve/rank_sampling.py): over real Ray ranks that hold the head, a
step whose requests need more than the argmax is sampled where the logits are, and gives the
tokens and logprobs of the coordinator's sampler (the in-process ranks: the same seeded streams,
penalties, biases, min_tokens and logprobs), without the logits crossing to the coordinator. The
wire pieces refuse malformed input."""

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch

from engine_runs import run_together, tokens
from tpserve.runtime.wire import WireError
from tpserve.serve import rank_sampling, sample_sync
from tpserve.serve.engine import Engine
from tpserve.serve.rank_sampling import RankSampler, sample_each
from tpserve.serve.sample_sync import SampleSync, params_from_wire, params_to_wire
from tpserve.serve.requests import Request
from tpserve.serve.sampling import SampleRow
from tpserve.serve.sampling_params import SamplingParams

SMALL = Path(__file__).parent / "fixtures" / "llama_g128_sym"  # conftest's SMALL
PROMPTS = [[1, 17, 42, 99, 3, 250, 128, 64], [5, 6, 7], [200, 2, 11, 90, 45], [9, 9, 9, 9]]
PARAMS = [SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=11, logprobs=3),
          SamplingParams(max_tokens=7, temperature=1.2, top_k=20, seed=5, repetition_penalty=1.3,
                         frequency_penalty=0.5, logit_bias=((7, 5.0), (9, -100.0))),
          SamplingParams(max_tokens=6, ignore_eos=False, min_tokens=4, temperature=0.6, seed=2,
                         presence_penalty=1.0, prompt_logprobs=2),
          SamplingParams(max_tokens=8, logprobs=2)]  # greedy, in a sampled step


def _run(llm, prompts, params, decode_steps=1) -> list[tuple]:
    """Requests admitted in one step, run to their ends: (tokens, logprobs, prompt logprobs)."""
    out = []
    for evs in run_together(Engine(llm, decode_steps=decode_steps), prompts, params):
        lps = [(lp.token, round(lp.logprob, 4), [(t, round(v, 4)) for t, v in lp.top])
               for ev in evs for lp in ev.logprobs or []]
        prompt = next(([(lp.token, lp.logprob and round(lp.logprob, 4))
                        for lp in ev.prompt_logprobs]
                       for ev in evs if ev.prompt_logprobs is not None), None)
        out.append((tokens(evs), lps, prompt))
    return out


def test_rank0_samples_what_the_coordinator_samples(ranks, single, monkeypatch):
    calls = []
    real = ranks.executor.coord.sample_ids

    def counted(ids, plan, entries, params, logits):
        calls.append(logits)
        return real(ids, plan, entries, params, logits)
    monkeypatch.setattr(ranks.executor.coord, "sample_ids", counted)
    got = _run(ranks, PROMPTS, PARAMS)
    want = _run(single, PROMPTS, PARAMS)
    assert got == want
    assert [len(t) for t, _, _ in got] == [9, 7, len(got[2][0]), 8] and len(got[2][0]) >= 4
    assert len(got[0][1]) == 9 and all(len(top) == 3 for _, _, top in got[0][1])
    # every step of these requests was sampled on rank 0; the logits crossed only for the prompt
    # step, where request 2 echoes its prompt's logprobs
    assert len(calls) == max(len(t) for t, _, _ in got) and calls.count(True) == 1


def test_rank0_samples_bursts_as_it_samples_single_steps(ranks, single, monkeypatch):
    """With --decode-steps, sampled requests decode in bursts on rank 0 (each step's sampled
    tokens fed to the next there): the same seeded tokens, penalties, min_tokens and logprobs
    as the coordinator's sampler one step at a time, and a stop inside a burst ends its request
    there."""
    bursts = []
    real = ranks.executor.coord.sample_ids

    def counted(ids, plan, entries, params, logits, steps=1):
        bursts.append(steps)
        return real(ids, plan, entries, params, logits, steps)
    monkeypatch.setattr(ranks.executor.coord, "sample_ids", counted)
    params = PARAMS[:3] + [SamplingParams(max_tokens=9, temperature=0.9, seed=3, logprobs=2,
                                          stop_token_ids=tuple(range(0, 256, 2)))]
    got = _run(ranks, PROMPTS, params, decode_steps=4)
    assert got == _run(single, PROMPTS, params)
    assert [len(t) for t, _, _ in got[:2]] == [9, 7] and len(got[2][0]) >= 4
    assert len(got[3][0]) < 9 and got[3][0][-1] % 2 == 0  # stopped by its last token
    assert bursts[0] == 1 and max(bursts) == 4  # the prefill alone, then bursts of 4
    assert len(bursts) < max(len(t) for t, _, _ in got)


def test_a_stop_inside_a_sampled_burst_ends_its_request_there(ranks, single):
    """A request whose stop id comes in the middle of a burst of 4 ends at that token; the tokens
    rank 0 sampled after it are dropped, and its neighbour decodes on as before."""
    a = SamplingParams(max_tokens=12, temperature=0.8, seed=21, ignore_eos=True)
    b = SamplingParams(max_tokens=12, temperature=1.1, top_k=30, seed=4, ignore_eos=True,
                       logprobs=2)
    ref = _run(single, PROMPTS[:2], [a, b])
    toks = ref[1][0]
    # the prompt step samples token 0, the first burst tokens 1-4, the second 5-8: stop at 5-7
    i = next(i for i in (6, 7, 5) if toks[i] not in toks[:i])
    got = _run(ranks, PROMPTS[:2], [a, dataclasses.replace(b, stop_token_ids=(toks[i],))],
               decode_steps=4)
    assert got[0] == ref[0] and len(got[0][0]) == 12
    assert got[1] == (toks[:i + 1], ref[1][1][:i + 1], None)


def test_a_row_that_fails_inside_a_burst_fails_only_its_request(monkeypatch):
    """A row the sampler cannot sample mid-burst (-1 from rank 0) fails its request at that step
    with an error event; the other request's tokens are those of a run without the fault."""
    import tpserve
    one = tpserve.load(SMALL, tp=1, dtype=torch.float32, max_model_len=40, num_slots=4)
    a = SamplingParams(max_tokens=10, temperature=0.8, seed=21, ignore_eos=True)
    b = SamplingParams(max_tokens=10, temperature=0.9, seed=77, ignore_eos=True)

    def run():
        evs = run_together(Engine(one, decode_steps=4), PROMPTS[:2], (a, b), timeout=60)
        return [tokens(e) for e in evs], [e[-1].finish_reason for e in evs]
    try:
        want, ends = run()
        assert ends == ["length", "length"]
        calls = []

        def faulty(real):  # b's row breaks from the 4th sampling call on, batched or alone
            def call(logits, rows, argmax=None):
                calls.append(len(rows))
                if len(calls) > 3 and any(r.params.seed == 77 for r in rows):
                    raise RuntimeError("injected")
                return real(logits, rows, argmax)
            return call
        for name in ("sample", "sample_tensors"):
            monkeypatch.setattr(rank_sampling, name, faulty(getattr(rank_sampling, name)))
        got, ends = run()
        assert ends == ["length", "error"] and got[0] == want[0]
        assert 0 < len(got[1]) < 10 and got[1] == want[1][:len(got[1])]
    finally:
        one.close()


def test_one_rank_in_process_samples_in_its_step_and_in_bursts(single, monkeypatch):
    """tp=1 in-process: the head is in the rank's step (captured with it on a GPU), and so is the
    sampling, as on rank 0 of Ray ranks: single steps and bursts give the coordinator's tokens."""
    import tpserve
    one = tpserve.load(SMALL, tp=1, dtype=torch.float32, max_model_len=40, num_slots=4)
    try:
        bursts = []
        real = one.executor.sample_burst

        def counted(ids, plan, reqs, steps):
            bursts.append(steps)
            return real(ids, plan, reqs, steps)
        monkeypatch.setattr(one.executor, "sample_burst", counted)
        want = _run(single, PROMPTS, PARAMS)
        assert _run(one, PROMPTS, PARAMS) == want and not bursts
        assert _run(one, PROMPTS, PARAMS, decode_steps=4) == want and max(bursts) == 4
    finally:
        one.close()


def test_seeded_requests_repeat_and_a_new_group_starts_clean(ranks):
    params = [PARAMS[0], PARAMS[1]]
    first = _run(ranks, PROMPTS[:2], params)
    assert _run(ranks, PROMPTS[:2], params) == first  # fresh requests: fresh generators
    ranks.executor._sync.sent = {10 ** 9: 0}  # as after a step the new group never saw
    ranks.executor.recover()
    assert ranks.executor._sync.sent == {}
    assert _run(ranks, PROMPTS[:2], params) == first


def _req(rid, params, output=()):
    r = Request(rid, [1, 2, 3], params, lambda ev: None, None)
    r.output.extend(output)
    return r


def test_the_coordinator_sends_parameters_once_and_tokens_since_the_last_step(monkeypatch):
    sync = SampleSync()
    a, b = _req(1, PARAMS[0]), _req(2, PARAMS[1])
    entries, params = sync.entries([a, b])
    assert entries == [[1, []], [2, []]]
    assert [p[0] for m in params for p in m] == [1, 2]
    assert params_from_wire(params[0][0][1]) == PARAMS[0]
    a.output.extend([5, 6])  # e.g. a burst's tokens
    b.output.append(7)
    entries, params = sync.entries([a, b])
    assert entries == [[1, [5, 6]], [2, [7]]] and params == []
    entries, params = sync.entries([b])  # a finished: forgotten
    assert entries == [[2, []]] and sync.sent == {2: 1}
    monkeypatch.setattr(sample_sync, "PARAMS_BYTES", 1)  # one request per params message
    _, params = SampleSync().entries([a, b])
    assert [[p[0] for p in m] for m in params] == [[1], [2]]


def test_after_a_sampled_burst_rank0_holds_each_output_token_once():
    """Rank 0 feeds a burst's tokens to its rows itself, all but the last; the coordinator then
    sends only what rank 0 lacks, so the penalty counts see each token once."""
    import torch
    from tpserve.model.kv_cache import StepPlan
    sync, sampler = SampleSync(), RankSampler((2,), 256)
    r = _req(1, PARAMS[1], output=[5])
    plan = StepPlan(slots=[0], starts=[3], lens=[1])
    for steps in (4, 3):
        entries, params = sync.entries([r])
        for m in params:
            sampler.take(m)
        burst = sampler.burst(torch.tensor(r.output[-1:]), plan, entries)
        for _ in range(steps):
            burst(torch.randn(1, 256), None)
        toks = burst.result()[0][:, 0].tolist()
        assert len(toks) == steps
        r.output.extend(toks)
        sync.advance([r], steps)
    entries, _ = sync.entries([r])
    sampler.sample(torch.randn(1, 256), None, torch.tensor(r.output[-1:]), plan, entries)
    assert sampler.rows[1].output == r.output and len(r.output) == 8


def test_a_sampled_burst_reads_nothing_back_from_the_device_between_steps():
    """Rank 0 queues a sampled burst's steps without waiting for the GPU because its sampler
    reads nothing back to the host: on the meta device (tensors without data: any read fails) the
    burst's steps run with penalties, logit_bias, min_tokens, top-k/p, min_p and logprobs beside a
    greedy row, and each step's picks stay on the device for the next."""
    import torch
    from tpserve.model.kv_cache import StepPlan
    sampler = RankSampler((2,), 256)
    busy = SamplingParams(max_tokens=10, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                          repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3,
                          logit_bias=((5, 2.0),), min_tokens=3, logprobs=3)
    sampler.take([[1, params_to_wire(busy)], [2, params_to_wire(SamplingParams(max_tokens=10))]])
    plan = StepPlan(slots=[0, 1], starts=[4, 4], lens=[1, 1])
    burst = sampler.burst(torch.tensor([7, 8]), plan, [[1, [9]], [2, [9]]])
    for _ in range(4):
        picks = burst(torch.randn(2, 256, device="meta"),
                      torch.zeros(2, dtype=torch.long, device="meta"))
        assert picks.device.type == "meta" and picks.shape == (2,)
    assert [r.lag for r in sampler.rows.values()] == [3, 3]  # fed on the device, not the host
    assert sampler.rows[1].counted == 4  # the token sent ahead and three fed picks


@pytest.mark.parametrize("bad", [
    "x", [[1]], [[1, [5]], [2, [5]], [3, [5]]], [[1, [256]]], [[1, [-1]]], [["a", []]],
    [[1, [5], {}]], [[1, None]]])
def test_malformed_sampling_entries_are_refused(bad):
    with pytest.raises(WireError):
        RankSampler((2,), 256).check(bad, 1 if len(bad) != 3 else 2)


def test_sampling_entries_name_each_request_once_and_known():
    """A burst refused halfway could not be undone (the other ranks run its steps), so a step
    naming a request twice, or one rank 0 has neither seen nor been sent, is refused whole."""
    sampler = RankSampler((2,), 256)
    sampler.take([[1, params_to_wire(PARAMS[0])]])
    sampler.check([[1, [5]]], 1)
    for bad in ([[1, [5]], [1, [6]]], [[1, [5]], [2, []]]):
        with pytest.raises(WireError, match="twice|without its sampling parameters"):
            sampler.check(bad, 2)


@pytest.mark.parametrize("bad", [
    {"temperature": -1.0}, {"nonsense": 1}, {"logit_bias": [[1]]}, {"top_p": "x"}, [1, 2],
    {"stop": ["x"]}, {"logit_bias": [[256, 1.0]]}])
def test_malformed_sampling_parameters_are_refused(bad):
    with pytest.raises(WireError):
        RankSampler((2,), 256).take([[1, bad]])


def test_parameters_survive_the_wire():
    for p in PARAMS:
        assert params_from_wire(params_to_wire(p)) == p


def test_a_greedy_request_joins_a_sampling_step_mid_stream(ranks, single):
    """A greedy request decodes by the argmax alone; a sampled one arrives, and from then on rank
    0 samples steps holding both: the greedy one is new to rank 0 there, past its prefill."""
    def run(llm):
        engine, toks = Engine(llm), {0: [], 1: []}
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True),
                      lambda ev: toks[0].extend(ev.token_ids))
        for _ in range(3):
            engine._admit()
            engine._step()
        engine.submit(PROMPTS[1], PARAMS[1], lambda ev: toks[1].extend(ev.token_ids))
        while engine.running or engine.waiting:
            engine._admit()
            engine._step()
        return toks
    got = run(ranks)
    assert got == run(single) and len(got[0]) == 8


def test_rank0_lets_go_of_sampling_rows_at_a_step_that_samples_nothing(ranks, single):
    """A penalized request holds a row with device tensors on rank 0; once it has finished and a
    step samples nothing, rank 0 and the coordinator drop their rows (they would stay until the
    next sampling step, forever under greedy traffic), and a request sampled after that gets the
    tokens of the coordinator's sampler."""
    one = __import__("tpserve").load(SMALL, tp=1, dtype=torch.float32, max_model_len=40,
                                     num_slots=4)

    def run(llm, held):
        engine, toks = Engine(llm), {}

        def until_done():
            while engine.running or engine.waiting:
                engine._admit()
                engine._step()
        for i, (prompt, p) in enumerate([(PROMPTS[0], PARAMS[1]),
                                         (PROMPTS[1], SamplingParams(max_tokens=4)),
                                         (PROMPTS[2], PARAMS[0])]):
            engine.submit(prompt, p, lambda ev, i=i: toks.setdefault(i, []).extend(ev.token_ids))
            until_done()
            sampler = getattr(llm.executor, "sampler", None)  # in-process: inspectable
            held.append((len(llm.executor._sync.sent),
                         *(() if sampler is None else (len(sampler.rows),))))
        return toks
    try:
        held_ray, held_one = [], []
        got = run(ranks, held_ray)
        assert got == run(single, []) == run(one, held_one) and len(got[2]) == 9
        # after the penalized request's last (sampling) step its row is still held; the greedy
        # request's steps sample nothing and drop it, on both sides
        assert held_ray[:2] == [(1,), (0,)]
        assert held_one[:2] == [(1, 1), (0, 0)]
    finally:
        one.close()


def test_top_k_beyond_the_wire_is_refused_where_the_request_enters():
    """A top_k of 2**64 once passed validation, then broke the msgpack message that carries the
    parameters to rank 0 inside the step, failing every running request; it is a 400-style
    TpserveError naming top_k now, and the largest allowed value crosses the wire."""
    import msgpack
    from tpserve.errors import TpserveError
    with pytest.raises(TpserveError, match="top_k=18446744073709551616 must be an integer in"):
        SamplingParams(top_k=2**64, temperature=1.0)
    top = SamplingParams(top_k=2**31 - 1, temperature=1.0)
    assert params_from_wire(msgpack.unpackb(msgpack.packb(params_to_wire(top)))) == top


def test_parameters_too_large_for_the_wire_are_refused_where_the_request_enters(single,
                                                                                 monkeypatch):
    """Parameters that cannot make one `params` message to rank 0 would fail inside a step, and
    with them every request of the step: the engine refuses them when they arrive, naming the
    fields to shorten."""
    from tpserve.serve.requests import RequestError
    many = SamplingParams(logit_bias=tuple((i, 1.0) for i in range(30_000)))
    assert "over the 256 KiB" in sample_sync.wire_problem(many)
    assert sample_sync.wire_problem(SamplingParams(logit_bias=((1, 1.0),))) is None
    engine = Engine(single)  # never started: `check` runs where a request arrives
    bias = SamplingParams(logit_bias=tuple((i, 1.0) for i in range(64)))
    engine.check([1, 2, 3], [bias])  # fits the wire
    monkeypatch.setattr(sample_sync, "PARAMS_BYTES", 256)
    with pytest.raises(RequestError, match="send fewer logit_bias or stop_token_ids entries"):
        engine.check([1, 2, 3], [bias])


def test_a_row_that_breaks_the_sampler_fails_alone_and_its_client_gets_a_reference(caplog):
    """A row the batched sampler cannot take (an output token past the vocabulary, penalized)
    fails alone, the other row is sampled; the failed row's message is a reference the log
    repeats beside the exception, not the exception's text."""
    logits = torch.randn(2, 50)
    ok = SampleRow(SamplingParams(temperature=0), [1, 2], [])
    bad = SampleRow(SamplingParams(frequency_penalty=1.0, temperature=0.5, seed=3), [1], [10**6])
    with caplog.at_level(logging.ERROR, logger="tpserve.serve.rank_sampling"):
        (tok, _), (none, message) = sample_each(logits, [ok, bad])
    assert tok == int(logits[0].argmax()) and none is None
    assert "IndexError" not in message and "index" not in message, message
    ref = re.search(r"reference ([0-9a-f]{12})", message).group(1)
    assert any(ref in r.getMessage() and "IndexError" in r.getMessage() for r in caplog.records)
