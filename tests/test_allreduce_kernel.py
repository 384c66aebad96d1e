"""The one-shot all-reduce kernel (`tpserve.kernels.allreduce`) across real rank processes.

Each rank is its own process running the Triton kernel under the interpreter; the receive buffers
and flags live in shared memory that every process maps (as GPU ranks map each other's buffers),
so the flags, epochs, phases and spin-waits are the kernel's own. The sums are checked against an
fp64 sum of the partials, and every rank must hold the same bits."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tpserve.kernels.allreduce import (BLOCK, MAX_BLOCKS, one_shot_add_rms_norm,  # noqa: E402
                                       one_shot_all_reduce, one_shot_all_reduce_reference)
from tpserve.kernels.fused import add_rms_norm  # noqa: E402

CAPACITY = 2 * BLOCK + 7  # a partial last block


def _run_ranks(target, world, *args):
    """target(rank, world, *args) in one spawned process per rank; all must finish cleanly."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * world, "a rank process failed or hung"


def _rank(rank, world, bufs, flags, parts, outs, lag_s):
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64)
    for x, out in zip(parts[rank], outs[rank]):
        time.sleep(lag_s * rank)  # a slower rank: the others wait, and run a call ahead
        one_shot_all_reduce(x, out, ptrs(bufs), ptrs(flags), counters, CAPACITY, rank, world)


@pytest.mark.parametrize("world,dtype", [(2, torch.float16), (3, torch.float32)])
def test_one_shot_all_reduce_across_rank_processes(world, dtype):
    torch.manual_seed(world)
    sizes = [CAPACITY, 5, BLOCK + 3, CAPACITY, 1, CAPACITY]  # both phases, twice, partial blocks
    bufs = [torch.zeros(2 * world * CAPACITY, dtype=dtype).share_memory_() for _ in range(world)]
    flags = [torch.zeros(MAX_BLOCKS * world, dtype=torch.int64).share_memory_()
             for _ in range(world)]
    parts = [[(torch.randn(n) * 4).to(dtype).share_memory_() for n in sizes] for _ in range(world)]
    outs = [[torch.full((n,), float("nan"), dtype=dtype).share_memory_() for n in sizes]
            for _ in range(world)]
    _run_ranks(_rank, world, bufs, flags, parts, outs, 0.2)
    for i, n in enumerate(sizes):
        exact = sum(parts[r][i].double() for r in range(world))
        tol = 1e-3 if dtype == torch.float16 else 1e-6  # one rounding of the fp32 sum to dtype
        assert torch.allclose(outs[0][i].double(), exact, rtol=tol, atol=tol), f"call {i} ({n})"
        for r in range(1, world):
            assert torch.equal(outs[r][i], outs[0][i]), f"rank {r} differs from rank 0 at call {i}"
        assert torch.equal(outs[0][i], one_shot_all_reduce_reference([p[i] for p in parts]))


def _norm_rank(rank, world, bufs, flags, parts, hs, w, offset, outs, lag_s):
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64)
    for x, h, (total, normed) in zip(parts[rank], hs, outs[rank]):
        time.sleep(lag_s * rank)
        got = one_shot_add_rms_norm(x, h, w, 1e-5, offset, ptrs(bufs), ptrs(flags), counters,
                                    CAPACITY, rank, world)
        total.copy_(got[0])
        normed.copy_(got[1])


@pytest.mark.parametrize("world,dtype,offset", [(2, torch.float16, None), (3, torch.float32, 1.0)])
def test_one_shot_add_rms_norm_across_rank_processes(world, dtype, offset):
    """The all-reduce fused with the residual add and the next RMSNorm (llama and Gemma scaling):
    the same bits on every rank as the all-reduce followed by `fused.add_rms_norm`."""
    torch.manual_seed(world)
    shapes = [(3, 300), (1, 300), (4, 300), (2, 300)]  # rows x width; each row's epochs advance
    parts = [[(torch.randn(s) * 4).to(dtype).share_memory_() for s in shapes] for _ in range(world)]
    wide = [torch.randn(t, n + 44).to(dtype).share_memory_() for t, n in shapes]
    hs = [x[:, :n] for x, (_, n) in zip(wide, shapes)]  # the residual stream: a strided view
    _check_fused_ranks(world, dtype, parts, parts, hs, offset)


def _check_fused_ranks(world, dtype, parts, taken, hs, offset):
    """Run `one_shot_add_rms_norm` on `parts` in world rank processes; every rank must hold the
    bits of `fused.add_rms_norm` of h and the sum of `taken` (the partials as values)."""
    bufs = [torch.zeros(2 * world * CAPACITY, dtype=dtype).share_memory_() for _ in range(world)]
    flags = [torch.zeros(MAX_BLOCKS * world, dtype=torch.int64).share_memory_()
             for _ in range(world)]
    w = (torch.rand(300) + 0.5).to(dtype).share_memory_()
    outs = [[(torch.full(h.shape, float("nan"), dtype=dtype).share_memory_(),
              torch.full(h.shape, float("nan"), dtype=dtype).share_memory_()) for h in hs]
            for _ in range(world)]
    _run_ranks(_norm_rank, world, bufs, flags, parts, hs, w, offset, outs, 0.2)
    for i in range(len(hs)):
        reduced = one_shot_all_reduce_reference([taken[r][i] for r in range(world)])
        want = add_rms_norm(hs[i], reduced, w, 1e-5, offset, use_triton=True)
        for r in range(world):
            assert torch.equal(outs[r][i][0], want[0]), f"rank {r}, call {i}: h + sum"
            assert torch.equal(outs[r][i][1], want[1]), f"rank {r}, call {i}: its norm"


def test_one_shot_add_rms_norm_takes_fixed_point_partials():
    """Row-parallel GEMVs' fixed-point sums (int64, `fixed_sum.py`) as the fused kernel's
    partials, two rank processes: each rank takes its own (converted to h's dtype, its buffer
    left zeroed) and every rank gets the bits of the all-reduce of the taken values followed by
    `fused.add_rms_norm`; a rank with a written partial beside one with a fixed-point sum too."""
    from tpserve.kernels.fixed_sum import take_reference
    world, dtype = 2, torch.float16
    shapes = [(1, 300), (2, 300), (1, 300)]
    torch.manual_seed(5)
    values = [[(torch.randn(s) * 4).to(dtype) for s in shapes] for _ in range(world)]
    parts = [[(v.double() * 2.0 ** 32).long().share_memory_() if r == 0 or i != 1 else
              v.share_memory_() for i, v in enumerate(row)] for r, row in enumerate(values)]
    taken = [[take_reference(p.clone(), dtype) if p.dtype == torch.int64 else p for p in row]
             for row in parts]
    hs = [torch.randn(s).to(dtype).share_memory_() for s in shapes]
    _check_fused_ranks(world, dtype, parts, taken, hs, None)
    for r, row in enumerate(parts):
        for i, p in enumerate(row):
            if p.dtype == torch.int64:
                assert not p.any(), f"rank {r}, call {i}: the sum left in its buffer"


def _both_halves_rank(rank, world, bufs, flags, xs, hs, w, outs):
    from tpserve.model.layers import RMSNorm
    from tpserve.runtime.torch_dist import _OneShot
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    one = _OneShot(rank, world, torch.device("cpu"), bufs[rank], flags[rank], ptrs(bufs),
                   ptrs(flags))
    norm = RMSNorm(w, 1e-5)
    for i, (x, h) in enumerate(zip(xs[rank], hs)):
        time.sleep(0.1 * rank)
        if i % 2:  # a decode step alternates plain sums (the head's, a layer's) and fused ones
            got = one.add_norm(x.view(h.shape), h, norm)
            outs[rank][i][0].copy_(got[0].view(-1))
            outs[rank][i][1].copy_(got[1].view(-1))
        else:
            outs[rank][i][0].copy_(one(x.clone()))


def test_one_shot_plain_and_fused_calls_keep_apart():
    """One rank's one-shot mapping (`torch_dist._OneShot`) runs both kernels in any order: each has
    its half of the receive buffers, flags and epochs, so neither reads the other's partials."""
    from tpserve.runtime.torch_dist import _OneShot
    world, dtype, n = 2, torch.float16, 2 * BLOCK + 5  # the plain sums span several blocks
    buf_bytes, n_flags = _OneShot.sizes(world, MAX_BLOCKS)
    bufs = [torch.zeros(buf_bytes, dtype=torch.uint8).share_memory_() for _ in range(world)]
    flags = [torch.zeros(n_flags, dtype=torch.int64).share_memory_() for _ in range(world)]
    hs = [torch.randn(n // 300, 300).to(dtype).share_memory_() for _ in range(4)]
    xs = [[torch.randn(n if i % 2 == 0 else hs[i].numel()).to(dtype).share_memory_()
           for i in range(4)] for _ in range(world)]
    w = (torch.rand(300) + 0.5).to(dtype).share_memory_()
    outs = [[(torch.zeros(x.numel(), dtype=dtype).share_memory_(),
              torch.zeros(x.numel(), dtype=dtype).share_memory_()) for x in xs[0]]
            for _ in range(world)]
    _run_ranks(_both_halves_rank, world, bufs, flags, xs, hs, w, outs)
    for i in range(4):
        reduced = one_shot_all_reduce_reference([xs[r][i] for r in range(world)])
        for r in range(world):
            if i % 2:
                want = add_rms_norm(hs[i], reduced.view(hs[i].shape), w, 1e-5, use_triton=True)
                assert torch.equal(outs[r][i][0], want[0].view(-1)), f"rank {r}, call {i}"
                assert torch.equal(outs[r][i][1], want[1].view(-1)), f"rank {r}, call {i}"
            else:
                assert torch.equal(outs[r][i][0], reduced), f"rank {r}, call {i}"


def test_one_shot_in_place_and_its_capacity():
    x = torch.randn(BLOCK + 9, dtype=torch.float16)
    want = x.clone()
    buf = torch.zeros(2 * CAPACITY, dtype=torch.float16)
    flags = torch.zeros(MAX_BLOCKS, dtype=torch.int64)
    ptr = lambda t: torch.tensor([t.data_ptr()], dtype=torch.int64)  # noqa: E731
    counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64)
    assert one_shot_all_reduce(x, x, ptr(buf), ptr(flags), counters, CAPACITY, 0, 1) is x
    assert torch.equal(x, want) and counters[:2].tolist() == [1, 1]
    with pytest.raises(ValueError, match="exceeds its capacity"):
        one_shot_all_reduce(torch.zeros(CAPACITY + 1, dtype=torch.float16), x, ptr(buf),
                            ptr(flags), counters, CAPACITY, 0, 1)


def _fallback_rank(rank, port, q):
    import torch.distributed as dist
    from tpserve.runtime.torch_dist import _OneShot
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    if rank == 0:  # rank 0 allocates (plain memory standing in for a GPU's symmetric memory)
        import torch.distributed._symmetric_memory as symm_mem
        symm_mem.empty = lambda *shape, dtype, device: torch.empty(*shape, dtype=dtype)
    try:
        # rank 1 cannot allocate peer memory (CPU tensors have none): both must fall back,
        # rank 0 without waiting in a rendezvous its peer never joins
        q.put((rank, _OneShot.create(dist, rank, 2, torch.device("cpu")) is None))
    finally:
        dist.destroy_process_group()


def test_every_rank_keeps_nccl_when_one_cannot_map_peer_memory():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fallback_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed or hung in the fallback"
    assert sorted(q.get(timeout=5) for _ in range(2)) == [(0, True), (1, True)]


def test_dist_path_fuses_only_what_its_kernel_takes(monkeypatch):
    """`DistPath.reduce_add_norm` at world 1 (the kernels under the interpreter): rows of the
    group's dtype take the fused kernel (the same bits as add_rms_norm); another dtype, rows too
    wide, a weight of another dtype or TPSERVE_ONE_SHOT_NORM=0 return None (the caller adds
    apart), without advancing any epoch."""
    from tpserve.model.layers import RMSNorm
    from tpserve.runtime import torch_dist
    buf_bytes, n_flags = torch_dist._OneShot.sizes(1, MAX_BLOCKS)
    buf, flags = torch.zeros(buf_bytes, dtype=torch.uint8), torch.zeros(n_flags, dtype=torch.int64)
    ptr = lambda t: torch.tensor([t.data_ptr()], dtype=torch.int64)  # noqa: E731
    path = torch_dist.DistPath.__new__(torch_dist.DistPath)  # its group is not needed at world 1
    path.one_shot = torch_dist._OneShot(0, 1, torch.device("cpu"), buf, flags, ptr(buf), ptr(flags))
    norm = RMSNorm(torch.rand(64).half() + 0.5, 1e-5)
    x, h = torch.randn(2, 64).half(), torch.randn(2, 64).half()
    got = path.reduce_add_norm(x, h, norm)
    want = add_rms_norm(h, x, norm.weight, 1e-5, use_triton=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert path.one_shot.norm_counters[:3].tolist() == [1, 1, 0]
    fixed = (x.double() * 2.0 ** 32).long()  # a GEMV's fixed-point sum of x (fixed_sum.py)
    got = path.reduce_add_norm(fixed, h, norm)  # taken in h's dtype, as a partial of h's dtype
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and not fixed.any()
    assert path.one_shot.norm_counters[:3].tolist() == [2, 2, 0]
    assert path.reduce_add_norm(x.float(), h.float(), norm) is None  # the group's dtype is fp16
    assert path.reduce_add_norm(x, h, RMSNorm(norm.weight.float(), 1e-5)) is None
    wide = torch.randn(1, 16385).half()
    assert path.reduce_add_norm(wide, wide.clone(), RMSNorm(None, 1e-5)) is None
    monkeypatch.setenv(torch_dist.FUSED_NORM_ENV, "0")
    path.one_shot = torch_dist._OneShot(0, 1, torch.device("cpu"), buf, flags, ptr(buf), ptr(flags))
    assert path.reduce_add_norm(x, h, norm) is None
    assert not path.one_shot.norm_counters.any()
