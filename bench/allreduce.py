"""All-reduce latency: tpserve's coordinator (ZMQ star, msgpack + raw frames) vs torch.distributed gloo.

    python bench/allreduce.py [--tp 2 4] [--sizes 8K 64K 1M 16M] [--transport tcp ipc] \
        [--out bench/results/allreduce.json]

Both run tp rank processes on this host. tpserve: the real `Coordinator` in this process and the
real `ZmqComm` in each rank (CurveZMQ on TCP, a 0700 unix socket for ipc, as in production); each rank times a loop of
all_reduce calls inside one coordinator step. gloo: `dist.all_reduce` in the same processes'
shape. Reported: median microseconds per all-reduce of an fp32 tensor of the given size, and
gloo / tpserve (higher is better for tpserve).
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


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1)
    return int(s[:-1] if s[-1].isalpha() else s) * mult


def iters_for(nbytes: int) -> int:
    return max(10, min(400, int(2e8 // max(nbytes, 1) // 8)))


# ---- tpserve -------------------------------------------------------------------------------
def _zmq_rank(rank, tp, address, keys, sizes, out_q):
    import zmq

    from tpserve.runtime.rank_worker import ZmqComm
    from tpserve.runtime.wire import decode, encode
    torch.set_num_threads(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, keys["identity"])
    if "secret" in keys:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            keys["server_public"], keys["public"], keys["secret"])
    sock.connect(address)
    comm = ZmqComm(rank, tp, timeout_s=60)
    comm.sock = sock
    sock.send_multipart(encode({"op": "hello", "rank": rank}))
    results = {}
    for nbytes in sizes:
        h, _ = decode(sock.recv_multipart())
        comm.step, comm.seq = h["step"], 0
        x = torch.randn(nbytes // 4)
        times = []
        for _ in range(iters_for(nbytes)):
            t0 = time.perf_counter()
            comm.all_reduce(x)
            times.append(time.perf_counter() - t0)
        results[nbytes] = statistics.median(times[len(times) // 5:])  # drop warm-up
        if rank == 0:
            sock.send_multipart(encode({"op": "result", "step": h["step"], "rank": 0},
                                       [torch.zeros(1, 1)]))
    out_q.put((rank, results))
    sock.close(0)
    ctx.term()


def bench_tpserve(tp: int, sizes: list[int], transport: str) -> dict[int, float]:
    from tpserve.runtime.coordinator import Coordinator
    from tpserve.model.kv_cache import StepPlan
    coord = Coordinator(tp, transport=transport)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_zmq_rank, args=(r, tp, coord.address, coord.client_keys(r), sizes, q))
             for r in range(tp)]
    for p in procs:
        p.start()
    coord.wait_for_ranks(timeout_s=60)
    for _ in sizes:  # one coordinator step per size; the ranks run their loops inside it
        coord.step(torch.zeros(1, 1), StepPlan([0], [0], [1]))
    res = dict(q.get(timeout=60) for _ in range(tp))
    for p in procs:
        p.join(10)
    coord.close()
    return {n: max(res[r][n] for r in range(tp)) for n in sizes}  # the slowest rank bounds a step


# ---- gloo ----------------------------------------------------------------------------------
def _gloo_rank(rank, tp, port, sizes, out_q):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=tp)
    results = {}
    for nbytes in sizes:
        x = torch.randn(nbytes // 4)
        dist.barrier()
        times = []
        for _ in range(iters_for(nbytes)):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        results[nbytes] = statistics.median(times[len(times) // 5:])
    out_q.put((rank, results))
    dist.destroy_process_group()


def bench_gloo(tp: int, sizes: list[int]) -> dict[int, float]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, tp, port, sizes, q)) for r in range(tp)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=120) for _ in range(tp))
    for p in procs:
        p.join(10)
    return {n: max(res[r][n] for r in range(tp)) for n in sizes}


def fmt(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", nargs="+", default=["8K", "64K", "1M", "16M"])
    ap.add_argument("--transport", nargs="+", default=["tcp", "ipc"])
    ap.add_argument("--out")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    rows = []
    for tp in args.tp:
        gloo = bench_gloo(tp, sizes)
        for transport in args.transport:
            ours = bench_tpserve(tp, sizes, transport)
            for n in sizes:
                rows.append({"tp": tp, "bytes": n, "transport": transport,
                             "tpserve_us": ours[n] * 1e6, "gloo_us": gloo[n] * 1e6,
                             "gloo_over_tpserve": gloo[n] / ours[n]})
    print(f"{'tp':>3} {'size':>5} {'transport':>9} {'tpserve us':>11} {'gloo us':>9} {'gloo/tpserve':>12}")
    for r in rows:
        print(f"{r['tp']:>3} {fmt(r['bytes']):>5} {r['transport']:>9} {r['tpserve_us']:>11.1f} "
              f"{r['gloo_us']:>9.1f} {r['gloo_over_tpserve']:>12.2f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"host_cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
