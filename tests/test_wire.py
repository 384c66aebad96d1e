"""Wire format validation and CurveZMQ admission (real ZMQ sockets, no Ray)."""

import contextlib
import time

import msgpack
import pytest
import torch
import zmq

from tpserve.runtime.coordinator import Coordinator, RankFailure
from tpserve.model.kv_cache import StepPlan
from tpserve.runtime.wire import WireError, decode, encode


def frames(header, tensors=()):
    return [bytes(f) for f in encode(header, list(tensors))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    h, (back,) = decode(frames({"op": "sum", "step": 3, "seq": 2}, [t]))
    assert h["op"] == "sum" and h["step"] == 3 and torch.equal(back, t)


@pytest.mark.parametrize("mangle,match", [
    (lambda f: [b"\xc1garbage"] + f[1:], "not valid msgpack"),
    (lambda f: [msgpack.packb([1, 2])] + f[1:], "not a msgpack map"),
    (lambda f: [msgpack.packb({"v": 9, "op": "sum"})], "protocol version 9"),
    (lambda f: [msgpack.packb({"v": 1, "op": "rm -rf"})], "unknown op"),
    (lambda f: [msgpack.packb({"v": 1, "op": "sum", "step": -1})], "'step'=-1"),
    (lambda f: f[:1], "announces 1 tensors but 0 frames"),
    (lambda f: [f[0], f[1][:-4]], "needs 60 bytes but its frame has 56"),
    (lambda f: [msgpack.packb({"v": 1, "op": "sum", "tensors": [{"dtype": "object", "shape": [1]}]}),
                b"x"], "no allowed dtype"),
    (lambda f: [msgpack.packb({"v": 1, "op": "sum", "tensors": [{"dtype": "uint8",
                                                                 "shape": [1, 1, 1, 1, 1]}]}), b"x"],
     "at most 4"),
])
def test_malformed_messages_are_rejected_with_a_reason(mangle, match):
    good = frames({"op": "sum", "step": 1, "seq": 1}, [torch.zeros(3, 5)])
    with pytest.raises(WireError, match=match):
        decode(mangle(good))


def test_oversize_frame_is_rejected():
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(frames({"op": "sum"}, [torch.zeros(1000)]), max_frame=1024)


def _dealer(ctx, addr, keys, identity=None):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    if keys:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = keys
    s.connect(addr)
    return s


@contextlib.contextmanager
def _rank0_over_ipc():
    """A tp=1 coordinator over ipc and a socket that plays its rank 0, joined."""
    coord = Coordinator(tp=1, timeout_s=5.0, transport="ipc")
    ctx = zmq.Context()
    try:
        rank = _dealer(ctx, coord.address, None, identity=coord.client_keys(0)["identity"])
        rank.send_multipart(frames({"op": "hello", "rank": 0}))
        coord.wait_for_ranks(timeout_s=5)
        yield coord, rank
    finally:
        coord.close()
        ctx.destroy(0)


def test_only_this_jobs_keys_can_join_the_coordinator():
    coord = Coordinator(tp=1, timeout_s=2.0)
    ctx = zmq.Context()
    try:
        rogue_pub, rogue_sec = zmq.curve_keypair()
        rogue = _dealer(ctx, coord.address, (coord.keys.server_public, rogue_pub, rogue_sec))
        rogue.send_multipart(frames({"op": "hello", "rank": 0}))
        with pytest.raises(RankFailure, match="hello from ranks \\[0\\] did not arrive"):
            coord.wait_for_ranks(timeout_s=1.5)
        # right identity but no client key pair of this job: still refused by CURVE
        keys = coord.client_keys(0)
        thief = _dealer(ctx, coord.address, (coord.keys.server_public, rogue_pub, rogue_sec),
                        identity=keys["identity"])
        thief.send_multipart(frames({"op": "hello", "rank": 0}))
        with pytest.raises(RankFailure):
            coord.wait_for_ranks(timeout_s=1.0)
        rank = _dealer(ctx, coord.address, (keys["server_public"], keys["public"], keys["secret"]),
                       identity=keys["identity"])
        rank.send_multipart(frames({"op": "hello", "rank": 0}))
        coord.wait_for_ranks(timeout_s=5)
        # a step round trip through the authenticated socket
        plan = StepPlan([0], [0], [2], out_rows=[1])

        import threading
        def answer():
            h, (x,) = decode(rank.recv_multipart())
            rank.send_multipart(frames({"op": "result", "step": h["step"], "rank": 0}, [x[1:] * 2]))
        threading.Thread(target=answer).start()
        out = coord.step(torch.ones(2, 4), plan)
        assert torch.equal(out, torch.full((1, 4), 2.0))
    finally:
        coord.close()
        ctx.destroy(0)


def test_over_ipc_only_the_minted_identities_are_heard():
    coord = Coordinator(tp=1, timeout_s=2.0, transport="ipc")
    ctx = zmq.Context()
    try:
        assert coord.address.startswith("ipc://")
        import os, stat
        d = os.path.dirname(coord.address[len("ipc://"):])
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700  # other users cannot reach the socket
        rogue = _dealer(ctx, coord.address, None, identity=b"rank0-guess")
        rogue.send_multipart(frames({"op": "hello", "rank": 0}))
        with pytest.raises(RankFailure):
            coord.wait_for_ranks(timeout_s=1.0)
        assert coord.stats.dropped_messages == 1
        rank = _dealer(ctx, coord.address, None, identity=coord.client_keys(0)["identity"])
        rank.send_multipart(frames({"op": "hello", "rank": 0}))
        coord.wait_for_ranks(timeout_s=5)
    finally:
        coord.close()
        ctx.destroy(0)


def test_logits_larger_than_a_frame_travel_as_row_chunks(monkeypatch):
    """A step from token ids whose fp32 logits exceed one frame: the rank sends row chunks
    (`chunk_rows`), the coordinator hands back one tensor; too many chunks is one clear error."""
    import threading
    from tpserve.runtime import wire
    monkeypatch.setattr(wire, "MAX_CHUNK", 3 * 10 * 4)  # three rows of 10 fp32 logits a chunk
    logits = torch.randn(7, 10)
    pieces = wire.chunk_rows(logits)
    assert [len(p) for p in pieces] == [3, 3, 1] and torch.equal(torch.cat(pieces), logits)
    with pytest.raises(wire.WireError, match="more than one message carries"):
        wire.chunk_rows(torch.randn(3 * wire.MAX_TENSORS, 10))
    with _rank0_over_ipc() as (coord, rank):
        def answer():
            h, (ids,) = decode(rank.recv_multipart())
            assert h["ids"] is True and ids.dtype == torch.int64
            rank.send_multipart(frames({"op": "result", "step": h["step"], "rank": 0},
                                       [logits.argmax(-1), *pieces]))
        threading.Thread(target=answer).start()
        argmax, got = coord.step_ids(torch.arange(7), StepPlan([0], [0], [7]), logits=True)
        assert torch.equal(got, logits) and torch.equal(argmax, logits.argmax(-1))


def test_a_rank_error_keeps_its_text_for_the_log():
    """A rank that fails a step reports its exception's text; the coordinator's `RankFailure`
    names the rank and the step for clients and keeps that text in `detail` (the server's log
    only: `errors.client_message`), with the step's plan copies reaching the rank on the wire."""
    import threading
    with _rank0_over_ipc() as (coord, rank):
        seen = []

        def fail():
            h, _ = decode(rank.recv_multipart())
            seen.append(h["plan"])
            rank.send_multipart(frames({"op": "error", "step": h["step"], "rank": 0,
                                        "message": "RuntimeError: CUDA error at /home/op/x.py"}))
        threading.Thread(target=fail).start()
        with pytest.raises(RankFailure) as e:
            coord.step(torch.zeros(2, 4), StepPlan([1], [3], [2], copies=[(0, 1, 3)]))
        assert "rank 0 failed in step" in str(e.value) and "/home/op" not in str(e.value)
        assert e.value.detail == "RuntimeError: CUDA error at /home/op/x.py"
        assert seen[0]["copies"] == [[0, 1, 3]]
        # a tpserve error on the rank (a sum that did not arrive) is a sentence for users
        threading.Thread(target=lambda: (decode(rank.recv_multipart()), rank.send_multipart(
            frames({"op": "error", "step": coord.step_id, "rank": 0, "public": True,
                    "message": "the sum of reduction 4 did not arrive within 3s"})))).start()
        with pytest.raises(RankFailure, match="did not arrive within 3s"):
            coord.step(torch.zeros(2, 4), StepPlan([1], [5], [2]))


def test_a_step_sent_to_a_rank_whose_connection_closed_fails_naming_it():
    """A rank process killed between steps: its connection closes, and the coordinator's next
    send to it (ROUTER_MANDATORY) is a `RankFailure` naming that rank, not a bare ZMQError that
    the engine could only report as an unexplained step failure."""
    with _rank0_over_ipc() as (coord, rank):
        rank.close(0)
        deadline = time.monotonic() + 10
        while True:  # the ROUTER forgets the peer once it sees the connection close
            try:
                coord.step(torch.zeros(2, 4), StepPlan([1], [3], [2]))
            except RankFailure as e:
                if "unreachable" in str(e):
                    assert "rank 0 is unreachable" in str(e)
                    break
            assert time.monotonic() < deadline, "the closed connection was never noticed"
