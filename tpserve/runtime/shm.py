"""The shared-memory all-reduce for ranks on the coordinator's host with CPU tensors.

The coordinator (`ShmDriver`) creates one segment per rank group in /dev/shm: mode 0600, an
unguessable name, handed to the ranks over its authenticated ZMQ channel and unlinked as soon as
every rank has mapped it (and again at close). A driver killed before that leaves a file whose name
carries its pid; the next `ShmDriver` or `cleanup_stale()` removes such files of dead processes.

Layout: a header (magic, tp, slot capacity, abort word, then one 128-byte line per rank) and two
slots per rank (reduction n uses slot n % 2, so no second barrier is needed: a rank can only
overwrite slot n % 2 at reduction n + 2, after every rank has published n + 1 and so finished n).
A rank line holds `[flag1, flag2, n, key, spec]` per slot: flag1 = n once the partial is written,
flag2 = n once this rank's chunk of a two-shot sum is written back; key = step << 24 | seq and
spec = numel << 8 | dtype code let every rank check that all partials belong to the same reduction.
Stores are ordered by x86-64's memory model (data, then meta, then flag), which is why `auto`
picks this path on x86-64 only.

Sums are `reduce_sum` (rank order, fp32 accumulation): bit-identical to the ZMQ star and to the
in-process ranks. From NUMPY_MIN elements on (fp32, fp16) the copies and sums run in numpy on the
rank's own thread: as torch ops each would be an OpenMP region whose workers, where the ranks'
teams fill every core, wait for cores that other ranks' spinning teams hold (64-core host, tp=4:
20.7 ms per 1 MiB sum against gloo's 1.06 ms, ~2.5 ms for each of a two-shot round's ~8 regions).
Small tensors, and any at tp=2: every rank sums all slots (one-shot). Large ones at tp>2: rank r
sums chunk r of every slot into its own slot, then every rank gathers the chunks (two-shot).
"""

from __future__ import annotations

import mmap
import os
import platform
import re
import secrets
import time
from pathlib import Path

import numpy as np
import torch

from tpserve.errors import TpserveError
from tpserve.runtime.comm import Aborted, reduce_sum, reduce_sum_numpy
from tpserve.runtime.wire import DTYPES

SHM_DIR = Path("/dev/shm")
PREFIX = "tpserve-ar-"
NAME = re.compile(r"^tpserve-ar-(\d+)-[0-9a-f]{32}$")
MAGIC = 0x7470736572766531  # "tpserve1"
LINE = 16  # int64 words per rank line (128 bytes: no false sharing between ranks' flags)
CAPACITY = 4 << 20  # bytes per slot; larger partials go through in pieces
TWO_SHOT_BYTES = 256 << 10
SPIN, YIELD = 200, 2000  # polls before yielding the CPU, and before sleeping
NUMPY_MIN = 1 << 15  # elements from which torch's elementwise ops go parallel (its grain size)
_CODES = {dt: i + 1 for i, dt in enumerate(DTYPES.values())}


def supported() -> str | None:
    """None when this host can run the shm path, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"its flag protocol relies on x86-64 store ordering, this host is {platform.machine()}"
    if not SHM_DIR.is_dir():
        return f"{SHM_DIR} does not exist"
    return None


class _Torch:
    """The reduction's data movement as torch ops."""
    wrap = staticmethod(lambda t: t)
    copy = staticmethod(lambda dst, src: dst.copy_(src))
    sum = staticmethod(reduce_sum)


class _Numpy:
    """The same in numpy, on the calling thread (zero-copy views of the same memory)."""
    dtypes = (torch.float32, torch.float16)
    wrap = staticmethod(lambda t: t.numpy())
    copy = staticmethod(np.copyto)
    sum = staticmethod(reduce_sum_numpy)


def _header_bytes(tp: int) -> int:
    return -(-(16 + tp * LINE) * 8 // 4096) * 4096


def cleanup_stale() -> list[str]:
    """Unlink segments of this user whose creating process is gone (a SIGKILLed driver)."""
    removed = []
    for f in SHM_DIR.glob(PREFIX + "*") if SHM_DIR.is_dir() else ():
        m = NAME.match(f.name)
        try:
            if not m or f.stat().st_uid != os.getuid():
                continue
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
            removed.append(f.name)
        except (PermissionError, FileNotFoundError):  # alive under another user, or just gone
            pass
    return removed


def line(rank: int) -> int:
    """Index of rank `rank`'s first header word: flag1, flag2, then (n, key, spec) per slot."""
    return 16 + rank * LINE


class _Segment:
    """An mmap of the segment; `q` reads and writes its header as int64 words (one aligned
    8-byte load or store each, ~40 ns from Python, so the flag loop stays cheap)."""

    def __init__(self, fd: int, tp: int, capacity: int):
        self.tp, self.capacity, self.header = tp, capacity, _header_bytes(tp)
        self.size = self.header + 2 * tp * capacity
        self.mm = mmap.mmap(fd, self.size)
        self.q = memoryview(self.mm)[:self.header].cast("q")
        self.data = torch.frombuffer(self.mm, dtype=torch.uint8)

    def slot(self, rank: int, b: int) -> torch.Tensor:
        start = self.header + (2 * rank + b) * self.capacity
        return self.data[start:start + self.capacity]

    def close(self) -> None:
        if self.q is not None:
            self.q.release()
        self.q = self.data = None
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            pass


class ShmDriver:
    """Driver half of the shm path: creates, hands out, watches and removes the segment."""

    name = "shm"

    def __init__(self, tp: int, capacity: int = CAPACITY):
        cleanup_stale()
        capacity = -(-capacity // 4096) * 4096
        self.seg_name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        self.file = SHM_DIR / self.seg_name
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: this user only
            os.ftruncate(fd, _header_bytes(tp) + 2 * tp * capacity)
            self.seg = _Segment(fd, tp, capacity)
        except BaseException:
            self.file.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.seg.q[0], self.seg.q[1], self.seg.q[2] = MAGIC, tp, capacity

    def setup(self, rank: int) -> dict:
        return {"name": self.seg_name, "capacity": self.seg.capacity}

    def joined(self) -> None:
        """Every rank has mapped the segment: unlink its name, so a crash can leave nothing."""
        self.file.unlink(missing_ok=True)

    def progress(self) -> int:
        """Grows while the ranks complete reductions (the coordinator re-arms its deadline)."""
        q = self.seg.q
        return sum(q[line(r)] + q[line(r) + 1] for r in range(self.seg.tp))

    def abort(self) -> None:
        """Release every rank waiting inside an all-reduce; they raise `Aborted`."""
        if self.seg.q is not None:
            self.seg.q[3] = 1

    def close(self) -> None:
        if self.seg.q is not None:
            self.abort()
        self.file.unlink(missing_ok=True)
        self.seg.close()


class ShmPath:
    """Rank half of the shm path: `reduce(x, step, seq)` through the segment."""

    capturable = False  # the host carries the bytes

    def __init__(self, setup: dict, rank: int, tp: int, timeout_s: float):
        name, capacity = setup.get("name"), setup.get("capacity")
        if not isinstance(name, str) or not NAME.match(name) or not isinstance(capacity, int):
            raise TpserveError(f"shm setup {setup!r} does not name a tpserve segment")
        self.rank, self.tp, self.timeout_s = rank, tp, timeout_s
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise TpserveError(f"rank {rank} cannot open the all-reduce segment {name} ({e}); it "
                               f"must run on the coordinator's host, else use allreduce='zmq'") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise TpserveError(f"segment {name} is not private to this user; refusing it")
            if capacity <= 0 or st.st_size != _header_bytes(tp) + 2 * tp * capacity:
                raise TpserveError(f"segment {name} does not hold {tp} ranks of {capacity} bytes")
            self.seg = _Segment(fd, tp, capacity)
        finally:
            os.close(fd)
        if tuple(self.seg.q[:3]) != (MAGIC, tp, capacity):
            raise TpserveError(f"segment {name} is not a tp={tp} tpserve all-reduce segment")
        self.me = line(rank)
        self.others = [line(j) for j in range(tp) if j != rank]
        self.n = 0  # reductions done by this rank; the group agrees on it while healthy
        self.mismatches = 0
        self._views: dict = {}

    def views(self, dtype: torch.dtype, numel: int, b: int) -> list[torch.Tensor]:
        key = (dtype, numel, b)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 64:
                self._views.clear()
            nbytes = numel * dtype.itemsize
            v = self._views[key] = [self.seg.slot(r, b)[:nbytes].view(dtype) for r in range(self.tp)]
        return v

    def reduce(self, x: torch.Tensor, step: int, seq: int) -> torch.Tensor:
        if x.device.type != "cpu":
            raise TpserveError(f"allreduce='shm' carries CPU tensors only, got one on {x.device}; "
                               f"use allreduce='nccl' for GPU ranks")
        flat, key = x.reshape(-1), step << 24 | seq
        piece = self.seg.capacity // x.element_size()
        if flat.numel() <= piece:
            return self._round(flat, key).view(x.shape)
        out = torch.empty_like(flat)
        for p, o in zip(flat.split(piece), out.split(piece)):
            self._round(p, key, o)
        return out.view(x.shape)

    def _round(self, flat: torch.Tensor, key: int, out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """One reduction of at most a slot's bytes; the sum goes to `out` or a new tensor."""
        self.n += 1
        n, b, q, me = self.n, self.n & 1, self.seg.q, self.me
        numel = flat.numel()
        spec = numel << 8 | _CODES[flat.dtype]
        out = torch.empty_like(flat) if out is None else out
        ops = _Numpy if numel >= NUMPY_MIN and flat.dtype in _Numpy.dtypes else _Torch
        views = [ops.wrap(v) for v in self.views(flat.dtype, numel, b)]  # the slots' memory
        o = ops.wrap(out)
        ops.copy(views[self.rank], ops.wrap(flat.contiguous()))
        m = 2 + 3 * b
        q[me + m], q[me + m + 1], q[me + m + 2] = n, key, spec
        q[me] = n  # publish: the partial and its meta are in
        self._wait_all(0, n)
        for other in self.others:
            if q[other + m] != n or q[other + m + 1] != key or q[other + m + 2] != spec:
                self._mismatch(m, (n, key, spec))
        if self.tp == 2 or numel * flat.element_size() <= TWO_SHOT_BYTES or numel < 64 * self.tp:
            ops.sum(views, o)
            return out
        chunk = -(-numel // self.tp)
        lo, hi = self.rank * chunk, min(numel, (self.rank + 1) * chunk)
        ops.copy(views[self.rank][lo:hi], ops.sum([v[lo:hi] for v in views], o[lo:hi]))
        q[me + 1] = n  # publish: this rank's chunk of the sum is in its slot (only it reads it)
        self._wait_all(1, n)
        for r, v in enumerate(views):
            if r != self.rank:
                ops.copy(o[r * chunk:(r + 1) * chunk], v[r * chunk:(r + 1) * chunk])
        return out

    def _mismatch(self, m: int, want: tuple) -> None:
        self.mismatches += 1
        got = {j: tuple(self.seg.q[line(j) + m:line(j) + m + 3]) for j in range(self.tp)}
        bad = {j: g for j, g in got.items() if g != want}
        raise TpserveError(f"rank {self.rank}: ranks {sorted(bad)} published partials of another "
                           f"reduction or shape ((n, step<<24|seq, numel<<8|dtype) {bad} vs {want}); "
                           f"the rank group is out of step and must be rebuilt")

    def _wait_all(self, word: int, n: int) -> None:
        q = self.seg.q
        for o in self.others:
            if q[o + word] < n:
                self._wait(o + word, n)

    def _wait(self, i: int, n: int) -> None:
        """Spin briefly, then yield the CPU, then sleep with backoff; honour abort and timeout."""
        q = self.seg.q
        polls, nap, deadline = 0, 20e-6, time.monotonic() + self.timeout_s
        while q[i] < n:
            polls += 1
            if polls < SPIN:
                continue
            if q[3]:
                raise Aborted(f"rank {self.rank}: the coordinator aborted the rank group's "
                              f"all-reduces (a rank failed or the group is stopping)")
            if polls < YIELD:
                os.sched_yield()
                continue
            if time.monotonic() > deadline:
                raise TpserveError(f"rank {self.rank}: the partial of rank {(i - 16) // LINE} "
                                   f"for reduction {n} did not arrive within {self.timeout_s:.0f}s")
            time.sleep(nap)
            nap = min(nap * 2, 1e-3)

    def close(self) -> None:
        self._views.clear()
        self.seg.close()
