"""Kernel dispatch: GPTQ dequantize-and-multiply and the quantized lm_head / embedding formats.

Each public function runs the Triton kernel when its input is on CUDA (and the format has one), the
torch reference otherwise, and logs the path it took once. The Triton modules are imported on first
CUDA use, so this module (and the CPU path) does not need a GPU.

GPTQ: y[M, N] = x[M, K] @ W[K, N] for one rank's shard (`GPTQWeight`). The torch reference
dequantizes the shard (`GPTQWeight.dequantize` honours the group offset and act-order g_idx) and runs
a dense matmul; it is the oracle for the Triton kernel (4 and 8 bits) and the path for 2/3 bits.
Act-order shards should be sorted once at load time with `prepare_act_order`, and the permutation
it returns passed to every `gptq_matmul` call.
"""

from __future__ import annotations

import logging

import torch

from tpserve.model import gptq
from tpserve.model.gptq_shard import GPTQWeight

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()


def _announce(op: str, path: str) -> None:
    if (op, path) not in _announced:
        _announced.add((op, path))
        log.info("%s path: %s", op, path)


def gptq_matmul_reference(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor:
    return x @ w.dequantize(x.dtype)


def gptq_matmul(x: torch.Tensor, w: GPTQWeight, perm: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]; `perm` (from `prepare_act_order`) reorders x's last dim first."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    if x.is_cuda and w.bits in (4, 8):
        from tpserve.kernels import gptq_triton
        _announce("GPTQ matmul", f"Triton {w.bits}-bit")
        y = gptq_triton.gptq_matmul_triton(x2, w, perm)
    else:
        _announce("GPTQ matmul", f"torch reference ({w.bits}-bit on {x.device.type})")
        y = gptq_matmul_reference(x2 if perm is None else x2.index_select(1, perm), w)
    return y.view(*shape[:-1], w.out_features)


def prepare_act_order(w: GPTQWeight) -> tuple[GPTQWeight, torch.Tensor | None]:
    """Rows sorted by group, so that x[:, perm] @ w_sorted == x @ w. Returns (w_sorted, perm).

    perm is None when there is nothing to permute (no g_idx, or rows already in group order).
    Sorted groups are contiguous. When every group but the first and last holds exactly group_size
    rows, the sorted shard drops g_idx for a group_offset (the kernel's one-group-per-tile path):
    always so for an unsharded act-order layer, whose GPTQ order puts group_size rows in each group.
    A row-parallel shard of one holds an arbitrary subset of each group; it keeps the sorted g_idx.
    """
    if w.g_idx is None:
        return w, None
    k, gs = w.in_features, w.group_size
    g = w.g_idx.long()
    perm = torch.argsort(g, stable=True)
    g_sorted = g[perm]
    g_first, g_last = int(g_sorted[0]), int(g_sorted[-1])
    g_sorted -= g_first
    q = gptq.unpack_rows(w.qweight, w.bits, k)[perm]
    first = int((g_sorted == 0).sum())
    rows = torch.arange(k, device=g.device)
    g_idx, offset = g_sorted.to(torch.int32), 0
    if first <= gs and torch.equal(g_sorted, (rows + gs - first) // gs):
        g_idx, offset = None, (gs - first) % gs
    sorted_w = GPTQWeight(qweight=gptq.pack_rows(q, w.bits),
                          qzeros=w.qzeros[g_first:g_last + 1].contiguous(),
                          scales=w.scales[g_first:g_last + 1].contiguous(), g_idx=g_idx,
                          group_offset=offset, bits=w.bits, group_size=gs, in_features=k,
                          out_features=w.out_features)
    return sorted_w, None if torch.equal(perm, rows) else perm


def random_gptq(k: int, n: int, bits: int, group_size: int, k0: int = 0, k_total: int | None = None,
                act_order: bool = False, sym: bool = False, device="cpu",
                generator: torch.Generator | None = None) -> GPTQWeight:
    """Rows [k0, k0 + k) of a random [k_total, n] layer quantized by `gptq.quantize` (tests, bench).

    The shard is cut as `read_gptq_shard` cuts one: covering groups, group_offset = k0 % group_size,
    or with act_order a local g_idx rebased to the first kept group.
    """
    k_total = k0 + k if k_total is None else k_total
    w = torch.randn(k_total, n, generator=generator).to(device)
    order = torch.randperm(k_total, generator=generator).to(device) if act_order else None
    q, zeros, scales = gptq.quantize(w if order is None else w[order], bits, group_size, sym)
    g_full = torch.arange(k_total, device=device) // group_size
    if order is not None:  # GPTQ act-order: groups are contiguous in `order`, not in row order
        inv = torch.argsort(order)
        q, g_full = q[inv], g_full[inv]
    g_loc = g_full[k0:k0 + k]
    g_first, g_last = int(g_loc.min()), int(g_loc.max())
    return GPTQWeight(qweight=gptq.pack_rows(q[k0:k0 + k], bits),
                      qzeros=gptq.pack_cols(zeros[g_first:g_last + 1], bits).to(device),
                      scales=scales[g_first:g_last + 1].to(device).contiguous(),
                      g_idx=(g_loc - g_first).to(torch.int32) if act_order else None,
                      group_offset=0 if act_order else k0 % group_size, bits=bits,
                      group_size=group_size, in_features=k, out_features=n)


# lm_head and embedding formats (head_kernels.py): int8 per output channel and Q8_0.

def _head_matmul(fmt: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., H] @ W.T for a quantized head weight W [V, H] -> [..., V] in x.dtype."""
    from tpserve.kernels import head_kernels as hk
    triton_fn, reference_fn = {"int8": (hk.int8_matmul_triton, hk.int8_matmul_reference),
                               "Q8_0": (hk.q8_0_matmul_triton, hk.q8_0_matmul_reference)}[fmt]
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        _announce(f"{fmt} head", "Triton")
        y = triton_fn(x2, q, scales)
    else:
        _announce(f"{fmt} head", f"torch reference on {x.device.type}")
        y = reference_fn(x2, q, scales)
    return y.view(*x.shape[:-1], q.shape[0])


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H] @ (q int8 [V, H] * scale [V, 1]).T -> [..., V] in x.dtype."""
    return _head_matmul("int8", x, q, scale)


def q8_0_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., H] @ Q8_0 weight (q int8 [V, H], scales fp16 [V, H / 32]).T -> [..., V]."""
    return _head_matmul("Q8_0", x, q, scales)


def dequant_rows(ids: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Embedding lookup: rows `ids` [...] of an int8 (scales [V]) or Q8_0 (scales [V, H / 32])
    weight, dequantized to `dtype` -> [..., H]."""
    from tpserve.kernels import head_kernels
    flat = ids.reshape(-1)
    fmt = "int8" if scales.dim() == 1 else "Q8_0"
    if q.is_cuda:
        _announce(f"{fmt} rows", "Triton")
        y = head_kernels.dequant_rows_triton(flat, q, scales, dtype)
    else:
        _announce(f"{fmt} rows", f"torch reference on {q.device.type}")
        y = head_kernels.dequant_rows_reference(flat, q, scales, dtype)
    return y.view(*ids.shape, q.shape[1])
