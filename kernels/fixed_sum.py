"""A decode GEMV's output as a fixed-point sum that the kernel reading it takes (on by default;
TPSERVE_FIXED_SUM=0 turns it off, =1 keeps it to one rank).

A decode GEMV splits K over SPLIT_K programs per output tile, and the last of them (a ticket) sums
the fp32 partials in split order and writes the output: after a program's last tile, a release
fence, an atomic and a load round trip. On one H200 that tail was 0.17 ms of a 2.38 ms batch-1
step of the 8B shapes (bench/README.md). Here instead each program adds its partial into an int64
buffer in fixed point (2**-32 units: exact integer sums, so the result does not depend on the order
the programs ran in, as with the ticket) and the kernel ends; the kernel that consumes the output
(the residual add + RMSNorm, SiLU-mul, rotary + KV write) takes it (loads it, syncs the program's
threads, stores zeros) and converts it, leaving the buffer zeroed for the next call. On one H200,
8B shapes, tp=1: 1.065x the written sums' tok/s at batch 1, the same at batch 8; at tp=2 (Ray
ranks, the one-shot all-reduce + norm taking the row-parallel sums) 1.055x (bench/README.md).

A partial is truncated to 2**-32 (far below fp16's resolution of any value it can hold) and
clamped to +-MAX = 2**24, NaN to +MAX, so that MAX_SPLIT_K of them cannot overflow the int64 sum:
an output beyond fp16's 65504 (inf, NaN) still reads as inf.

Buffers are per device and role, zero between uses, and keep their address (a captured CUDA graph
replays with it). The contract for every caller: a buffer handed to a GEMV is read by exactly one
consumer before the next GEMV of the same role writes it. On CPU tensors nothing here is used.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ENV = "TPSERVE_FIXED_SUM"
ONE = tl.constexpr(4294967296.0)  # 2**32: one in fixed point
MAX = tl.constexpr(16777216.0)  # 2**24: a partial's bound (32 of them: 2**61 in fixed point)
_buffers: dict = {}
_retired: list = []  # outgrown buffers: captured graphs may still point at them


def enabled(world_size: int = 1) -> bool:
    """On by default: for one rank, and for tp > 1 where the one-shot all-reduce takes the
    row-parallel partials (2x H200: 1.055x the written sums' tok/s at batch 1, the same at batch
    8, bench/README.md). TPSERVE_FIXED_SUM=1: one rank only; 0: off."""
    mode = os.environ.get(ENV, "all").strip().lower()
    if mode not in ("0", "1", "all"):
        raise ValueError(f"{ENV}={mode!r}: use all (the default: every group size), 1 (one rank "
                         f"only) or 0 (off)")
    return mode == "all" if world_size > 1 else mode != "0"


GATED_ENV = "TPSERVE_GATED_SUM"


def gated_enabled(world_size: int = 1) -> bool:
    """Whether down projections read silu(gate) * up from the gate/up GEMV's fixed-point sum
    where fixed-point sums are on (`gated`), instead of the SiLU-mul kernel taking it. Opt-in
    until timed: TPSERVE_GATED_SUM=1 for one rank (its tokens checked on an H200: graph vs eager
    identical, the same as written sums'), all for tp > 1 too (not yet run there); 0 (default):
    off (bench/README.md; `bash bench/gpu_h100.sh gated` checks and times it)."""
    mode = os.environ.get(GATED_ENV, "0").strip().lower()
    if mode not in ("0", "1", "all"):
        raise ValueError(f"{GATED_ENV}={mode!r}: use 1 (one rank), all (tp > 1 too) or 0 (the "
                         f"default: off)")
    return mode == "all" if world_size > 1 else mode != "0"


def fits(dtype: torch.dtype) -> bool:
    """Whether a GEMV with `dtype` activations may return a fixed-point sum: fp16 only, whose
    outputs (|y| <= 65504) lie far inside the +-2**24 clamp; bf16 and fp32 outputs can exceed
    it, so those GEMVs write their sums. (A split-K partial is clamped on its own: two partials
    beyond 2**24 that cancel would lose the difference; with fp16 activations of normed rows
    and 4/8-bit weights no partial comes near.)"""
    return dtype == torch.float16


def buffer(device: torch.device, role: str, n: int) -> torch.Tensor:
    """A zeroed int64 [1, n] buffer for `role`'s fixed-point outputs on `device`."""
    key = (torch.device(device), role)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _retired.append(buf)
        buf = torch.zeros(max(n, 2 * (0 if buf is None else buf.numel())), dtype=torch.int64,
                          device=device)
        _buffers[key] = buf
    return buf[:n].view(1, n)


def reset(device: torch.device) -> None:
    """Zero every buffer on `device`: after a step failed between a GEMV and its reader, the
    next GEMV of that role would add into what it left."""
    device = torch.device(device)
    for buf in [b for (d, _), b in _buffers.items() if d == device] + [
            b for b in _retired if b.device == device]:
        buf.zero_()


def is_fixed(x: torch.Tensor) -> bool:
    return x.dtype == torch.int64


def reads_as(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMV reads x in: fp16 for a fixed-point gate/up sum (`gated`), else x's."""
    return torch.float16 if is_fixed(x) else x.dtype


def _values(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    assert x.dtype == torch.int64 and dtype.is_floating_point, (x.dtype, dtype)
    return (x.double() * 2.0 ** -32).to(dtype)


def take_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernels' `take` does, in torch: the values in `dtype`, the buffer zeroed."""
    out = _values(x, dtype)
    x.zero_()
    return out


# How readers take a sum: "barrier" (default), or "exchange" (slower: bench/README.md).
TAKE_ENV = "TPSERVE_FIXED_TAKE"
_BARRIER = tl.constexpr(os.environ.get(TAKE_ENV, "barrier") != "exchange")


@triton.jit
def take(ptr, offs, mask):
    """The fixed-point values at ptr + offs as fp32, zeroed behind: the load, a barrier (every
    thread's loads performed), then the store of zeros. Without the barrier the two raced
    inside the program: Triton gave the int64 load 8 elements per thread and the constant store
    2, so threads zeroed elements that others had yet to load (readers' results varied run to
    run on an H200, bench/README.md). With TPSERVE_FIXED_TAKE=exchange: one atomic exchange
    per element (the value out, zero in; correct too, 2.8% slower at batch 1)."""
    if _BARRIER:
        v = tl.load(ptr + offs, mask=mask, other=0)
        tl.debug_barrier()
        tl.store(ptr + offs, tl.zeros_like(v), mask=mask)
    else:
        v = tl.atomic_xchg(ptr + offs, tl.zeros_like(offs).to(tl.int64), mask=mask,
                           sem="relaxed")
        v = tl.where(mask, v, 0)
    return _value(v)


@triton.jit
def _value(v):
    """Fixed-point int64 -> fp32."""
    return v.to(tl.float32) * (1.0 / ONE)


@triton.jit
def silu_times(g, u, dtype: tl.constexpr):
    """silu(g) * u in `dtype`, g and u in `dtype`: silu rounded to it, then the product (as
    torch rounds them); the SiLU-mul kernel's and `gated`'s."""
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(dtype)


@triton.jit
def load_value(ptr, offs, mask, dtype: tl.constexpr):
    """ptr[offs] in `dtype` (0 where masked): taken from a fixed-point buffer (int64 pointer), or
    loaded and cast."""
    if ptr.dtype.element_ty == tl.int64:
        return take(ptr, offs, mask).to(dtype)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(dtype)


@triton.jit
def gated(ptr, rows, K):
    """silu(gate) * up at `rows` from a fixed-point gate/up sum [gate (K) | up (K)], with
    `fused.silu_mul`'s roundings (the two read as fp16, silu rounded, the product rounded): what
    a down projection's GEMV reads instead of the SiLU-mul kernel's output. Read, not taken: the
    programs of the reading GEMV share each row, so the next gate/up GEMV clears the buffer
    (`clear`, `GatedMLP`). Rows past K read 0."""
    g = _value(tl.load(ptr + rows, mask=rows < K, other=0)).to(tl.float16)
    u = _value(tl.load(ptr + K + rows, mask=rows < K, other=0)).to(tl.float16)
    return silu_times(g, u, tl.float16)


@triton.jit
def clear(ptr, n, pid, programs, BLOCK: tl.constexpr = 256):
    """Program `pid` of `programs` zeroes its share of ptr[0:n] (an int64 buffer)."""
    per = tl.cdiv(n, programs)
    lo = pid * per
    for i in range(0, per, BLOCK):
        offs = lo + i + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros([BLOCK], tl.int64), mask=(offs < lo + per) & (offs < n))


def gated_reference(buf: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """What `gated` reads from a [T, 2K] fixed-point gate/up buffer, in torch (buf untouched)."""
    k = buf.shape[-1] // 2
    return torch.nn.functional.silu(_values(buf[..., :k], dtype)) * _values(buf[..., k:], dtype)


if __name__ == "__main__":
    from .fused import add_rms_norm, silu_mul
    from .gptq_gemv import INTERPRET_CONFIG, gemv
    from .gptq_weight import random_weight
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k, n, config = (4096, 4096, None) if dev.type == "cuda" else (512, 256, INTERPRET_CONFIG)
    torch.manual_seed(0)
    w = random_weight(k, n, 4, 128, device=dev)
    for dtype in (torch.float16, torch.float32):
        x, h = torch.randn(1, k, device=dev, dtype=dtype), torch.randn(1, n, device=dev, dtype=dtype)
        want = gemv(x, w, config=config)
        buf = buffer(dev, "self-check", n)
        gemv(x, w, out=buf, config=config)
        err = (take_reference(buf, dtype).float() - want.float()).abs().max()
        gemv(x, w, out=buf, config=config)
        norm = add_rms_norm(h, buf, None, 1e-6, 0.0, use_triton=True)[1]
        norm_want = add_rms_norm(h, want, None, 1e-6, 0.0, use_triton=True)[1]
        norm_err = (norm.float() - norm_want.float()).abs().max()
        print(f"{dtype}: max |fixed-point sum - GEMV output| {float(err):.2e} (max |y| "
              f"{float(want.abs().max()):.1f}), after the add + norm {float(norm_err):.2e}; "
              f"buffer left zeroed: {not bool(buf.any())}")
    # GEMV -> consumer, back to back, repeated: every repeat must give the first one's bits (a
    # consumer's load + zero store did not, on an H200, at the 8B MLP's 4096 x 28672)
    k, n = (4096, 28672) if dev.type == "cuda" else (256, 512)
    w = random_weight(k, n, 4, 128, device=dev)
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    h = torch.randn(1, n, device=dev, dtype=torch.float16)
    buf = buffer(dev, "self-check-repeat", n)
    consumers = {"SiLU-mul": lambda b: silu_mul(b[:, :n // 2], b[:, n // 2:], dtype=x.dtype),
                 "add + norm": lambda b: add_rms_norm(h, b, None, 1e-6, 0.0, use_triton=True)[0]}
    for name, consume in consumers.items():
        outs = []
        for _ in range(20 if dev.type == "cuda" else 2):
            gemv(x, w, out=buf, config=config)
            outs.append(consume(buf))
        same = all(torch.equal(outs[0], o) for o in outs)
        print(f"GEMV {k}x{n} -> {name}, {len(outs)} repeats: {'identical' if same else 'DIFFER'}")
