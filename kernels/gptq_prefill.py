"""GPTQ prefill (M > 16), 4- and 8-bit: y[M, N] = x[M, K] @ W[K, N].

Run `python -m tpserve.kernels.gptq_prefill` to print its error against the torch reference (on a
machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter runs the kernels
on the CPU).

  16 < M < DEQUANT_MIN_M  `_prefill_kernel`: a [BLOCK_K, BLOCK_N] tile unpacked row by row (each
                          word read by its P rows, from L1), one tl.dot per tile.
  M >= DEQUANT_MIN_M      W dequantized once (`_dequant_kernel`), then cuBLAS.
Act-order: x is permuted once (x[:, perm]) and read contiguously.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .gptq_common import MAGIC, _group_sz, _rows_sz, _zeros  # noqa: E402
from .gptq_launch import KEY, cfg, gptq_args, launch, new_out, tuned  # noqa: E402
from .gptq_weight import self_check  # noqa: E402

# From this many rows on, a matmul dequantizes W once and hands it to cuBLAS (a prefill of M = 512
# on 4096x14336 took 364 us in the tl.dot kernel, bf16 cuBLAS 87 us, dequantizing ~40 us).
DEQUANT_MIN_M = 256
# ... and below it wherever K >= N: on an H100 at M = 32-128, dequantize + cuBLAS took 41-44 us vs
# 62-67 us in the tl.dot kernel on 4096x4096 and 137-146 vs 203-210 us on 14336x4096, while on
# 4096x28672 the tl.dot kernel won (163-191 vs 248-254 us) and 4096x6144 was even
# (bench/kernels.py --prefill).
DEQUANT_WHEN_K_GE_N = True



@triton.jit
def _unpack(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
            WORDS: tl.constexpr):
    """The tile's fields [BLOCK_K, BLOCK_N] as the fp32 2**23 + q. WORDS: its BLOCK_K / P rows of
    words loaded once and split by P shifts (row k = word k // P, field k % P: a reshape); else
    each word read by its P rows (P loads, from L1)."""
    P: tl.constexpr = 32 // BITS
    if WORDS:
        KW: tl.constexpr = BLOCK_K // P
        offs_w = k0 // P + tl.arange(0, KW)
        qw = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                     mask=(offs_w < tl.cdiv(K, P))[:, None] & n_mask[None, :], other=0)
        shifts = tl.arange(0, P) * BITS
        q = (qw[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_K, q.shape[2]))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        qw = tl.load(qw_ptr + (offs_k // P)[:, None] * stride_qw + offs_n[None, :],
                     mask=(offs_k < K)[:, None] & n_mask[None, :], other=0)
        q = (qw >> ((offs_k % P) * BITS)[:, None]) & ((1 << BITS) - 1)
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _prefill_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, M, N, K, G, K_KEY, M_KEY,
                    stride_xm, stride_xk, stride_om, stride_qw, stride_qz, stride_s,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
                    HAS_GIDX: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    SCALED: tl.constexpr, WORDS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """Prefill (M > 16): a [BLOCK_K, BLOCK_N] tile of W unpacked and dequantized, one tl.dot per
    tile; x (already permuted for act-order) read contiguously. SCALED: the tile is scaled before
    the dot, so the dots accumulate in one chain (on Hopper, asynchronous wgmma overlapping the
    next tile's unpacking); else (q - z) goes into the dot and its product is scaled per tile."""
    # Grouped launch order: GROUP_M row blocks share each weight tile while it is in L2.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        q = _unpack(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K, WORDS)  # 2**23 + q
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if MODE == 0:
            s, z = _group_sz(s_ptr, qz_ptr, (k0 + GROUP_OFFSET) // GROUP_SIZE, offs_n, n_mask,
                             stride_s, stride_qz, BITS)
            if SCALED:
                w = ((q - (z + MAGIC)[None, :]) * s[None, :]).to(xt.dtype)
                acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
            else:
                w = (q - (z + MAGIC)[None, :]).to(xt.dtype)
                acc += tl.dot(xt, w, input_precision=DOT_PRECISION) * s[None, :]
        else:
            if MODE == 1:
                g0 = (k0 + GROUP_OFFSET) // GROUP_SIZE
                g1 = tl.minimum(g0 + 1, G - 1)
                in1 = (offs_k >= (g0 + 1) * GROUP_SIZE - GROUP_OFFSET)[:, None]
                s0 = tl.load(s_ptr + g0 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                s1 = tl.load(s_ptr + g1 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                z = tl.where(in1, _zeros(qz_ptr, g1, offs_n, n_mask, stride_qz, BITS)[None, :],
                             _zeros(qz_ptr, g0, offs_n, n_mask, stride_qz, BITS)[None, :])
                s = tl.where(in1, s1[None, :], s0[None, :])
            else:
                s, z = _rows_sz(s_ptr, qz_ptr, gidx_ptr, offs_k, k_mask, offs_n, n_mask, stride_s,
                                stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX)
            w = ((q - (z + MAGIC)) * s).to(xt.dtype)
            acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, gidx_ptr, w_ptr, N, K, stride_qw, stride_qz, stride_s,
                    stride_w, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    GROUP_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """W [K, N] = (q - z) * s in w's dtype: the first half of the large-M path (then cuBLAS)."""
    P: tl.constexpr = 32 // BITS
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    qw = tl.load(qw_ptr + (offs_k // P)[:, None] * stride_qw + offs_n[None, :], mask=mask, other=0)
    q = ((qw >> ((offs_k % P) * BITS)[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
    s, z = _rows_sz(s_ptr, qz_ptr, gidx_ptr, offs_k, offs_k < K, offs_n, offs_n < N, stride_s,
                    stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX)
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
             ((q - z) * s).to(w_ptr.dtype.element_ty), mask=mask)


_CONFIGS = [cfg(128, 64, None, 8, 3, bm=128, group_m=8), cfg(128, 64, None, 4, 3, bm=64, group_m=8),
            cfg(64, 64, None, 4, 4, bm=128, group_m=8), cfg(128, 32, None, 8, 4, bm=128, group_m=8),
            cfg(256, 64, None, 8, 3, bm=128, group_m=8), cfg(128, 128, None, 8, 3, bm=64, group_m=8)]
_tuned = tuned(_prefill_kernel, _CONFIGS, ["M_KEY"] + KEY + ["SCALED", "WORDS"])
# A/B switches (bench/kernels.py --prefill): scale each tile before its dot, load words once
SCALED_TILES = True
WORDS_ONCE = True
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def dequantize_triton(w, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] of a 4/8-bit GPTQWeight in `dtype` (a fresh tensor)."""
    k, n = w.in_features, w.out_features
    out = torch.empty(k, n, dtype=dtype, device=w.qweight.device)
    bk, bn = 32, 128
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w.qweight, w.qzeros, w.scales, w.qweight if w.g_idx is None else w.g_idx, out, n, k,
        w.qweight.stride(0), w.qzeros.stride(0), w.scales.stride(0), out.stride(0), BITS=w.bits,
        GROUP_SIZE=w.group_size, GROUP_OFFSET=w.group_offset, HAS_GIDX=w.g_idx is not None,
        BLOCK_K=bk, BLOCK_N=bn)
    return out


def prefill_matmul(x: torch.Tensor, w, perm: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K], M > 16 (fp16, bf16 or fp32) @ the 4/8-bit GPTQWeight w -> out [M, N] in x.dtype.

    `config` fixes the tl.dot kernel's block sizes (tests); without one, M >= DEQUANT_MIN_M (or
    K >= N, see DEQUANT_WHEN_K_GE_N) goes through dequantization + cuBLAS and the rest through the
    autotuned kernel.
    """
    out = new_out(x, w, out)
    if perm is not None:
        x = x.index_select(1, perm)
    m, n = out.shape
    if config is None and (m >= DEQUANT_MIN_M or DEQUANT_WHEN_K_GE_N and w.in_features >= n):
        return torch.matmul(x, dequantize_triton(w, x.dtype), out=out)
    args = gptq_args(x, w, out) | dict(
        M=m, M_KEY=triton.next_power_of_2(m), stride_xm=x.stride(0), stride_om=out.stride(0),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SCALED=SCALED_TILES,
        WORDS=WORDS_ONCE)
    launch(_prefill_kernel, _tuned, args,
           lambda c: (triton.cdiv(n, c["BLOCK_N"]) * triton.cdiv(m, c["BLOCK_M"]),), config,
           INTERPRET_CONFIG)
    return out


if __name__ == "__main__":
    for DEQUANT_WHEN_K_GE_N in (True, False):  # both paths at these M
        self_check(prefill_matmul, ms=(17, 40))
