"""GPTQ decode for a few rows (2 <= M <= 4) in fp16x2 arithmetic: y[M, N] = x[M, K] @ W[K, N].

Run `python -m tpserve.kernels.gptq_h2mm` to print its error against the torch reference (on a
machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter runs the kernel
on the CPU).

The M = 1 GEMV's fp16x2 word product (`gptq_h2.py`) for 2 or 4 rows of fp16 x at once (M = 3 runs
as 4, the fourth row a copy of the third whose sums are dropped): each word is loaded once and
dequantized once (lop3 + one HFMA2 per pair of fields), then each row takes P/2 HFMA2s and one
fp32 sum per word, and one FFMA per word and row for the scale. Per 8 4-bit weights and row that
is ~7 instructions beside the ~9 of the shared dequantization, where `gptq_decode.py` converts
each field to fp16 and stages it through shared memory for a tl.dot (its cost does not fall with
M). For the shards the fp16x2 path takes (`gptq_gemv.uses_h2`): one group per tile, a group
boundary between words, act-order rows padded to whole words per group. Which kernel runs at a
given M and shape is measured on first use (`dispatch.gptq_matmul_triton`).
Split-K and its fixed-order sum as in gptq_common.py.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .gptq_common import _finish, _group_sz, _next_tile, _split, _word_sz  # noqa: E402
from .gptq_launch import (KEY, cfg, gptq_args, launch, new_out, through_perm, tuned,  # noqa: E402
                          workspace)
from .gptq_h2 import _h2_word2, _h2_word4, _x_pairs  # noqa: E402
from .gptq_weight import self_check  # noqa: E402
from .pdl import options as pdl_options, release, wait  # noqa: E402

MAX_M = 4  # rows per word in the asm (2 or 4); beyond a few rows tl.dot wins


@triton.jit
def _h2mm_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, G, K_KEY, M_KEY, stride_xm, stride_xk, stride_om, stride_qw, stride_qz,
                 stride_s, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 GROUP_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr,
                 MODE: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    release(PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    k_lo, k_hi, w_hi, offs_w, nxt = _split(pid_k, K, qw_ptr, offs_n, n_mask, stride_qw,
                                           SPLIT_K, BLOCK_K, P)
    # rows past M read the last row (their sums are dropped at the store)
    x1_ptr = x_ptr + tl.minimum(1, M - 1) * stride_xm
    x2_ptr = x_ptr + tl.minimum(2, M - 1) * stride_xm
    x3_ptr = x_ptr + tl.minimum(3, M - 1) * stride_xm
    wait(PDL)  # the first tile of weights is loaded (pdl.py)
    acc0 = tl.zeros([KW, BLOCK_N], tl.float32)
    acc1 = tl.zeros([KW, BLOCK_N], tl.float32)
    acc2 = tl.zeros([KW, BLOCK_N], tl.float32)
    acc3 = tl.zeros([KW, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qw, hi, nxt = _next_tile(qw_ptr, nxt, offs_w, w_hi, offs_n, n_mask, stride_qw, KW)
        if MODE == 0:
            s, z = _group_sz(s_ptr, qz_ptr, (k0 + GROUP_OFFSET) // GROUP_SIZE, offs_n, n_mask,
                             stride_s, stride_qz, BITS)
            s = s[None, :]
            z = z[None, :]
        else:  # each word in one group: z, s per word row (two groups, or gathered per word)
            s, z = _word_sz(s_ptr, qz_ptr, gidx_ptr, k0, offs_w, w_hi, offs_n, n_mask, G, stride_s,
                            stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX, MODE == 1)
        s = s * (1 << BITS)
        a0, a1, a2, a3 = _x_pairs(x_ptr, perm_ptr, offs_w, K, stride_xk, BITS, HAS_PERM, EVEN_K)
        b0, b1, b2, b3 = _x_pairs(x1_ptr, perm_ptr, offs_w, K, stride_xk, BITS, HAS_PERM, EVEN_K)
        if BLOCK_M == 2:
            ya, yb = _h2_word2(qw, a0, a1, a2, a3, b0, b1, b2, b3, z, BITS)
        else:
            c0, c1, c2, c3 = _x_pairs(x2_ptr, perm_ptr, offs_w, K, stride_xk, BITS, HAS_PERM,
                                      EVEN_K)
            d0, d1, d2, d3 = _x_pairs(x3_ptr, perm_ptr, offs_w, K, stride_xk, BITS, HAS_PERM,
                                      EVEN_K)
            ya, yb, yc, yd = _h2_word4(qw, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1,
                                       d2, d3, z, BITS)
            acc2 += yc * s
            acc3 += yd * s
        acc0 += ya * s
        acc1 += yb * s
        offs_w += KW
    rows = offs_m[:, None]
    y = tl.where(rows == 0, tl.sum(acc0, axis=0)[None, :], tl.sum(acc1, axis=0)[None, :])
    if BLOCK_M == 4:
        y = tl.where(rows == 2, tl.sum(acc2, axis=0)[None, :], y)
        y = tl.where(rows == 3, tl.sum(acc3, axis=0)[None, :], y)
    offs = offs_m[:, None] * stride_om + offs_n[None, :]
    offs_ws = offs_m[:, None] * N + offs_n[None, :]
    _finish(y, out_ptr, offs, ws_ptr, offs_ws, m_mask[:, None] & n_mask[None, :], cnt_ptr, pid_n,
            pid_k, M * N, SPLIT_K)


# Few on purpose: each is compiled per BLOCK_M (2 and 4: the decode buckets) at start-up.
_CONFIGS = [cfg(64, 64, 8), cfg(128, 64, 8), cfg(64, 128, 8), cfg(32, 128, 16), cfg(128, 32, 16)]
_tuned = tuned(_h2mm_kernel, _CONFIGS, ["M_KEY"] + KEY)
INTERPRET_CONFIG = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)


def h2_matmul(x: torch.Tensor, w, perm: torch.Tensor | None = None,
              out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] fp16, 2 <= M <= MAX_M, @ the 4/8-bit GPTQWeight w (one `gptq_gemv.uses_h2`
    accepts) -> out [M, N] fp16. `config` fixes the block sizes (tests)."""
    from .gptq_gemv import uses_h2
    assert x.dtype == torch.float16 and uses_h2(x.dtype, w), (x.dtype, w.bits, w.group_size)
    out = new_out(x, w, out)
    x, perm = through_perm(x, perm)
    m, n = out.shape
    assert 2 <= m <= MAX_M, m
    ws, cnt = workspace(x.device, m * n, triton.cdiv(n, 16))
    args = gptq_args(x, w, out) | dict(
        M=m, M_KEY=m, stride_xm=x.stride(0), stride_om=out.stride(0),
        BLOCK_M=triton.next_power_of_2(m),
        perm_ptr=x if perm is None else perm, HAS_PERM=perm is not None, ws_ptr=ws,
        cnt_ptr=cnt) | pdl_options(x)
    launch(_h2mm_kernel, _tuned, args,
           lambda c: (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"]), config, INTERPRET_CONFIG)
    return out


if __name__ == "__main__":
    self_check(h2_matmul, ms=(2, 3, 4))
