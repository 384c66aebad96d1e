"""The torch.distributed all-reduce: NCCL for GPU ranks (stays on the GPU, CUDA-graph capturable),
gloo for CPU ranks (the same rendezvous, testable on any machine), and `cuda`: NCCL plus the
one-shot kernel (`tpserve.kernels.allreduce`) for sums up to `ONE_SHOT_BYTES`, GPU ranks of one host.

The coordinator owns the rendezvous: `DistDriver` hosts a TCPStore in the driver process and hands
each rank its address plus a secret per-group key prefix over the coordinator's authenticated ZMQ
channel (never through Ray or a world-readable path). The prefix keeps concurrent or rebuilt groups
apart. Neither the TCPStore (it listens on every interface) nor NCCL's or gloo's own sockets are
authenticated, which is why `auto` uses this path only for ranks on the driver's host and the zmq
star (CurveZMQ) stays the path across hosts.

`DistPath.reduce` reduces `x` in place and returns it: no host sync, no copy, so a decode step that
calls it on a static buffer can be captured in a CUDA graph. NCCL sums in the tensor's dtype in its
own order (fp16 partials are not accumulated in fp32 as on the CPU paths); the one-shot kernel sums
in fp32 in rank order.

On `cuda`, after NCCL is up, each rank allocates its receive buffer and flags in torch's symmetric
memory and the ranks map each other's through the same rendezvous (CUDA IPC handles travel through
the coordinator's store under the group's secret prefix). A decode step's sums (8 KB a row at
hidden 4096) then cost one NVLink write and one flag instead of NCCL's protocol; where the sum
feeds a plain residual add and the next RMSNorm (`reduce_add_norm`), one kernel does all three. If any rank cannot
map peer memory (no P2P, a torch without symmetric memory) every rank keeps NCCL alone: they agree
by one NCCL all-reduce of a flag, and the ready message says which.

Like NCCL's, the one-shot kernel waits for its peers on the GPU without a timeout: a rank that dies
mid-step leaves the others spinning until the coordinator's deadline fails the step and recovery
replaces the rank processes (it kills them; a reused process could not leave the kernel).
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta

import torch

from tpserve.errors import TpserveError

log = logging.getLogger(__name__)

ONE_SHOT_BYTES = 1 << 20  # sums up to this size take the one-shot kernel on the cuda path
# TPSERVE_ONE_SHOT_NORM=0 keeps the residual add + norm out of the one-shot kernel (an A/B for
# bench/decode.py; read when a rank's group is set up, in the rank's own process)
FUSED_NORM_ENV = "TPSERVE_ONE_SHOT_NORM"


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise TpserveError("this torch build has no torch.distributed; use allreduce='zmq'")
    return dist


class DistDriver:
    """Driver half: a TCPStore rendezvous and a secret key prefix per rank group."""

    def __init__(self, path: str, host: str, timeout_s: float):
        dist = _dist()
        self.name, self.host, self.timeout_s = path, host, timeout_s
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))
        self.prefix = f"tpserve-{secrets.token_hex(16)}/"

    def setup(self, rank: int) -> dict:
        return {"backend": "nccl" if self.name == "cuda" else self.name, "host": self.host,
                "port": self.store.port, "prefix": self.prefix, "one_shot": self.name == "cuda"}

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
        self.one_shot = None
        if setup.get("one_shot") is True and device is not None:
            self.one_shot = _OneShot.create(dist, rank, tp, device)

    @property
    def kind(self) -> str:
        """What carries this group's small sums (for the ready message and the log)."""
        return "one-shot + nccl" if self.one_shot is not None else self.backend

    def reduce(self, x: torch.Tensor, step: int, seq: int) -> torch.Tensor:
        if (x.device.type == "cuda") != (self.backend == "nccl"):
            raise TpserveError(f"allreduce={self.backend!r} cannot reduce a tensor on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        one = self.one_shot
        if one is not None and x.numel() * x.element_size() <= ONE_SHOT_BYTES:
            if one.dtype is None:
                one.dtype = x.dtype  # every rank reduces the same sequence: they agree on it
            if x.dtype == one.dtype:
                return one(x)
        self.dist.all_reduce(x)
        return x

    def reduce_add_norm(self, x: torch.Tensor, h: torch.Tensor, norm):
        """(h + the sum of x, its RMSNorm by `norm`) in one kernel where the one-shot path takes
        x (fp16/bf16/fp32 rows of the group's dtype, or a GEMV's fixed-point sum of such rows, up
        to ONE_SHOT_BYTES in h's dtype); else None, and the caller reduces and adds apart. Every
        rank decides from h's shape and dtype alone (whether its x is a fixed-point sum does not
        count), so all ranks take the same kernels in the same order."""
        from tpserve.kernels.allreduce import MAX_BLOCKS, NORM_MAX_WIDTH
        from tpserve.kernels.fixed_sum import is_fixed
        one = self.one_shot
        if (one is None or not one.fuse_norm or x.dim() != 2 or not x.is_contiguous() or h.shape != x.shape
                or (h.dtype != x.dtype and not is_fixed(x)) or h.stride(-1) != 1
                or h.numel() * h.element_size() > ONE_SHOT_BYTES or x.shape[0] > MAX_BLOCKS
                or x.shape[1] > NORM_MAX_WIDTH or norm.out_perm is not None
                or (norm.offset is None and norm.weight is not None
                    and norm.weight.dtype != h.dtype)):
            return None
        if one.dtype is None:
            one.dtype = h.dtype
        return one.add_norm(x, h, norm) if h.dtype == one.dtype else None

    def close(self) -> None:
        self.one_shot = None  # its peer mappings go before the group that made them
        self.dist.destroy_process_group()


class _OneShot:
    """This rank's mapping of every rank's one-shot receive buffer and flags (symmetric memory).

    Its counters pace the kernel's epochs per block whatever the dtype, so one group uses one
    dtype (the first it reduces; `DistPath.reduce` sends any other through NCCL).
    """

    def __init__(self, rank: int, tp: int, device: torch.device, buf, flags, bufs, flag_ptrs):
        from tpserve.kernels.allreduce import MAX_BLOCKS
        self.rank, self.tp = rank, tp
        self._keep = (buf, flags)  # this rank's own allocations, mapped by its peers
        # The first half of every buffer and flag array is the plain one-shot's, the second the
        # fused kernel's (`add_norm`): each paces its own epochs (per block, per row).
        self.bufs, self.flags = bufs, flag_ptrs
        self.norm_bufs = bufs + 2 * tp * ONE_SHOT_BYTES
        self.norm_flags = flag_ptrs + MAX_BLOCKS * tp * 8
        self.counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=device)
        self.norm_counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=device)
        self.dtype: torch.dtype | None = None
        self.fuse_norm = os.environ.get(FUSED_NORM_ENV, "1") != "0"

    @staticmethod
    def sizes(tp: int, max_blocks: int) -> tuple[int, int]:
        """(receive buffer bytes, flags) per rank: two halves (plain, fused), two phases each."""
        return 2 * 2 * tp * ONE_SHOT_BYTES, 2 * max_blocks * tp

    @classmethod
    def create(cls, dist, rank: int, tp: int, device: torch.device) -> "_OneShot | None":
        """Map the group's buffers where every rank can, else None (the group keeps NCCL).

        The ranks agree twice, by an NCCL all-reduce of a flag: after allocating (a rank that
        cannot allocate never leaves its peers waiting in the rendezvous) and after mapping."""
        try:
            import torch.distributed._symmetric_memory as symm_mem
            from tpserve.kernels.allreduce import MAX_BLOCKS
            group = dist.group.WORLD.group_name
            enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None:  # needed before torch 2.9, a no-op after
                enable(group)
            buf_bytes, n_flags = cls.sizes(tp, MAX_BLOCKS)
            buf = symm_mem.empty(buf_bytes, dtype=torch.uint8, device=device)
            flags = symm_mem.empty(n_flags, dtype=torch.int64, device=device).zero_()
            why = None
        except Exception as e:  # noqa: BLE001 - any failure means: stay on NCCL
            why = f"{type(e).__name__}: {e}"
        if not _all_agree(dist, device, why):
            return None
        try:
            hb, hf = symm_mem.rendezvous(buf, group), symm_mem.rendezvous(flags, group)
            why = None if (hb.world_size, hb.rank) == (tp, rank) else \
                f"symmetric memory sees rank {hb.rank} of {hb.world_size}"
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        if not _all_agree(dist, device, why):
            return None
        as_tensor = lambda ptrs: torch.tensor(list(ptrs), dtype=torch.int64,  # noqa: E731
                                              device=device)
        mine = cls(rank, tp, device, buf, flags, as_tensor(hb.buffer_ptrs),
                   as_tensor(hf.buffer_ptrs))
        torch.cuda.synchronize()
        dist.barrier()  # every rank's flags are zero before any rank's first one-shot call
        return mine

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from tpserve.kernels.allreduce import one_shot_all_reduce
        return one_shot_all_reduce(x, x, self.bufs, self.flags, self.counters,
                                   ONE_SHOT_BYTES // x.element_size(), self.rank, self.tp)

    def add_norm(self, x: torch.Tensor, h: torch.Tensor, norm):
        """(h + sum of x, its RMSNorm): the all-reduce, residual add and norm in one kernel."""
        from tpserve.kernels.allreduce import one_shot_add_rms_norm
        return one_shot_add_rms_norm(x, h, norm.weight, norm.eps, norm.offset, self.norm_bufs,
                                     self.norm_flags, self.norm_counters,
                                     ONE_SHOT_BYTES // h.element_size(), self.rank, self.tp)


def _all_agree(dist, device: torch.device, why: str | None) -> bool:
    """True where no rank has a reason (`why`) against the one-shot path (one NCCL all-reduce)."""
    ok = torch.tensor([0 if why else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if why:
        log.warning("rank %d cannot map its peers' GPU memory (%s): the group stays on NCCL",
                    dist.get_rank(), why)
    return int(ok) == 1
