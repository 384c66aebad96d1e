"""4-bit shards on CPU ranks: torch's int4 CPU GEMM (`aten._weight_int4pack_mm_for_cpu`, the
kernel gpt-fast and torchao run on CPUs), instead of dequantizing the whole shard on every call
(`gptq_weight.gptq_matmul_cpu`: 411 vs 41 ms at M = 1 on a 2048x8192 shard in fp32, 613 vs 10 ms
in bf16, on a 2-core EPYC). bf16 x at any M; fp32 and fp16 x up to SMALL_M rows (small decode
batches).

That kernel's format: w = (q - 8) * scale + zero per (group, column), groups of 32, 64, 128 or 256
rows counted from row 0, N a multiple of 16. A GPTQ shard maps onto it exactly in real numbers,
(q - z) * s = (q - 8) * s + (8 - z) * s, so zero = (8 - z) * s, stored in x's dtype (one rounding;
in bf16 at most 1/64 of a quantization step). A shard that starts inside a group is padded in front
with `group_offset` rows, and one that ends inside a group behind, as `gptq_matmul_cpu` pads them:
x gets zero columns there, so those rows add nothing. Columns past N up to a multiple of 16 hold
q = 0, scale 0, zero 0, and are sliced off.

The packed weight is made on a shard's first CPU call and kept beside the GPTQ tensors (the
reference and the other paths still read those): a CPU rank holds its 4-bit weights twice.
Shards with g_idx (act-order not sorted to plain groups), other group sizes, 2/3/8 bits, or a torch
without the op take `gptq_matmul_cpu`.

fp32 and fp16 x: that kernel runs them in scalar code, 20-50x slower than bf16 (a 256x768 shard at
M = 1 on a 2-core EPYC: 148 us in fp32, 6.5 us in bf16; 2048x2048: 3.1 ms against 58 us), while a
dense matmul of the dequantized shard takes 9 us and 195 us there. So shards with fp32 / fp16 x keep
a dense copy (8x their 4-bit bytes in fp32), made on first use, any bits or g_idx, while this
process's copies stay within TPSERVE_CPU_DENSE_MAX_MB (default 256 MiB; 0 keeps none): the demo
model and the test models whole (~12 MB at tp=1), the first layers of a larger model; the rest keep
the 4-bit paths (bf16 is the fast dtype for real models on CPUs). The budget bounds the memory that
shards routed late (MoE experts) could otherwise add while serving.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field

import torch

from .gptq_weight import GPTQWeight, unpack, whole_groups

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows of fp32 / fp16 x it takes: its time grows with M in those dtypes (bf16 is its fast path),
# while the per-group broadcast's dequantization is paid once per call and spreads over more
# threads. On a 2-core EPYC it still wins at 8 rows (2048x8192 fp32: 324 vs 670 ms; 460 vs 339 at
# 16); on 16 cores, decode at batch 8 over 2 and 4 ranks was slower with it (bench/README.md), so
# batches above 4 rows and prefill take the broadcast.
SMALL_M = 4
DENSE_ENV = "TPSERVE_CPU_DENSE_MAX_MB"  # this process's dense copies, at most (MiB; 0: none)


def _dense_max_bytes() -> int:
    value = os.environ.get(DENSE_ENV, "256")
    try:
        mib = float(value)
    except ValueError:
        mib = -1.0
    if not 0 <= mib < 1 << 30:
        raise ValueError(f"{DENSE_ENV}={value!r} is not a size in MiB; set a number >= 0 "
                         f"(0 keeps no dense copies of CPU shards)")
    return int(mib * (1 << 20))


DENSE_MAX_BYTES = _dense_max_bytes()  # see the module docstring
_dense = {"bytes": 0}  # what this process's copies hold (in-process ranks are threads: the lock)
_dense_lock = threading.Lock()
_OPS = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@dataclass
class Int4CpuPack:
    """A shard in the CPU kernel's layout (see the module docstring)."""

    packed: torch.Tensor  # uint8 [N16, K' / 2], K' = rows with the front and back padding
    front: int  # zero columns of x in front (the shard's group_offset)
    back: int  # zero columns of x behind (the last group's tail)
    scales: torch.Tensor  # fp32 [G, N16]
    zeros: torch.Tensor  # fp32 [G, N16], (8 - z) * s
    by_dtype: dict = field(default_factory=dict)  # x dtype -> [G, N16, 2] scales and zeros


def applies(x: torch.Tensor, w: GPTQWeight) -> bool:
    """Whether `int4_matmul` runs x @ w (else `gptq_matmul_cpu`)."""
    return (_OPS and not x.is_cuda and w.bits == 4 and w.g_idx is None
            and w.group_size in GROUP_SIZES and x.dtype in DTYPES
            and (x.dtype == torch.bfloat16 or x.shape[0] <= SMALL_M))


def dense_copy(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor | None:
    """The shard's dequantized copy in x.dtype for fp32 / fp16 x off CUDA (made on first use, from
    the fp32 reference weight: one rounding to fp16), or None: bf16 or CUDA x, or the process's
    DENSE_MAX_BYTES spent."""
    if x.is_cuda or x.dtype not in (torch.float32, torch.float16):
        return None
    d = w.cpu_dense.get(x.dtype)
    if d is None:
        size = w.in_features * w.out_features * x.element_size()
        with _dense_lock:
            if _dense["bytes"] + size > DENSE_MAX_BYTES:
                return None
            _dense["bytes"] += size
        d = w.cpu_dense[x.dtype] = w.dequantize(torch.float32).to(x.dtype)
        weakref.finalize(d, _release, size)  # a model closed gives its share back
    return d


def _release(size: int) -> None:
    with _dense_lock:
        _dense["bytes"] -= size


def dense_bytes() -> int:
    """What this process's dense copies hold."""
    return _dense["bytes"]


def pack(w: GPTQWeight) -> Int4CpuPack:
    """The shard in the CPU kernel's layout."""
    k, n, off = w.in_features, w.out_features, w.group_offset
    groups, back = whole_groups(w)
    n16 = -(-n // 16) * 16
    q = unpack(w.qweight, 4, k)  # [K, N]
    q = torch.nn.functional.pad(q, (0, n16 - n, off, back))  # padded rows meet zero columns of x
    z = unpack(w.qzeros.T, 4, n).T[:groups].float()
    s = w.scales[:groups].float()
    scales = torch.nn.functional.pad(s, (0, n16 - n))
    zeros = torch.nn.functional.pad((8 - z) * s, (0, n16 - n))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous(), 1)
    return Int4CpuPack(packed, off, back, scales, zeros)


def int4_matmul(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor:
    """x [M, K] @ w -> [M, N] in x.dtype, for a shard where `applies`; packs it on first use."""
    p = w.cpu_pack
    if p is None:
        p = w.cpu_pack = pack(w)
    sz = p.by_dtype.get(x.dtype)
    if sz is None:
        sz = p.by_dtype[x.dtype] = torch.stack([p.scales, p.zeros], -1).to(x.dtype).contiguous()
    if p.front or p.back:
        x = torch.nn.functional.pad(x, (p.front, p.back))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), p.packed, w.group_size, sz)
    return y[:, :w.out_features]
