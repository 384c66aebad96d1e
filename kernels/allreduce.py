"""One-shot all-reduce between GPUs of one host, for the small sums of a decode step.

At batch 1 a Llama-3-8B step reduces 65 tensors of 8 KB; NCCL's ring/tree all-reduce spends
~15-30 us on each, one-shot spends one NVLink write and one flag. Each rank's kernel:

1. pushes its partial, block by block, into slot `rank` of every rank's receive buffer (peer
   memory mapped into this process: symmetric memory, set up by the caller);
2. raises its flag for that block on every rank (release, system scope) with the call's epoch;
3. waits until every rank's flag for the block has reached the epoch (acquire, system scope);
4. sums the world slots of its own buffer in rank order in fp32 and writes `out`.

Every rank sums the same bytes in the same order, so all ranks get bit-identical results.

Layout of a receive buffer (elements of x's dtype): `[2 phases][world slots][capacity]`. A call's
phase is its epoch's parity: while a rank writes call k+1's phase, a slower peer may still be
reading call k's, never the same bytes; a rank reaches call k+2 (call k's phase again) only after
every peer raised call k+1's flags, which each peer does after its call k finished. So one flag
round per call suffices. Flags (int64, `[max blocks][world]` per rank) hold the epoch a rank's block
last published; `counters` (int64 `[max blocks]`, local) the epoch of this rank's block, advanced
by the kernel itself: the whole exchange replays inside a captured CUDA graph with no host work.
All ranks must issue the same sequence of calls with the same sizes (the TP step does).

`one_shot_all_reduce_reference(parts)` is the sum it must equal (fp32, rank order).
`python -m tpserve.kernels.allreduce` checks the kernel with one rank (world 1) against it.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK = 2048  # elements a program pushes and sums; 4 KB of fp16
MAX_BLOCKS = 512  # flags per rank: capacity / BLOCK must stay below it


def one_shot_all_reduce_reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' partials summed in rank order in fp32, cast back."""
    acc = parts[0].float()
    for p in parts[1:]:
        acc = acc + p.float()
    return acc.to(parts[0].dtype)


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, bufs_ptr, flags_ptr, counters_ptr, n, capacity,
                     RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(counters_ptr + pid) + 1
    phase_base = (epoch % 2) * WORLD * capacity
    x = tl.load(x_ptr + offs, mask=mask)
    for p in tl.static_range(WORLD):  # 1. this rank's partial into slot RANK everywhere
        buf = tl.load(bufs_ptr + p).to(tl.pointer_type(x_ptr.dtype.element_ty))
        tl.store(buf + phase_base + RANK * capacity + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's stores precede the flags below
    for p in tl.static_range(WORLD):  # 2. publish
        flag = tl.load(flags_ptr + p).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flag + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    mine = tl.load(flags_ptr + RANK).to(tl.pointer_type(tl.int64))
    for p in tl.static_range(WORLD):  # 3. wait for every rank's block
        seen = tl.atomic_add(mine + pid * WORLD + p, 0, sem="acquire", scope="sys")
        while seen < epoch:
            seen = tl.atomic_add(mine + pid * WORLD + p, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    own = tl.load(bufs_ptr + RANK).to(tl.pointer_type(x_ptr.dtype.element_ty))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(WORLD):  # 4. sum in rank order
        acc += tl.load(own + phase_base + p * capacity + offs, mask=mask,
                       volatile=True).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(counters_ptr + pid, epoch)


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, bufs: torch.Tensor,
                        flags: torch.Tensor, counters: torch.Tensor, capacity: int, rank: int,
                        world: int) -> torch.Tensor:
    """Sum `x` (contiguous, numel <= capacity) over the world into `out` (may be `x`).

    bufs/flags: int64 [world] device addresses of every rank's receive buffer (x's dtype,
    2 * world * capacity elements) and flag array (int64, MAX_BLOCKS * world); counters: this
    rank's int64 [MAX_BLOCKS], zero before the first call on every rank.
    """
    n = x.numel()
    if n > capacity or -(-n // BLOCK) > MAX_BLOCKS:
        raise ValueError(f"one-shot all-reduce of {n} elements exceeds its capacity {capacity}")
    if n:
        _one_shot_kernel[(triton.cdiv(n, BLOCK),)](x, out, bufs, flags, counters, n, capacity,
                                                   RANK=rank, WORLD=world, BLOCK=BLOCK,
                                                   num_warps=4)
    return out


def _main():
    """World 1 on this device: the exchange with itself, over several calls (both phases)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.float32):
        capacity = 3 * BLOCK + 100
        buf = torch.zeros(2 * capacity, dtype=dtype, device=dev)
        flags = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=dev)
        counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=dev)
        ptr = lambda t: torch.tensor([t.data_ptr()], dtype=torch.int64, device=dev)  # noqa: E731
        err = 0.0
        for n in (capacity, 5, BLOCK + 1, capacity):
            x = torch.randn(n, dtype=dtype, device=dev)
            out = torch.full_like(x, float("nan"))
            one_shot_all_reduce(x, out, ptr(buf), ptr(flags), counters, capacity, 0, 1)
            err = max(err, float((out.float() - one_shot_all_reduce_reference([x]).float())
                                 .abs().max()))
        print(f"{dtype}: world 1, 4 calls: max |kernel - reference| {err:.2e}; "
              f"epochs {counters[:4].tolist()}")


if __name__ == "__main__":
    _main()
