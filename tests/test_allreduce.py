"""The all-reduce data paths: choice, numerics, the shared-memory segment's life, faults.

Rank processes here run the real `RankWorker.serve` loop (setup message, data path, `RankComm`)
against the real `Coordinator`; a small stand-in model makes each rank all-reduce seeded partials
and check the result against `reduce_sum` of every rank's partial, bit for bit.
"""

import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan
from tpserve.runtime import shm
from tpserve.runtime.comm import Aborted, choose_path, reduce_sum, reduce_sum_numpy
from tpserve.runtime.coordinator import Coordinator, RankFailure
from tpserve.runtime.rank_worker import RankWorker
from tpserve.runtime.wire import decode, encode

from bare_rank import bare_rank

# (numel, dtype): one element, one-shot sizes, two-shot sizes (shm: from 32768 elements fp32 and
# fp16 move through numpy, bf16 through torch), and 4.8 MB: two slot-sized pieces
CASES = [(1, "float32"), (100, "float16"), (2048, "float32"), (70000, "bfloat16"),
         (200000, "float32"), (300000, "float16"), (1_200_000, "float32")]


def partial(rank: int, step: int, case: int) -> torch.Tensor:
    numel, dtype = CASES[case]
    g = torch.Generator().manual_seed(1000 * step + 10 * case + rank)
    return (torch.randn(numel, generator=g) * 3).to(getattr(torch, dtype))


class CheckingModel:
    """Stands in for the rank's model: all-reduces each case, checks it bit for bit."""

    def __init__(self, comm, cases):
        self.comm, self.cases = comm, cases

    def use_fixed_sums(self, on: bool):
        pass  # the rank worker's call once its group is set up; its partials are plain tensors

    def __call__(self, h, plan):
        step = int(h[0, 0])
        for c in self.cases:
            got = self.comm.all_reduce(partial(self.comm.rank, step, c))
            want = reduce_sum([partial(r, step, c) for r in range(self.comm.world_size)])
            assert torch.equal(got, want), f"case {CASES[c]} differs from reduce_sum"
        return h + 1


def rank_main(rank, tp, address, keys, cases):
    worker = RankWorker(rank, tp, ".", "float32", "cpu", 1, 1, timeout_s=30, threads=1)
    worker.model = CheckingModel(worker.comm, cases)
    worker.serve(address, keys)


def start_group(path: str, tp: int, cases, timeout_s: float = 30.0):
    coord = Coordinator(tp, timeout_s=timeout_s, transport="ipc", allreduce=path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, tp, coord.address, coord.client_keys(r), cases))
             for r in range(tp)]
    for p in procs:
        p.start()
    coord.wait_for_ranks(timeout_s=120)
    return coord, procs


def stop_group(coord, procs):
    coord.close()
    for p in procs:
        p.join(10)
        assert p.exitcode == 0, "a rank did not stop cleanly"


def step(coord, n: int) -> torch.Tensor:
    return coord.step(torch.full((1, 2), float(n)), StepPlan([0], [0], [1]))


@pytest.mark.parametrize("path,tp,cases", [
    ("shm", 3, range(len(CASES))),  # odd tp: uneven two-shot chunks
    ("shm", 2, [4, 5]),  # one-shot sums of large partials (numpy)
    ("zmq", 2, range(len(CASES))),
    ("gloo", 2, [0, 2, 4]),  # gloo sums fp32 pairs exactly as torch.add does
])
def test_every_path_matches_reduce_sum_bit_for_bit_on_every_rank(path, tp, cases):
    coord, procs = start_group(path, tp, list(cases))
    try:
        if path == "shm":  # every rank mapped it: the name is gone, nothing can leak from now on
            assert not coord.data.file.exists()
        for n in (1, 2, 3):
            assert torch.equal(step(coord, n), torch.full((1, 2), n + 1.0))
        assert coord.stats.allreduce_count == 3 * len(cases)  # calls, however many pieces
        assert coord.stats.allreduce_seconds > 0 and coord.stats.dropped_messages == 0
    finally:
        stop_group(coord, procs)


def test_a_killed_rank_fails_the_step_and_releases_the_others():
    coord, procs = start_group("shm", 2, [2], timeout_s=2.0)
    try:
        step(coord, 1)
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 1 never publishes; rank 0 waits in shm
        t0 = time.monotonic()
        with pytest.raises(RankFailure, match="did not arrive within 2s"):
            step(coord, 2)
        assert time.monotonic() - t0 < 6
        assert coord.data.seg.q[3] == 1  # aborted: rank 0 leaves its wait at once
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join(5)
        coord.close()
        procs[0].join(10)
        assert procs[0].exitcode == 0, "rank 0 stayed blocked in the shared-memory wait"
    finally:
        for p in procs:
            p.kill()


def test_segment_is_private_unguessable_and_gone_after_close():
    old = os.umask(0)  # even a permissive umask must not widen it
    try:
        d = shm.ShmDriver(2)
    finally:
        os.umask(old)
    try:
        st = d.file.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        assert shm.NAME.match(d.seg_name) and len(d.seg_name.rsplit("-", 1)[1]) == 32
        assert d.setup(1) == {"name": d.seg_name, "capacity": shm.CAPACITY}
    finally:
        d.close()
    assert not d.file.exists()


def test_a_sigkilled_driver_leaves_nothing_once_the_next_launch_runs():
    code = ("from tpserve.runtime.coordinator import Coordinator; import sys, time; "
            "c = Coordinator(2, transport='ipc', allreduce='shm'); print(c.data.seg_name, "
            "flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
        assert (shm.SHM_DIR / name).exists()
        assert name not in shm.cleanup_stale()  # its driver is alive: left alone
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert (shm.SHM_DIR / name).exists()  # the crash left it behind
    shm.ShmDriver(2).close()  # the next launch sweeps it
    assert not (shm.SHM_DIR / name).exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_numpy_sums_equal_reduce_sum_bit_for_bit(dtype, tp):
    """The shm path's numpy sums against torch's: rank order, fp32 accumulation, and the
    rounding back to fp16 (ties, subnormals, overflow to inf) bit for bit."""
    g = torch.Generator().manual_seed(tp)
    parts = [(torch.randn(5000, generator=g) * 10 ** torch.randint(-8, 5, (5000,), generator=g))
             .to(dtype) for _ in range(tp)]
    if dtype == torch.float16:  # halfway cases, subnormal sums, sums past fp16's range
        parts[0][:4] = torch.tensor([1.0, 2 ** -24, 60000.0, -60000.0])
        parts[1][:4] = torch.tensor([2 ** -11, 2 ** -25, 60000.0, -60000.0])
    want = reduce_sum(parts)
    out = torch.empty_like(parts[0])
    reduce_sum_numpy([p.numpy() for p in parts], out.numpy())
    assert torch.equal(out.view(torch.int16 if dtype == torch.float16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.float16 else torch.int32))


def pair(tp=2, timeout_s=5.0):
    d = shm.ShmDriver(tp, capacity=1 << 16)
    return d, [shm.ShmPath(d.setup(r), r, tp, timeout_s) for r in range(tp)]


def run_ranks(fns):
    errors = [None] * len(fns)

    def run(i):
        try:
            fns[i]()
        except Exception as e:
            errors[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return errors


def test_partials_of_another_shape_or_reduction_are_refused_and_counted():
    d, (a, b) = pair()
    try:
        errors = run_ranks([lambda: a.reduce(torch.ones(10), 1, 1),
                            lambda: b.reduce(torch.ones(12), 1, 1)])
        assert all(isinstance(e, TpserveError) and "out of step" in str(e) for e in errors)
        assert a.mismatches == b.mismatches == 1
        errors = run_ranks([lambda: a.reduce(torch.ones(10), 2, 1),
                            lambda: b.reduce(torch.ones(10), 2, 2)])  # replayed / skipped seq
        assert all(isinstance(e, TpserveError) for e in errors)
    finally:
        d.close()


def test_a_lone_rank_times_out_and_abort_releases_it_at_once():
    d, (a, _) = pair(timeout_s=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(TpserveError, match="partial of rank 1 .* did not arrive within 1s"):
            a.reduce(torch.ones(4), 1, 1)
        assert 0.9 < time.monotonic() - t0 < 4
        threading.Timer(0.2, d.abort).start()
        t0 = time.monotonic()
        with pytest.raises(Aborted):
            a.reduce(torch.ones(4), 1, 2)
        assert time.monotonic() - t0 < 0.9
    finally:
        d.close()


def test_a_rank_answers_hostile_setup_messages_with_an_error_and_keeps_serving(tmp_path):
    ident = b"rank0-test"
    d = shm.ShmDriver(2)
    try:
        with bare_rank(tmp_path, ident, timeout_s=5) as (router, worker):
            for path, comm in [("shm", {"name": "../../etc/passwd", "capacity": 1}),
                               ("shm", {"name": "tpserve-ar-1-" + "0" * 32, "capacity": 4096}),
                               ("shm", "not a map"), ("warp", {}), ("gloo", {"port": "x"})]:
                router.send_multipart([ident, *encode({"op": "setup", "path": path, "comm": comm})])
                assert router.poll(10000)
                h, _ = decode(router.recv_multipart()[1:])
                assert h["op"] == "error" and h["message"], (path, comm)
            router.send_multipart([ident, *encode({"op": "setup", "path": "shm",
                                                   "comm": d.setup(0)})])
            assert router.poll(10000)
            assert decode(router.recv_multipart()[1:])[0]["op"] == "ready"
            assert isinstance(worker.comm.path, shm.ShmPath)
    finally:
        d.close()


@pytest.mark.parametrize("requested,tp,device,local,want", [
    ("auto", 4, "cpu", True, "shm"), ("auto", 4, "cpu", False, "zmq"),
    ("auto", 2, "cuda", True, "cuda"), ("auto", 2, "cuda", False, "zmq"),
    ("nccl", 2, "cuda", False, "nccl"), ("cuda", 4, "cuda", True, "cuda"),
    ("auto", 1, "cpu", True, "zmq"), ("zmq", 4, "cpu", True, "zmq"),
    ("gloo", 2, "cpu", False, "gloo"),
])
def test_auto_picks_the_fastest_path_the_placement_allows(requested, tp, device, local, want):
    path, why = choose_path(requested, tp, device, local, None)
    assert path == want and why


def test_auto_falls_back_to_zmq_without_usable_shared_memory_and_says_why():
    assert choose_path("auto", 2, "cpu", True, "no /dev/shm") == ("zmq", "no /dev/shm: the "
           "coordinator carries the bytes (CurveZMQ over TCP across hosts)")


@pytest.mark.parametrize("requested,device,local,match", [
    ("shm", "cpu", False, "ranks span several hosts"), ("shm", "cuda", True, "device=cuda"),
    ("nccl", "cpu", True, "needs device='cuda'"), ("gloo", "cuda", True, "CPU tensors only"),
    ("cuda", "cpu", True, "needs device='cuda'"), ("cuda", "cuda", False, "several hosts"),
    ("infiniband", "cpu", True, "is not known"),
])
def test_an_impossible_choice_is_refused_in_one_sentence(requested, device, local, match):
    with pytest.raises(TpserveError, match=match):
        choose_path(requested, 2, device, local, None)


def test_the_allreduce_benchmark_runs_its_cpu_table(tmp_path):
    """bench/allreduce.py end to end on CPU (real rank processes, coordinator, gloo): the table
    the shm goals are read from keeps working; no speed is asserted here."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).parent.parent / "bench" / "allreduce.py"
    out = tmp_path / "ar.json"
    subprocess.run([sys.executable, str(bench), "--tp", "2", "--sizes", "8K", "--paths", "shm",
                    "--out", str(out)], check=True, timeout=240, capture_output=True)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tp"] == 2 and row["bytes"] == 8192
    assert row["gloo_us"] > 0 and row["shm_us"] > 0 and row["shm_vs_gloo"] > 0
