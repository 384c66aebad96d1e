"""Hostile wire input: fuzzed frames at the coordinator's and a rank's sockets never crash them.

Real ZMQ sockets and the real Coordinator / RankWorker loop (in threads, no Ray). The test plays
the other side with the minted identity, sends hypothesis-generated garbage, replays and
out-of-order step ids, then valid traffic, and checks that correct results still come back.
"""

import threading

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from tpserve.runtime.coordinator import Coordinator
from tpserve.model.kv_cache import StepPlan
from tpserve.runtime.rank_worker import RankWorker
from tpserve.runtime.wire import WireError, decode, encode

from bare_rank import bare_rank
from test_peer_fixtures import FIXTURES

header = st.dictionaries(
    st.sampled_from(["v", "op", "step", "seq", "rank", "tensors", "plan", "message"]),
    st.one_of(st.integers(-5, 2**40), st.text(max_size=8), st.none(), st.booleans(),
              st.lists(st.dictionaries(st.sampled_from(["dtype", "shape"]),
                                       st.one_of(st.text(max_size=8), st.lists(st.integers(-3, 9),
                                                                                max_size=6))),
                       max_size=3)),
    max_size=8)
garbage = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),
    st.tuples(header, st.lists(st.binary(max_size=96), max_size=3)).map(
        lambda hb: [msgpack.packb(hb[0])] + hb[1]))


@settings(max_examples=300, deadline=None)
@given(frames=garbage)
def test_decode_rejects_anything_malformed_with_a_wire_error_only(frames):
    try:
        h, ts = decode(frames)
    except WireError:
        return
    assert h["v"] == 1 and len(ts) == len(frames) - 1  # accepted only when fully consistent


def bytes_frames(h, ts=()):
    return [bytes(f) for f in encode(h, list(ts))]


@pytest.fixture(scope="module")
def coordinator_and_rank():
    coord = Coordinator(tp=1, timeout_s=5.0, transport="ipc")
    ctx = zmq.Context()
    rank = ctx.socket(zmq.DEALER)
    rank.setsockopt(zmq.LINGER, 0)
    rank.setsockopt(zmq.IDENTITY, coord.client_keys(0)["identity"])
    rank.connect(coord.address)
    rank.send_multipart(bytes_frames({"op": "hello", "rank": 0}))
    coord.wait_for_ranks(timeout_s=5)
    yield coord, rank
    coord.close()
    ctx.destroy(0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(garbage, min_size=1, max_size=4))
def test_coordinator_survives_garbage_replays_and_wrong_steps(coordinator_and_rank, junk):
    coord, rank = coordinator_and_rank
    x = torch.randn(2, 8)

    def play_rank():
        h, (hx,) = decode(rank.recv_multipart())
        step = h["step"]
        for frames in junk:
            rank.send_multipart(frames)
        # a stale step, a replayed partial, then the real protocol
        rank.send_multipart(bytes_frames({"op": "reduce", "step": step - 1, "seq": 1, "rank": 0}, [hx]))
        rank.send_multipart(bytes_frames({"op": "result", "step": step + 7, "rank": 0}, [hx]))
        rank.send_multipart(bytes_frames({"op": "result", "step": step, "rank": 0}, [hx * 3]))
    t = threading.Thread(target=play_rank)
    t.start()
    out = coord.step(x, StepPlan([0], [0], [2]))
    t.join(10)
    assert torch.equal(out, x * 3)
    assert coord.stats.dropped_messages >= len(junk)


def test_a_rank_survives_garbage_and_replays_then_computes_correctly(tmp_path):
    import tpserve
    path = FIXTURES / "llama_g128_sym"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"ipc://{tmp_path}/c.sock"
    router.bind(addr)
    worker = RankWorker(0, 1, str(path), "float32", "cpu", num_slots=2, max_len=64, timeout_s=5)
    worker.load()
    ident = b"rank0-test"
    t = threading.Thread(target=worker.serve, args=(addr, {"identity": ident}), daemon=True)
    t.start()
    try:
        assert router.poll(10000)
        assert router.recv_multipart()[0] == ident  # hello
        ids = [1, 17, 42, 99]
        ref = tpserve.load(path, tp=1, dtype=torch.float32)
        h = ref.head.embed(torch.tensor(ids))
        plan = StepPlan([0], [0], [4], out_rows=[3]).to_wire()
        for frames in ([b"\x00"], [msgpack.packb({"v": 1, "op": "step", "step": 1})],
                       [msgpack.packb({"v": 2, "op": "step"})],
                       bytes_frames({"op": "step", "step": 1, "plan": {"slots": "x"}}, [h]),
                       bytes_frames({"op": "step", "step": 1, "plan": {**plan, "lens": [9]}}, [h]),
                       *(bytes_frames({"op": "step", "step": 1, "plan": {**plan, "copies": c}}, [h])
                         for c in ("x", [[0, 1]], [[0, 1, 99]], [[1, 1, 2]], [[0, 7, 2]])),
                       bytes_frames({"op": "sum", "step": 1, "seq": 1}, [h])):
            router.send_multipart([ident, *frames])
        router.send_multipart([ident, *bytes_frames({"op": "step", "step": 5, "plan": plan}, [h])])
        assert router.poll(10000)
        _, *frames = router.recv_multipart()
        hdr, (out,) = decode(frames)
        assert hdr["op"] == "result" and hdr["step"] == 5
        torch.testing.assert_close(ref.head.logits(out), ref.logits(ids)[3:], rtol=0, atol=1e-5)
        # a replayed step id is refused: nothing comes back for it
        router.send_multipart([ident, *bytes_frames({"op": "step", "step": 5, "plan": plan}, [h])])
        assert not router.poll(1000)
        assert worker.steps == 1
    finally:
        router.send_multipart([ident, *bytes_frames({"op": "stop"})])
        t.join(10)
        ctx.destroy(0)


# ---- the shared-memory channel: a peer's header words are input too ----------------------------
from tpserve.errors import TpserveError  # noqa: E402
from tpserve.runtime import shm  # noqa: E402
from tpserve.runtime.comm import reduce_sum  # noqa: E402

word = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, 2, 1 << 24 | 1]))


@pytest.fixture(scope="module")
def segment():
    d = shm.ShmDriver(2, capacity=1 << 16)
    yield d, shm.ShmPath(d.setup(0), 0, 2, timeout_s=0.05)
    d.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=word, meta=st.tuples(word, word, word), honest=st.booleans())
def test_a_rank_never_sums_a_peer_slot_whose_words_do_not_match(segment, flag, meta, honest):
    """Rank 1 is played by the test: garbage flag/meta words fail the reduction with a
    TpserveError (counted when the flag said ready); honest ones give the exact sum."""
    d, rank0 = segment
    n, b = rank0.n + 1, (rank0.n + 1) & 1
    x, peer = torch.randn(8), torch.randn(8)
    q, base = d.seg.q, shm.line(1) + 2 + 3 * b
    if honest:
        flag, meta = n, (n, 1 << 24 | 1, 8 << 8 | shm._CODES[torch.float32])
    d.seg.slot(1, b)[:32].view(torch.float32).copy_(peer)
    q[base], q[base + 1], q[base + 2] = meta
    q[shm.line(1)] = flag
    before = rank0.mismatches
    try:
        out = rank0.reduce(x, 1, 1)
    except TpserveError:
        assert flag < n or rank0.mismatches == before + 1
        return
    finally:
        rank0.n = max(rank0.n, n)  # the group is out of step now; keep the test's rank 0 going
        q[shm.line(1)] = 0
    assert flag >= n and meta == (n, 1 << 24 | 1, 8 << 8 | shm._CODES[torch.float32])
    assert torch.equal(out, reduce_sum([x, peer]))


setup_comm = st.one_of(st.none(), st.text(max_size=8), st.dictionaries(
    st.sampled_from(["name", "capacity", "x"]),
    st.one_of(st.integers(-5, 2**40), st.text(max_size=40), st.none()), max_size=3))


@settings(max_examples=40, deadline=None)
@given(setups=st.lists(st.tuples(st.sampled_from(["shm", "gloo", "nccl", "zmq", "x", ""]),
                                 setup_comm), min_size=1, max_size=4))
def test_a_rank_answers_every_setup_with_ready_or_error_and_keeps_serving(tmp_path_factory, setups):
    with bare_rank(tmp_path_factory.mktemp("s"), b"r0", timeout_s=2) as (router, _):
        for path, comm in setups:
            router.send_multipart([b"r0", *bytes_frames({"op": "setup", "path": path,
                                                         "comm": comm})])
            assert router.poll(10000), "the rank stopped answering"
            h, _ = decode(router.recv_multipart()[1:])
            assert h["op"] == ("ready" if path == "zmq" and isinstance(comm, dict) else "error")


def test_a_rank_drops_token_id_steps_it_cannot_run_and_keeps_serving(tmp_path):
    """A step of token ids (the head on rank 0) reaching a rank without its head part, or with
    ids outside the vocabulary, is dropped: no embedding lookup out of bounds, no answer."""
    from tpserve.model.config import load_configs
    from tpserve.model.rank_head import RankHead
    plan = {"slots": [0, 0], "starts": [0, 2], "lens": [1, 1]}
    with bare_rank(tmp_path, b"r0", timeout_s=2) as (router, worker):
        def step(n, ids):
            router.send_multipart([b"r0", *bytes_frames(
                {"op": "step", "step": n, "ids": True, "plan": plan}, [ids])])
        def next_answer_is_ready():  # a setup after the steps: its answer comes first
            router.send_multipart([b"r0", *bytes_frames({"op": "setup", "path": "zmq",
                                                         "comm": {}})])
            assert router.poll(10000), "the rank stopped answering"
            return decode(router.recv_multipart()[1:])[0]["op"] == "ready"
        step(1, torch.tensor([1, 2]))  # this rank holds no part of the head
        assert next_answer_is_ready()
        worker.cfg, _ = load_configs(FIXTURES / "llama_g128_sym")
        worker.head = RankHead(None, worker.comm, worker.cfg.hidden_size, torch.float32, "cpu")
        step(2, torch.tensor([1, worker.cfg.vocab_size]))  # one id past the vocabulary
        step(3, torch.tensor([1.0, 2.0]))  # not int64
        step(4, torch.tensor([[1, 2]]))  # not 1-D
        assert next_answer_is_ready()
        assert worker.last_step == 0  # none of them ran


def test_a_rank_drops_decode_bursts_it_cannot_run(tmp_path):
    """Several decode steps in one message (`decode_ids`) run only as a decode step of token ids
    without logits, and at most MAX_DECODE_STEPS of them: anything else is dropped unrun."""
    from tpserve.model.config import load_configs
    from tpserve.model.rank_head import RankHead
    decode_plan = {"slots": [0, 1], "starts": [3, 5], "lens": [1, 1]}
    with bare_rank(tmp_path, b"r0", timeout_s=2) as (router, worker):
        worker.cfg, _ = load_configs(FIXTURES / "llama_g128_sym")
        worker.head = RankHead(None, worker.comm, worker.cfg.hidden_size, torch.float32, "cpu")
        bad = [({"steps": 65, "logits": False}, decode_plan),
               ({"steps": 2, "logits": True}, decode_plan),
               ({"steps": 2}, decode_plan),  # logits not refused explicitly
               ({"steps": 2, "logits": False}, {"slots": [0], "starts": [0], "lens": [2]}),
               ({"steps": -3, "logits": False}, decode_plan),
               ({"steps": "8", "logits": False}, decode_plan)]
        for n, (flags, plan) in enumerate(bad, 1):
            rows = sum(plan["lens"])
            router.send_multipart([b"r0", *bytes_frames(
                {"op": "step", "step": n, "ids": True, "plan": plan, **flags},
                [torch.arange(1, rows + 1)])])
        router.send_multipart([b"r0", *bytes_frames({"op": "setup", "path": "zmq", "comm": {}})])
        assert router.poll(10000), "the rank stopped answering"
        assert decode(router.recv_multipart()[1:])[0]["op"] == "ready"
        assert worker.last_step == 0  # none of them ran


def test_a_rank_drops_sampling_messages_it_cannot_use(tmp_path):
    """Sampling parameters (`op: params`) that fail SamplingParams' checks, or reach a rank
    without the sampler, and sampling steps whose entries do not fit the plan, are dropped: no
    parameters kept, no step run, the rank keeps serving."""
    from tpserve.model.config import load_configs
    from tpserve.model.rank_head import RankHead
    from tpserve.serve.rank_sampling import RankSampler
    plan = {"slots": [0, 1], "starts": [3, 5], "lens": [1, 1]}
    with bare_rank(tmp_path, b"r0", timeout_s=2) as (router, worker):
        def send(h, ts=()):
            router.send_multipart([b"r0", *bytes_frames(h, ts)])
        def next_answer_is_ready():  # a setup after the messages: its answer comes first
            send({"op": "setup", "path": "zmq", "comm": {}})
            assert router.poll(10000), "the rank stopped answering"
            return decode(router.recv_multipart()[1:])[0]["op"] == "ready"
        send({"op": "params", "params": [[1, {"temperature": 0.5}]]})  # no sampler here
        assert next_answer_is_ready()  # handled before the sampler below exists
        worker.cfg, _ = load_configs(FIXTURES / "llama_g128_sym")
        worker.head = RankHead(None, worker.comm, worker.cfg.hidden_size, torch.float32, "cpu")
        worker.sampler = RankSampler((2,), worker.cfg.vocab_size)
        for params in ([[1, {"temperature": -1.0}]], [[1, {"nonsense": 1}]], "x", [[1]],
                       [[1, {"logit_bias": [[1]]}]], [[1, {"stop": ["x"]}]]):
            send({"op": "params", "params": params})
        for n, entries in enumerate(([[1, []]], [[1, []], [2, [256]]], [[1, []], ["2", []]],
                                     [[1, []], [2, 5]], "x"), 1):
            send({"op": "step", "step": n, "ids": True, "plan": plan, "logits": False,
                  "sample": entries}, [torch.tensor([1, 2])])
            send({"op": "step", "step": n, "ids": True, "plan": plan, "logits": False,
                  "steps": 2, "sample": entries}, [torch.tensor([1, 2])])  # a sampled burst
        assert next_answer_is_ready()
        assert worker.last_step == 0 and worker.sampler.pending == {}
