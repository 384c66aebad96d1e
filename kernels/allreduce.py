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

`one_shot_add_rms_norm` runs the same exchange one row per program and goes on, in the kernel,
with the residual add and the next half's RMSNorm (`fused.add_rms_norm`'s arithmetic, bit for
bit): on a decode step's plain residuals one kernel instead of two. It paces its epochs per row,
so it needs buffers and flags of its own beside the plain kernel's (`torch_dist._OneShot`). Its
partial may be a GEMV's fixed-point sum (`fixed_sum.py`): taken (converted to h's dtype, the
buffer zeroed) as the kernel reads it, and exchanged in h's dtype.

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

from .fixed_sum import is_fixed, load_value  # noqa: E402
from .fused import _normalised  # noqa: E402
from .pdl import flag as pdl_flag, release, step_options, wait  # noqa: E402

BLOCK = 2048  # elements a program pushes and sums; 4 KB of fp16
MAX_BLOCKS = 512  # flags per rank: capacity / BLOCK must stay below it


def one_shot_all_reduce_reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' partials summed in rank order in fp32, cast back."""
    acc = parts[0].float()
    for p in parts[1:]:
        acc = acc + p.float()
    return acc.to(parts[0].dtype)


@triton.jit
def _exchange(x, pid, offs, mask, epoch, phase_base, bufs_ptr, flags_ptr, capacity,
              RANK: tl.constexpr, WORLD: tl.constexpr):
    """Steps 1-4 for one program's elements `x` (at `offs` of the buffers): the fp32 sum."""
    for p in tl.static_range(WORLD):  # 1. this rank's partial into slot RANK everywhere
        buf = tl.load(bufs_ptr + p).to(tl.pointer_type(x.dtype))
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
    own = tl.load(bufs_ptr + RANK).to(tl.pointer_type(x.dtype))
    acc = tl.zeros(x.shape, dtype=tl.float32)
    for p in tl.static_range(WORLD):  # 4. sum in rank order
        acc += tl.load(own + phase_base + p * capacity + offs, mask=mask,
                       volatile=True).to(tl.float32)
    return acc


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, bufs_ptr, flags_ptr, counters_ptr, n, capacity,
                     RANK: tl.constexpr, WORLD: tl.constexpr, PDL: tl.constexpr,
                     BLOCK: tl.constexpr):
    release(PDL)  # the GEMV after it loads its weights while this waits for its peers (pdl.py)
    wait(PDL)  # x comes from the kernel before it
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(counters_ptr + pid) + 1
    x = tl.load(x_ptr + offs, mask=mask)
    acc = _exchange(x, pid, offs, mask, epoch, (epoch % 2) * WORLD * capacity, bufs_ptr,
                    flags_ptr, capacity, RANK, WORLD)
    tl.store(out_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(counters_ptr + pid, epoch)


@triton.jit
def _one_shot_norm_kernel(x_ptr, h_ptr, w_ptr, sum_ptr, out_ptr, bufs_ptr, flags_ptr,
                          counters_ptr, n, capacity, stride_h, eps, offset,
                          RANK: tl.constexpr, WORLD: tl.constexpr, MODE: tl.constexpr,
                          PDL: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: its all-reduce (as above), then `fused.add_rms_norm` of h and it;
    x may be a fixed-point sum (int64), taken in h's dtype."""
    release(PDL)  # the GEMV after it loads its weights while this waits for its peers (pdl.py)
    wait(PDL)  # x comes from the kernel before it
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    offs = row * n + cols
    epoch = tl.load(counters_ptr + row) + 1
    x = load_value(x_ptr, offs, mask, h_ptr.dtype.element_ty)
    acc = _exchange(x, row, offs, mask, epoch, (epoch % 2) * WORLD * capacity, bufs_ptr,
                    flags_ptr, capacity, RANK, WORLD)
    reduced = acc.to(x.dtype)  # what the all-reduce alone returns
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    total = (h.to(tl.float32) + reduced.to(tl.float32)).to(x.dtype)
    tl.store(sum_ptr + offs, total, mask=mask)
    tl.store(out_ptr + offs, _normalised(total, w_ptr, cols, mask, n, eps, offset, MODE),
             mask=mask)
    tl.store(counters_ptr + row, epoch)


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
                                                   num_warps=4, **_pdl(x))
    return out


NORM_MAX_WIDTH = 16384  # widest row the fused kernel takes (one program per row)


def _pdl(x) -> dict:
    """The kernels release the GEMV after them (pdl.py) but are launched as usual: a PDL launch
    (`pdl.step_options`, with which their `wait` holds them) is not yet run across GPUs; opt-in
    with TPSERVE_PDL_ALLREDUCE=1 (`bash bench/gpu_allreduce.sh pdlar` checks and times it)."""
    return step_options(x) if os.environ.get("TPSERVE_PDL_ALLREDUCE") == "1" else {
        "PDL": pdl_flag(x)}


def one_shot_add_rms_norm(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor | None, eps: float,
                          offset: float | None, bufs: torch.Tensor, flags: torch.Tensor,
                          counters: torch.Tensor, capacity: int, rank: int, world: int):
    """`fused.add_rms_norm(h, <x summed over the world>, w, eps, offset)` in one kernel: the same
    (h + sum, its RMSNorm) bits as the one-shot all-reduce followed by that kernel.

    x [T, n] contiguous (T * n <= capacity, T <= MAX_BLOCKS, n <= NORM_MAX_WIDTH), in h's dtype or
    a fixed-point sum (int64, `fixed_sum.py`: taken), h [T, n] with unit column stride; capacity
    in elements of h's dtype. bufs/flags/counters as for `one_shot_all_reduce`, but their own: a
    call here paces each row's epoch, a call there each block's, and the two must not share them.
    """
    t, n = x.shape
    if t * n > capacity or t > MAX_BLOCKS or n > NORM_MAX_WIDTH:
        raise ValueError(f"fused all-reduce of {t} x {n} exceeds its capacity {capacity}")
    assert x.is_contiguous() and h.shape == x.shape and h.stride(1) == 1
    assert h.dtype == x.dtype or is_fixed(x), (x.dtype, h.dtype)
    total, out = torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(
        h, memory_format=torch.contiguous_format)
    mode = 2 if w is None else (0 if offset is None else 1)
    if t:
        _one_shot_norm_kernel[(t,)](x, h, x if w is None else w, total, out, bufs, flags, counters,
                                    n, capacity, h.stride(0), float(eps), float(offset or 0.0),
                                    RANK=rank, WORLD=world, MODE=mode,
                                    BLOCK=triton.next_power_of_2(n), num_warps=4, **_pdl(x))
    return total, out


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
        from .fused import add_rms_norm
        w = torch.rand(300, device=dev).to(dtype) + 0.5
        nbuf, nflags = torch.zeros_like(buf), torch.zeros_like(flags)
        ncounters = torch.zeros_like(counters)
        err = 0.0
        for rows in (3, 1, 3):  # both phases
            x, h = (torch.randn(rows, 300, dtype=dtype, device=dev) for _ in range(2))
            got = one_shot_add_rms_norm(x, h, w, 1e-5, None, ptr(nbuf), ptr(nflags), ncounters,
                                        capacity, 0, 1)
            want = add_rms_norm(h, x, w, 1e-5, use_triton=True)
            err = max(err, *(float((g.float() - r.float()).abs().max()) for g, r in zip(got, want)))
        print(f"{dtype}: world 1, fused add + norm, 3 calls: max |kernel - add_rms_norm| {err:.2e}")


if __name__ == "__main__":
    _main()
