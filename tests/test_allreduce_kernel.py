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

from tpserve.kernels.allreduce import (BLOCK, MAX_BLOCKS, one_shot_all_reduce,  # noqa: E402
                                       one_shot_all_reduce_reference)

CAPACITY = 2 * BLOCK + 7  # a partial last block


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
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, bufs, flags, parts, outs, 0.2))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * world, "a rank process failed or hung"
    for i, n in enumerate(sizes):
        exact = sum(parts[r][i].double() for r in range(world))
        tol = 1e-3 if dtype == torch.float16 else 1e-6  # one rounding of the fp32 sum to dtype
        assert torch.allclose(outs[0][i].double(), exact, rtol=tol, atol=tol), f"call {i} ({n})"
        for r in range(1, world):
            assert torch.equal(outs[r][i], outs[0][i]), f"rank {r} differs from rank 0 at call {i}"
        assert torch.equal(outs[0][i], one_shot_all_reduce_reference([p[i] for p in parts]))


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
