"""GPTQ prefill (M > 16), 4- and 8-bit: y[M, N] = x[M, K] @ W[K, N].

Run `python -m tpserve.kernels.gptq_prefill` to print its error against the torch reference (on a
machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter runs the kernels
on the CPU).

Two paths:
  tl.dot    `_prefill_kernel`: each [BLOCK_K, BLOCK_N] tile of words loaded once, unpacked,
            dequantized and scaled in registers, one tl.dot per tile; split-K where the output
            grid is small.
  dequant   W dequantized once to x's dtype (`_dequant_kernel`), then cuBLAS.
Below DEQUANT_MIN_M rows the faster of the two is timed once per (M class, shard shape) on the
first call (`tuning.faster`): on an H200 the tl.dot kernel won where N >> K and dequantize +
cuBLAS where K >= N (bench/README.md). From DEQUANT_MIN_M rows on the tensor-core work is large
enough for cuBLAS to win everywhere (each tl.dot program dequantizes its tiles again per BLOCK_M
rows), and no timing is spent on each new M class of a long prompt.
Act-order: x is permuted once (x[:, perm]) and read contiguously.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .gptq_common import MAGIC, _finish, _group_sz, _rows_sz, _zeros, mode_of  # noqa: E402
from .gptq_launch import (KEY, MAX_SPLIT_K, cfg, gptq_args, launch, new_out,  # noqa: E402
                          prefill_split_fits, tuned, workspace)
from .gptq_h2 import _h2_tile  # noqa: E402
from .gptq_weight import self_check, shape_key  # noqa: E402
from .tuning import faster  # noqa: E402

# fp16 x and 4-bit words: the prefill kernel's tiles in one group dequantized in fp16x2
# (`gptq_h2._h2_tile`). On an H200 (bench/README.md) 4096x28672 at M = 128 took 106 us against
# 149 with fp32 tiles, the other 8B shapes within 4%; the few-rows configs (BLOCK_M 16) were
# slower with it (111 vs 71 us), so `rows_matmul` keeps fp32 tiles. False: the A/B.
USE_H2 = True
DEQUANT_MIN_M = 256


@triton.jit
def _tile_words(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The tile's BLOCK_K / P rows of words [BLOCK_K / P, BLOCK_N] (0 past K)."""
    P: tl.constexpr = 32 // BITS
    offs_w = k0 // P + tl.arange(0, BLOCK_K // P)
    if EVEN_K:
        return tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                       mask=n_mask[None, :], other=0)
    return tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                   mask=(offs_w < tl.cdiv(K, P))[:, None] & n_mask[None, :], other=0)


@triton.jit
def _unpack(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr):
    """The tile's fields [BLOCK_K, BLOCK_N] as the fp32 2**23 + q: its BLOCK_K / P rows of words
    loaded once and split by P shifts (row k is field k % P of word k // P: a reshape)."""
    P: tl.constexpr = 32 // BITS
    qw = _tile_words(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K, EVEN_K)
    q = (qw[:, None, :] >> (tl.arange(0, P) * BITS)[None, :, None]) & ((1 << BITS) - 1)
    return (tl.reshape(q, (BLOCK_K, q.shape[2])) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, qz_ptr, gidx_ptr, k0, offs_k, k_mask, offs_n, n_mask, K, G,
                  stride_qw, stride_s, stride_qz, dtype: tl.constexpr, BITS: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr,
                  MODE: tl.constexpr, H2: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """W's tile [BLOCK_K, BLOCK_N] = (q - z) s in `dtype`. H2 (fp16, 4 bits) and a tile in one
    group: eight fields per word in fp16x2 (`gptq_h2._h2_tile`); else fields split by shifts and
    dequantized in fp32."""
    s, z = _tile_sz(s_ptr, qz_ptr, gidx_ptr, k0, offs_k, k_mask, offs_n, n_mask, G, stride_s,
                    stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX, MODE)
    if H2 and MODE == 0:
        return _h2_tile(_tile_words(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K,
                                    EVEN_K), z, s)
    q = _unpack(qw_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K, EVEN_K)  # 2**23 + q
    return ((q - (z + MAGIC)) * s).to(dtype)


@triton.jit
def _tile_sz(s_ptr, qz_ptr, gidx_ptr, k0, offs_k, k_mask, offs_n, n_mask, G, stride_s, stride_qz,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
             HAS_GIDX: tl.constexpr, MODE: tl.constexpr):
    """Scale (fp32) and zero of a tile's rows at columns offs_n: [1, BLOCK_N] for a tile in one
    group (MODE 0), else [BLOCK_K, BLOCK_N] (two groups selected at the boundary, or per row)."""
    if MODE == 0:
        s, z = _group_sz(s_ptr, qz_ptr, (k0 + GROUP_OFFSET) // GROUP_SIZE, offs_n, n_mask,
                         stride_s, stride_qz, BITS)
        return s[None, :], z[None, :]
    elif MODE == 1:
        g0 = (k0 + GROUP_OFFSET) // GROUP_SIZE
        g1 = tl.minimum(g0 + 1, G - 1)
        in1 = (offs_k >= (g0 + 1) * GROUP_SIZE - GROUP_OFFSET)[:, None]
        s0 = tl.load(s_ptr + g0 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + g1 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.where(in1, _zeros(qz_ptr, g1, offs_n, n_mask, stride_qz, BITS)[None, :],
                     _zeros(qz_ptr, g0, offs_n, n_mask, stride_qz, BITS)[None, :])
        return tl.where(in1, s1[None, :], s0[None, :]), z
    else:
        return _rows_sz(s_ptr, qz_ptr, gidx_ptr, offs_k, k_mask, offs_n, n_mask, stride_s,
                        stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX)


@triton.jit
def _prefill_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, G,
                    K_KEY, M_KEY, stride_xm, stride_xk, stride_om, stride_qw, stride_qz, stride_s,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
                    HAS_GIDX: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    H2: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """Prefill (M > 16): each [BLOCK_K, BLOCK_N] tile of W unpacked, dequantized and scaled, then
    one tl.dot, so the dots accumulate in one chain (on Hopper asynchronous wgmma, overlapping the
    next tile's unpacking); x (already permuted for act-order) read contiguously. SPLIT_K programs
    share a tile of outputs (their partials summed in split order, gptq_common._finish): a small
    output grid would leave most SMs idle while each program streams all of K."""
    # Grouped launch order: GROUP_M row blocks share each weight tile while it is in L2.
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    k_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if EVEN_K:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, gidx_ptr, k0, offs_k, k_mask, offs_n, n_mask, K,
                          G, stride_qw, stride_s, stride_qz, xt.dtype, BITS, GROUP_SIZE,
                          GROUP_OFFSET, HAS_GIDX, MODE, H2, BLOCK_K, EVEN_K)
        acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
    _finish(acc, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], ws_ptr,
            offs_m[:, None] * N + offs_n[None, :], m_mask[:, None] & n_mask[None, :], cnt_ptr, pid,
            pid_k, M * N, SPLIT_K)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, gidx_ptr, w_ptr, N, K, G, stride_qw, stride_qz,
                    stride_s, stride_w, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    GROUP_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr, MODE: tl.constexpr,
                    H2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W [K, N] = (q - z) * s in w's dtype: the first half of the large-M path (then cuBLAS)."""
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, n_mask = offs_k < K, offs_n < N
    w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, gidx_ptr, k0, offs_k, k_mask, offs_n, n_mask, K, G,
                      stride_qw, stride_s, stride_qz, w_ptr.dtype.element_ty, BITS, GROUP_SIZE,
                      GROUP_OFFSET, HAS_GIDX, MODE, H2, BLOCK_K, False)
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], w,
             mask=k_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, BLOCK_M): split-K for grids of few output tiles
# (K >> N, or small M: 4096x4096 at M = 128 is 32 tiles of 128 x 128 for 132 SMs).
_CONFIGS = [cfg(128, 64, 1, 8, 3, bm=128, group_m=8), cfg(128, 64, 1, 4, 3, bm=64, group_m=8),
            cfg(256, 64, 1, 8, 3, bm=128, group_m=8), cfg(64, 64, 1, 4, 4, bm=128, group_m=8),
            cfg(128, 64, 2, 8, 3, bm=128, group_m=8), cfg(128, 64, 4, 4, 3, bm=64, group_m=8),
            cfg(64, 64, 4, 4, 4, bm=64, group_m=8), cfg(128, 128, 8, 8, 3, bm=64, group_m=8)]
_tuned = tuned(_prefill_kernel, _CONFIGS, ["M_KEY"] + KEY)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1)
# The same kernel for a decode step's few rows (2 <= M <= 16, one BLOCK_M of 16): weight-streaming
# bound, so deep tiles along K and split-K for bytes in flight on every SM.
_ROWS_CONFIGS = [cfg(64, 128, 4, 4, 3, bm=16, group_m=1), cfg(128, 128, 4, 4, 3, bm=16, group_m=1),
                 cfg(64, 256, 2, 4, 3, bm=16, group_m=1), cfg(128, 128, 8, 4, 4, bm=16, group_m=1)]
_tuned_rows = tuned(_prefill_kernel, _ROWS_CONFIGS, ["M_KEY"] + KEY)


def _h2_tiles(dtype: torch.dtype, w) -> bool:
    """Whether tiles in one group take `gptq_h2._h2_tile`: fp16 out, 4-bit words, fp16 scales
    (it multiplies by the scale in fp16: other scales would be rounded first)."""
    return USE_H2 and dtype == torch.float16 and w.bits == 4 and w.scales.dtype == torch.float16


def dequantize_triton(w, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] of a 4/8-bit GPTQWeight in `dtype` (a fresh tensor)."""
    k, n = w.in_features, w.out_features
    out = torch.empty(k, n, dtype=dtype, device=w.qweight.device)
    bk, bn = 64, 128
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w.qweight, w.qzeros, w.scales, w.qweight if w.g_idx is None else w.g_idx, out, n, k,
        w.scales.shape[0], w.qweight.stride(0), w.qzeros.stride(0), w.scales.stride(0),
        out.stride(0), BITS=w.bits, GROUP_SIZE=w.group_size, GROUP_OFFSET=w.group_offset,
        HAS_GIDX=w.g_idx is not None, MODE=mode_of(bk, w.group_size, w.group_offset,
                                                    w.g_idx is not None),
        H2=_h2_tiles(dtype, w), BLOCK_K=bk, BLOCK_N=bn, num_warps=4)
    return out


def prefill_matmul(x: torch.Tensor, w, perm: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K], M > 16 (fp16, bf16 or fp32) @ the 4/8-bit GPTQWeight w -> out [M, N] in x.dtype.

    `config` fixes the tl.dot kernel's block sizes (tests); without one, M >= DEQUANT_MIN_M goes
    through dequantization + cuBLAS, smaller M on a GPU through whichever path was faster for
    its M class and shape (timed on the first call), elsewhere (the interpreter) through the
    tl.dot kernel.
    """
    out = new_out(x, w, out)
    if perm is not None:
        x = x.index_select(1, perm)
    m, n = out.shape
    if config is None and m >= DEQUANT_MIN_M:
        return _dequant_matmul(x, w, out)
    m_key = triton.next_power_of_2(m)
    if config is None and x.is_cuda:
        calls = {"tl.dot": lambda: _tl_dot(x, w, out, m_key, None),
                 "dequantize + cuBLAS": lambda: _dequant_matmul(x, w, out)}
        if faster(("prefill", m_key, x.dtype) + shape_key(w), calls) != "tl.dot":
            return _dequant_matmul(x, w, out)
    return _tl_dot(x, w, out, m_key, config)


def _dequant_matmul(x, w, out):
    return torch.matmul(x, dequantize_triton(w, x.dtype), out=out)


def rows_matmul(x: torch.Tensor, w, perm: torch.Tensor | None = None,
                out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K], 2 <= M <= 16, @ w -> out [M, N] through the prefill kernel with decode configs
    (one tl.dot per tile, where `gptq_decode.py` takes one per field); a candidate of
    `dispatch.gptq_matmul_triton` for few rows, timed against the others on first use."""
    out = new_out(x, w, out)
    if perm is not None:
        x = x.index_select(1, perm)
    return _tl_dot(x, w, out, x.shape[0], config, rows=True)


def _tl_dot(x, w, out, m_key, config, rows=False):
    m, n = out.shape
    configs = _ROWS_CONFIGS if rows else _CONFIGS
    splits = [config.get("SPLIT_K", 1)] if config else [c.kwargs["SPLIT_K"] for c in configs]
    split = max(s for s in splits if prefill_split_fits(m_key, n, s))
    ws, cnt = workspace(x.device, triton.cdiv(split * m * n, MAX_SPLIT_K),
                        triton.cdiv(m, 16) * triton.cdiv(n, 16))
    args = gptq_args(x, w, out) | dict(
        M=m, M_KEY=m_key, stride_xm=x.stride(0), stride_om=out.stride(0),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        H2=not rows and _h2_tiles(x.dtype, w), ws_ptr=ws, cnt_ptr=cnt)
    launch(_prefill_kernel, _tuned_rows if rows else _tuned, args,
           lambda c: (triton.cdiv(n, c["BLOCK_N"]) * triton.cdiv(m, c["BLOCK_M"]), c["SPLIT_K"]),
           config, dict(INTERPRET_CONFIG, BLOCK_M=16, SPLIT_K=2) if rows else INTERPRET_CONFIG)
    return out


if __name__ == "__main__":
    self_check(prefill_matmul, ms=(17, 40, DEQUANT_MIN_M))  # the tl.dot kernel, then dequant
