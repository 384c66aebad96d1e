"""The torch.distributed all-reduce: NCCL for GPU ranks (stays on the GPU, CUDA-graph capturable),
gloo for CPU ranks (the same rendezvous, testable on any machine).

The coordinator owns the rendezvous: `DistDriver` hosts a TCPStore in the driver process and hands
each rank its address plus a secret per-group key prefix over the coordinator's authenticated ZMQ
channel (never through Ray or a world-readable path). The prefix keeps concurrent or rebuilt groups
apart. Neither the TCPStore (it listens on every interface) nor NCCL's or gloo's own sockets are
authenticated, which is why `auto` uses this path only for ranks on the driver's host and the zmq
star (CurveZMQ) stays the path across hosts.

`DistPath.reduce` calls `dist.all_reduce(x)` in place and returns `x`: no host sync, no copy, so
a decode step that calls it on a static buffer can be captured in a CUDA graph. NCCL sums in the
tensor's dtype in its own order (fp16 partials are not accumulated in fp32 as on the CPU paths).
"""

from __future__ import annotations

import secrets
from datetime import timedelta

import torch

from tpserve.errors import TpserveError


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise TpserveError("this torch build has no torch.distributed; use allreduce='zmq'")
    return dist


class DistDriver:
    """Driver half: a TCPStore rendezvous and a secret key prefix per rank group."""

    def __init__(self, backend: str, host: str, timeout_s: float):
        dist = _dist()
        self.name, self.host, self.timeout_s = backend, host, timeout_s
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))
        self.prefix = f"tpserve-{secrets.token_hex(16)}/"

    def setup(self, rank: int) -> dict:
        return {"backend": self.name, "host": self.host, "port": self.store.port,
                "prefix": self.prefix}

    def joined(self) -> None:
        pass

    def progress(self) -> int:
        return 0  # reductions never pass through the driver: a step must finish within the timeout

    def abort(self) -> None:
        pass  # ranks blocked in a collective are released by killing them (`recover`)

    def close(self) -> None:
        self.store = None


class DistPath:
    """Rank half: joins the process group named by the coordinator's setup message."""

    def __init__(self, setup: dict, rank: int, tp: int, timeout_s: float):
        dist = _dist()
        backend, host, port, prefix = (setup.get(k) for k in ("backend", "host", "port", "prefix"))
        if backend not in ("nccl", "gloo") or not isinstance(host, str) or \
                not isinstance(port, int) or not isinstance(prefix, str):
            raise TpserveError(f"torch.distributed setup {setup!r} is malformed")
        if dist.is_initialized():  # a rebuilt group in a reused process
            dist.destroy_process_group()
        timeout = timedelta(seconds=timeout_s)
        store = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False, timeout=timeout))
        device = None
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend, store=store, rank=rank, world_size=tp, timeout=timeout,
                                device_id=device)
        self.dist, self.backend = dist, backend
        self.capturable = backend == "nccl"  # NCCL collectives record into a CUDA graph
        if device is not None:  # NCCL builds its communicator lazily: pay for it now, not in step 1
            self.dist.all_reduce(torch.zeros(1, device=device))
            torch.cuda.synchronize()

    def reduce(self, x: torch.Tensor, step: int, seq: int) -> torch.Tensor:
        if (x.device.type == "cuda") != (self.backend == "nccl"):
            raise TpserveError(f"allreduce={self.backend!r} cannot reduce a tensor on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        self.dist.all_reduce(x)
        return x

    def close(self) -> None:
        self.dist.destroy_process_group()
