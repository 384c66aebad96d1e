"""Which kernel runs: the Triton kernel for CUDA inputs (and formats that have one), the torch
reference otherwise; each choice is logged once. Triton modules are imported on first CUDA use,
so the CPU path never needs a GPU.

GPTQ: y[M, N] = x[M, K] @ W[K, N] for one rank's shard (`GPTQWeight`), by M: the GEMV (M = 1),
the batched decode kernels (M <= 16: the fastest, timed per M and shape, of a tl.dot per field,
the prefill kernel's tl.dot per tile, and fp16x2 rows at M = 2),
prefill (M > 16). The torch reference dequantizes the shard
and runs a dense matmul: the oracle for the kernels (4 and 8 bits); off CUDA 4-bit shards take
torch's int4 CPU kernel (`gptq_cpu.py`), others (and 2/3 bits) `gptq_matmul_cpu`, the reference's
product with per-group broadcasts; with fp32 / fp16 x a dense dequantized copy, within a budget.
Act-order shards are sorted by group once at load (the loader returns the permutation) and the
permutation is passed to every call.

Vocabulary tables (lm_head, embedding): one `HeadFormat` from the --lm-head flag to the kernel.
"""

from __future__ import annotations

import logging
import threading
import types

import torch

from . import fixed_sum, gptq_cpu, head_kernels as hk
from .gptq_weight import GPTQWeight, gptq_matmul_cpu
from .head_kernels import HeadFormat

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()
# Triton's autotuner is not thread-safe, and in-process ranks are threads that make their first
# calls at the same moment: launches go through one lock (held only while launching, or tuning).
_LAUNCH_LOCK = threading.Lock()
H2_ROWS = True  # whether 2 <= M <= H2_ROWS_MAX_M may take the fp16x2 rows kernel (for A/B)
# The fp16x2 rows kernel runs up to gptq_h2mm.MAX_M = 4 rows (each word dequantized once for all
# of them); whether it wins is timed per M and shape on first use.
H2_ROWS_MAX_M = 4


def _announce(op: str, path: str) -> None:
    if (op, path) not in _announced:
        _announced.add((op, path))
        log.info("%s path: %s", op, path)


_triton = None  # the Triton kernel modules, imported on the first CUDA call (`_kernels`)


def _kernels():
    """The Triton kernel modules, imported once (an eager decode step dispatches ~200 products,
    and function-level imports cost a dictionary lookup and more each)."""
    global _triton
    if _triton is None:
        from . import gptq_decode, gptq_gemv, gptq_h2mm, gptq_prefill, tuning
        from .gptq_launch import new_out
        from .gptq_weight import shape_key
        _triton = types.SimpleNamespace(gemv=gptq_gemv.gemv, uses_h2=gptq_gemv.uses_h2,
                                        decode=gptq_decode.decode_matmul, h2mm=gptq_h2mm,
                                        rows=gptq_prefill.rows_matmul,
                                        prefill=gptq_prefill.prefill_matmul, faster=tuning.faster,
                                        new_out=new_out, shape_key=shape_key)
    return _triton


def gptq_matmul_triton(x: torch.Tensor, w: GPTQWeight, perm: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, config: dict | None = None,
                       clear: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w -> out [M, N] through the Triton kernel for M (4 and 8 bits); M = 1 also
    takes a gate/up sum as x and a buffer to clear (`gptq_gemv.gemv`)."""
    k = _triton or _kernels()
    m = x.shape[0]
    if m == 1:
        return k.gemv(x, w, perm, out, config, clear)
    assert clear is None and x.dtype != torch.int64, "a gate/up sum is read by one-row GEMVs only"
    if m <= 16:
        run, out = _few_rows(k, x, w, perm, out, config)
    else:
        run = k.prefill
    return run(x, w, perm, out, config)


def _few_rows(k, x, w, perm, out, config):
    """2 <= M <= 16: on a GPU, whichever is faster for this M and shard shape (timed on the first
    call, `tuning.faster`) of the tl.dot decode kernel (a dot per field), the prefill kernel's
    tile-at-once dot with decode configs, and at M <= H2_ROWS_MAX_M with fp16 x the fp16x2 rows
    kernel; elsewhere (the interpreter, fixed configs) the decode kernel.
    -> (the kernel's function, out)."""
    if config is not None or not x.is_cuda:
        return k.decode, out
    out = k.new_out(x, w, out)
    kernels = {"tl.dot per field": k.decode, "tl.dot per tile": k.rows}
    if H2_ROWS and x.shape[0] <= H2_ROWS_MAX_M and k.uses_h2(x.dtype, w):
        kernels["fp16x2"] = k.h2mm.h2_matmul
    calls = {name: (lambda f=f: f(x, w, perm, out)) for name, f in kernels.items()}
    return kernels[k.faster((x.shape[0], perm is not None, x.dtype) + k.shape_key(w), calls)], out


def gptq_matmul(x: torch.Tensor, w: GPTQWeight, perm: torch.Tensor | None = None,
                fixed: torch.Tensor | None = None, clear: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [..., K] -> [..., N]; `perm` (from the loader's act-order sort) reorders x's last dim.

    `fixed`: a zeroed int64 [1, N] buffer (`fixed_sum.py`) that the GEMV adds its output into as a
    fixed-point sum where x is one row on a GPU; the result is then that buffer, for a consumer
    that takes it. Elsewhere `fixed` is not used. x int64 [1, 2K]: a fixed-point gate/up sum,
    read as silu(gate) * up; `clear`: an int64 buffer zeroed by the one-row GEMV (`GatedMLP`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    if x.is_cuda and w.bits in (4, 8):
        _announce("GPTQ matmul", f"Triton {w.bits}-bit")
        out = fixed if fixed is not None and x2.shape[0] == 1 else None
        with _LAUNCH_LOCK:
            y = gptq_matmul_triton(x2, w, perm, out, clear=clear)
    else:
        if x2.dtype == torch.int64:  # a gate/up sum (the torch form of what the GEMV reads)
            x2 = fixed_sum.gated_reference(x2)
        if clear is not None:
            clear.zero_()
        x2 = x2 if perm is None else x2.index_select(1, perm)
        dense = gptq_cpu.dense_copy(x2, w)
        if dense is not None:
            _announce("GPTQ matmul", f"dense dequantized copies, up to {gptq_cpu.DENSE_ENV} "
                                     f"({x.device.type})")
            y = x2 @ dense
        elif gptq_cpu.applies(x2, w):
            _announce("GPTQ matmul", f"torch int4 CPU kernel ({x.device.type})")
            y = gptq_cpu.int4_matmul(x2, w)
        else:
            _announce("GPTQ matmul", f"torch ({w.bits}-bit on {x.device.type})")
            y = gptq_matmul_cpu(x2, w)
    return y.view(*shape[:-1], w.out_features)


def head_matmul(fmt: HeadFormat, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., H] @ W.T for an int8 or Q8_0 head weight W [V, H] -> [..., V] in `out_dtype`
    (x.dtype by default; fp32: on a GPU stored by the kernel from its fp32 sums)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        _announce(f"{fmt} head", "Triton")
        y = hk.head_matmul_triton(fmt, x2, q, scales, out_dtype=out_dtype)
    else:
        _announce(f"{fmt} head", f"torch reference on {x.device.type}")
        y = hk.head_matmul_reference(fmt, x2, q, scales).to(out_dtype or x.dtype)
    return y.view(*x.shape[:-1], q.shape[0])


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H] @ (q int8 [V, H] * scale [V, 1]).T -> [..., V] in x.dtype."""
    return head_matmul(HeadFormat.INT8, x, q, scale)


def q8_0_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., H] @ Q8_0 weight (q int8 [V, H], scales fp16 [V, H / 32]).T -> [..., V]."""
    return head_matmul(HeadFormat.Q8_0, x, q, scales)


def dequant_rows(fmt: HeadFormat, ids: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Embedding lookup: rows `ids` [...] of an int8 or Q8_0 table, dequantized -> [..., H]."""
    flat = ids.reshape(-1)
    if q.is_cuda:
        _announce(f"{fmt} rows", "Triton")
        y = hk.dequant_rows_triton(fmt, flat, q, scales, dtype)
    else:
        _announce(f"{fmt} rows", f"torch reference on {q.device.type}")
        y = hk.dequant_rows_reference(fmt, flat, q, scales, dtype)
    return y.view(*ids.shape, q.shape[1])
