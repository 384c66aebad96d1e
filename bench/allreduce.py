"""All-reduce latency: tpserve's data paths against torch.distributed (gloo always, NCCL on GPUs).

    python bench/allreduce.py [--tp 2 4] [--sizes 8K 64K 1M 16M] [--paths zmq shm] \
        [--gpu] [--out bench/results/allreduce.json]

Every number comes from tp rank processes on this host, each timing a loop of all-reduces of an
fp32 tensor of the given size (median, warm-up dropped; the slowest rank is reported, since it
bounds a step). tpserve: the real `Coordinator` in this process and the real `RankWorker` serve
loop in each rank (setup message, data path, `RankComm`), the timing loop standing in for the
model inside one coordinator step. Paths: `zmq` (the coordinator's star over a 0700 unix socket,
as for same-host ranks), `zmq-tcp` (CurveZMQ over TCP, as across hosts), `shm` (shared memory;
`shm-torch`: the same with torch's multi-threaded copies and sums instead of numpy's above 32K
elements, for the A/B of that choice).
With `--gpu` (needs tp GPUs): raw NCCL, tpserve's `nccl` and `cuda` paths (`cuda`: the one-shot
kernel over peer memory up to 1 MiB, NCCL above), and `nccl-graph` / `cuda-graph` (the path
captured in a CUDA graph of 16 all-reduces on a static buffer, replayed; time per all-reduce:
what a captured decode step pays).
GPU loops synchronise after every all-reduce (graph: after every replay). Ratios printed:
gloo / path (higher is better for the path) and, on GPUs, path / NCCL (lower is better).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

GRAPH_CALLS = 16


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1)
    return int(s[:-1] if s[-1].isalpha() else s) * mult


def iters_for(nbytes: int) -> int:
    return max(20, min(2000, int(4e8 // max(nbytes, 1) // 8)))


def threads_for(tp: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp)  # what RayExecutor gives each CPU rank


def time_loop(fn, nbytes: int, sync) -> float:
    times = []
    for _ in range(iters_for(nbytes)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(times) // 5:])  # drop warm-up


def _nosync():
    pass


class _Timer:
    """Stands in for the rank's model: times comm.all_reduce at each size inside one step."""

    def __init__(self, comm, sizes, device, graph, out_q):
        self.comm, self.sizes, self.device, self.graph, self.q = comm, sizes, device, graph, out_q

    def capture_graphs(self, head=None):
        pass  # a GPU rank captures its model's graphs at setup; this stand-in captures its own

    def use_fixed_sums(self, on: bool):
        pass  # its partials are plain tensors

    def __call__(self, h, plan):
        sync = torch.cuda.synchronize if self.device == "cuda" else _nosync
        results = {}
        for nbytes in self.sizes:
            x = torch.randn(nbytes // 4, device=self.device)
            if self.graph:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(GRAPH_CALLS):
                        x = self.comm.all_reduce(x)
                results[nbytes] = time_loop(g.replay, nbytes, sync) / GRAPH_CALLS
                # and the replayed graph really reduces: ranks hold r + 1, each call sums in place
                x.fill_(self.comm.rank + 1.0)
                g.replay()
                want = sum(range(1, self.comm.world_size + 1)) * self.comm.world_size ** (
                    GRAPH_CALLS - 1)
                results["graph_ok"] = bool((x == want).all()) and results.get("graph_ok", True)
            else:
                results[nbytes] = time_loop(lambda: self.comm.all_reduce(x), nbytes, sync)
        self.q.put((self.comm.rank, results))
        return h


def _tpserve_rank(rank, tp, address, keys, sizes, device, graph, out_q, torch_ops=False):
    from tpserve.runtime import shm
    from tpserve.runtime.rank_worker import RankWorker
    if torch_ops:  # shm-torch: the shm path with torch's (OpenMP) copies and sums at every size
        shm.NUMPY_MIN = 1 << 62
    if device == "cuda":
        torch.cuda.set_device(rank)
    worker = RankWorker(rank, tp, ".", "float32", device, 1, 1, timeout_s=300,
                        threads=threads_for(tp))
    worker.gpu = rank  # serve() makes it current: each rank process on its own GPU
    worker.model = _Timer(worker.comm, sizes, device, graph, out_q)
    worker.serve(address, keys, setup_follows=device == "cuda")


def _gather(q, tp: int, sizes: list[int]) -> dict[int, float]:
    res = dict(q.get(timeout=600) for _ in range(tp))
    if any(not r.get("graph_ok", True) for r in res.values()):
        raise SystemExit("a replayed CUDA graph of all-reduces gave wrong sums")
    return {n: max(res[r][n] for r in range(tp)) for n in sizes}


def bench_tpserve(tp: int, sizes: list[int], path: str) -> dict[int, float]:
    from tpserve.model.kv_cache import StepPlan
    from tpserve.runtime.coordinator import Coordinator
    tcp, gpu = path == "zmq-tcp", path.startswith(("nccl", "cuda"))
    coord = Coordinator(tp, timeout_s=300, transport="tcp" if tcp else "ipc",
                        allreduce="zmq" if tcp else path.split("-")[0])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tpserve_rank, args=(r, tp, coord.address, coord.client_keys(r),
                                                     sizes, "cuda" if gpu else "cpu",
                                                     path.endswith("-graph"), q,
                                                     path == "shm-torch"))
             for r in range(tp)]
    for p in procs:
        p.start()
    try:
        coord.wait_for_ranks(timeout_s=120)
        coord.step(torch.zeros(1, 1), StepPlan([0], [0], [1]))
        return _gather(q, tp, sizes)
    finally:
        coord.close()  # its stop message ends the ranks' serve loops
        for p in procs:
            p.join(30)


def _dist_rank(rank, tp, backend, port, sizes, out_q):
    import torch.distributed as dist
    torch.set_num_threads(threads_for(tp))
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=tp)
    sync = torch.cuda.synchronize if device == "cuda" else _nosync
    results = {}
    for nbytes in sizes:
        x = torch.randn(nbytes // 4, device=device)
        dist.barrier()
        results[nbytes] = time_loop(lambda: dist.all_reduce(x), nbytes, sync)
    out_q.put((rank, results))
    dist.destroy_process_group()


def bench_dist(tp: int, sizes: list[int], backend: str) -> dict[int, float]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_rank, args=(r, tp, backend, port, sizes, q))
             for r in range(tp)]
    for p in procs:
        p.start()
    try:
        return _gather(q, tp, sizes)
    finally:
        for p in procs:
            p.join(30)


def fmt(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", nargs="+", default=["8K", "64K", "1M", "16M"])
    ap.add_argument("--paths", nargs="+", default=["zmq", "shm"],
                    choices=["zmq", "zmq-tcp", "shm", "shm-torch"])
    ap.add_argument("--gpu", action="store_true",
                    help="also NCCL, tpserve nccl / cuda, each eager and captured")
    ap.add_argument("--out")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    rows = []
    for tp in args.tp:
        times = {"gloo": bench_dist(tp, sizes, "gloo")}
        for path in args.paths:
            times[path] = bench_tpserve(tp, sizes, path)
        if args.gpu:
            times["NCCL"] = bench_dist(tp, sizes, "nccl")
            for path in ("nccl", "nccl-graph", "cuda", "cuda-graph"):
                times[path] = bench_tpserve(tp, sizes, path)
        for n in sizes:
            row = {"tp": tp, "bytes": n, **{f"{k}_us": v[n] * 1e6 for k, v in times.items()}}
            for k, v in times.items():
                if k not in ("gloo", "NCCL"):
                    ref = "NCCL" if k.startswith(("nccl", "cuda")) else "gloo"
                    row[f"{k}_vs_{ref}"] = (v[n] / times[ref][n] if ref == "NCCL"
                                            else times[ref][n] / v[n])
            rows.append(row)
    keys = [k for k in rows[0] if k not in ("tp", "bytes")]
    print(f"{'tp':>3} {'size':>5} " + " ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print(f"{r['tp']:>3} {fmt(r['bytes']):>5} " + " ".join(f"{r[k]:>16.2f}" for k in keys))
    print("(_us: median microseconds; *_vs_gloo: gloo time / path time; *_vs_NCCL: path / NCCL)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"host_cpus": os.cpu_count(), "torch": torch.__version__,
                "python": sys.version.split()[0],
                "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
