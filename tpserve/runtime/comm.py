"""The communication interface the TP math talks to: a rank half and a driver half.

Rank half (`Comm`): what model code holds. It only ever calls `comm.all_reduce(x)` and reads
`comm.rank` / `comm.world_size`. `all_reduce` may reduce `x` in place and return it (the GPU path
does, so a captured CUDA graph reuses one static buffer); callers must use the return value.

Driver half (`CommDriver`): what an executor holds for the whole group. It sets the group up,
chooses the data path, counts and times reductions into `CommStats`, turns a dead rank into a
failure, and tears everything down. Two implementations: the ZMQ `Coordinator` (ranks are
processes; it carries the bytes itself on the `zmq` path, hands out a shared-memory segment on
`shm` or a torch.distributed rendezvous on `cuda`/`nccl`/`gloo`) and `LocalGroup` below (ranks are threads
of one process, for tests and `backend="local"`).

Every CPU path sums the partials in rank order in fp32 (`reduce_sum`) and casts back, so every rank
gets bit-identical results and tp ranks of fp16 partials lose no more than one rounding.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np
import torch

from tpserve.errors import TpserveError
from tpserve.runtime.executor import CommStats

ALLREDUCE = ("auto", "zmq", "shm", "cuda", "nccl", "gloo")


class Comm(Protocol):
    rank: int
    world_size: int
    capturable: bool  # all_reduce may run inside a CUDA graph capture (the whole step is one graph)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    # Optional: all_reduce_add_norm(x, h, norm) -> (h + sum, norm of it) or None (`RankComm`).


class CommDriver(Protocol):
    path: str  # the data path that carries the bytes: local | zmq | shm | cuda | nccl | gloo
    stats: CommStats

    def abort(self) -> None:
        """Release every rank blocked inside an all-reduce (after one of them failed)."""

    def close(self) -> None:
        """Tear the group's communication down; frees sockets and segments. Never hangs."""


class Aborted(TpserveError):
    """The driver released this rank from an all-reduce: the step fails, the group is rebuilt."""


def choose_path(requested: str, tp: int, device: str, local: bool, shm_unsupported: str | None
                ) -> tuple[str, str]:
    """(data path, why) for `--allreduce requested`, given where the ranks are."""
    if requested not in ALLREDUCE:
        raise TpserveError(f"allreduce={requested!r} is not known; use one of {list(ALLREDUCE)}")
    if tp == 1:
        return "zmq", "a single rank never reduces"
    where = "every rank is on the driver's host" if local else "ranks span several hosts"
    if requested == "shm" and (device != "cpu" or not local or shm_unsupported):
        raise TpserveError(f"allreduce='shm' needs CPU ranks on the driver's host and x86-64 "
                           f"/dev/shm, but {shm_unsupported or where} (device={device}); use "
                           f"allreduce='auto'")
    if requested in ("cuda", "nccl") and device != "cuda":
        raise TpserveError(f"allreduce={requested!r} needs device='cuda'; use allreduce='auto'")
    if requested == "cuda" and not local:
        raise TpserveError(f"allreduce='cuda' needs every rank on the driver's host, but {where}; "
                           f"use allreduce='nccl' or 'auto'")
    if requested == "gloo" and device != "cpu":
        raise TpserveError("allreduce='gloo' carries CPU tensors only; use allreduce='nccl'")
    if requested != "auto":
        return requested, "requested"
    if local and device == "cpu" and not shm_unsupported:
        return "shm", f"{where} with CPU tensors"
    if local and device == "cuda":
        return "cuda", f"{where} with GPU tensors (one-shot over peer memory, NCCL for large sums)"
    why = shm_unsupported if local and device == "cpu" else where
    return "zmq", f"{why}: the coordinator carries the bytes (CurveZMQ over TCP across hosts)"


def reduce_sum(parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the ranks' partials, in rank order, accumulated in fp32 (into `out` if given)."""
    if parts[0].dtype == torch.float32 and len(parts) > 1:  # the same sums, one op fewer
        acc = torch.add(parts[0], parts[1], out=out)
        for p in parts[2:]:
            acc += p
        return acc
    acc = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        acc += p.to(torch.float32)
    return acc.to(parts[0].dtype) if out is None else out.copy_(acc)


def reduce_sum_numpy(parts: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """`reduce_sum` of fp32 / fp16 arrays in numpy, on this thread (no OpenMP team): the same
    fp32 sums in rank order, the same rounding back, bit for bit."""
    if parts[0].dtype == np.float32:
        np.add(parts[0], parts[1], out=out)
        for p in parts[2:]:
            np.add(out, p, out=out)
        return out
    acc = parts[0].astype(np.float32)
    for p in parts[1:]:
        acc += p  # fp16 widened to fp32 exactly
    with np.errstate(over="ignore"):  # past fp16's range: inf, as torch's cast
        out[...] = acc  # rounded to nearest even, as torch's cast
    return out


class RankComm:
    """The rank half in a rank process: counts and times every all-reduce of its data path.

    `path` is set by the coordinator's setup message (`reduce(x, step, seq)`); `step` and `seq`
    name the reduction so every path can tell a stale or replayed partial from the awaited one.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.path = None
        self.step = self.seq = 0
        self.capturable = world_size == 1
        self.count, self.seconds = 0, 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        self.seq += 1
        t0 = time.perf_counter()
        out = self.path.reduce(x, self.step, self.seq)
        self.seconds += time.perf_counter() - t0  # host time: a GPU path only launches
        self.count += 1
        return out

    def all_reduce_add_norm(self, x: torch.Tensor, h: torch.Tensor, norm):
        """(h + the all-reduced x, `norm` of it) in one kernel where the data path has one
        (`DistPath.reduce_add_norm`, the one-shot GPU path), else None: all_reduce, then add."""
        fused = getattr(self.path, "reduce_add_norm", None)
        if self.world_size == 1 or fused is None:
            return None
        t0 = time.perf_counter()
        out = fused(x, h, norm)
        if out is not None:
            self.seq += 1
            self.seconds += time.perf_counter() - t0
            self.count += 1
        return out

    def replayed(self, n: int) -> None:
        """n all-reduces ran inside a replayed CUDA graph (no Python call to count)."""
        self.count += n

    def take_counts(self) -> dict:
        """Reductions since the last call, for the step's result header."""
        out = {"reductions": self.count, "reduce_ns": int(self.seconds * 1e9)}
        self.count, self.seconds = 0, 0.0
        return out


class LocalGroup:
    """Driver half for tp in-process ranks: one slot per rank and a barrier."""

    path = "local"

    def __init__(self, world_size: int, timeout: float = 120.0):
        self.world_size = world_size
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.reductions = 0

    @property
    def stats(self) -> CommStats:
        return CommStats(allreduce_count=self.reductions)

    def comm(self, rank: int) -> "LocalComm":
        return LocalComm(self, rank)

    def abort(self) -> None:
        """Release every rank waiting in an all-reduce (after one of them failed)."""
        self.barrier.abort()

    def reset(self) -> None:
        self.barrier.reset()

    def close(self) -> None:
        self.abort()


class LocalComm:
    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.capturable = self.world_size == 1  # threads meet on the host

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        g = self.group
        g.slots[self.rank] = x
        g.barrier.wait()  # every partial is in
        out = reduce_sum(g.slots)
        g.barrier.wait()  # every rank has read the slots before any overwrites its own
        if self.rank == 0:
            g.reductions += 1
        return out
