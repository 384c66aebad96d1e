"""The communication interface the TP math talks to, and its in-process implementation.

Model code only ever calls `comm.all_reduce(x)` and reads `comm.rank` / `comm.world_size`. The
production implementation (`tpserve.rank_comm.ZmqComm`) sends partials to the coordinator; the
in-process one below runs tp ranks as threads of one process for tests and `backend="local"`.

Both sum the partials in rank order in fp32 and cast back, so every rank gets bit-identical
results and tp ranks of fp16 partials lose no more precision than one rounding.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch


class Comm(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...


def reduce_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the ranks' partials, in rank order, accumulated in fp32."""
    acc = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        acc += p.to(torch.float32)
    return acc.to(parts[0].dtype)


class LocalGroup:
    """Shared state of tp in-process ranks: one slot per rank and a barrier."""

    def __init__(self, world_size: int, timeout: float = 120.0):
        self.world_size = world_size
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.reductions = 0

    def comm(self, rank: int) -> "LocalComm":
        return LocalComm(self, rank)

    def abort(self) -> None:
        """Release every rank waiting in an all-reduce (after one of them failed)."""
        self.barrier.abort()

    def reset(self) -> None:
        self.barrier.reset()


class LocalComm:
    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

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
