"""GPTQ batched decode (2 <= M <= 16), 4- and 8-bit: y[M, N] = x[M, K] @ W[K, N].

Run `python -m tpserve.kernels.gptq_decode` to print its error against the torch reference (on a
machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter runs the kernel
on the CPU).

Per field p of the words a tl.dot of x[:, p::P] (BLOCK_M x BLOCK_K / P) with the unpacked field: a
sum over K may be taken in any order, so no interleave is needed. Group modes and split-K as in
gptq_common.py (act-order rows padded to whole words at load: scale and zero per word, as in
the GEMV); the next tile of words is loaded while this one is computed.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .gptq_common import (MAGIC, _finish, _group_sz, _in_second, _lane, _load_xt,  # noqa: E402
                          _next_tile, _rows_sz, _split, _word_sz, _zeros)
from .gptq_launch import (KEY, cfg, gptq_args, launch, new_out, through_perm, tuned,  # noqa: E402
                          workspace)
from .gptq_weight import self_check  # noqa: E402
from .pdl import options as pdl_options, release, wait  # noqa: E402


@triton.jit
def _mm_tile_rows(acc, qw, hi, offs_w, xs_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr, g0, g1, k_b,
                  offs_m, m_mask, offs_n, n_mask, K, stride_xm, stride_xk, stride_qz, stride_s,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
                  HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr,
                  TWO: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """tl.dot of a tile whose scale/zero vary by row: two groups (selected) or gathered per row."""
    P: tl.constexpr = 32 // BITS
    if TWO:
        s0 = tl.load(s_ptr + g0 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + g1 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z0 = _zeros(qz_ptr, g0, offs_n, n_mask, stride_qz, BITS)
        z1 = _zeros(qz_ptr, g1, offs_n, n_mask, stride_qz, BITS)
    for p in tl.static_range(P):
        c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
        rows = offs_w * P + p
        if TWO:
            in1 = _in_second(gidx_ptr, rows, K, g0, k_b, HAS_GIDX)[:, None]
            z = tl.where(in1, z1[None, :], z0[None, :])
            s = tl.where(in1, s1[None, :], s0[None, :])
        else:
            s, z = _rows_sz(s_ptr, qz_ptr, gidx_ptr, rows, rows < K, offs_n, n_mask, stride_s,
                            stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX)
        xt = _load_xt(xs_ptr, perm_ptr, offs_m, m_mask, rows, K, stride_xm, stride_xk, HAS_PERM, EVEN_K)
        w = ((_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)) * s).to(xt.dtype)
        acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mm_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, ws_ptr, cnt_ptr,
               M, N, K, G, K_KEY, M_KEY, stride_xm, stride_xk, stride_om, stride_qw, stride_qz, stride_s,
               BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
               HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr, MODE: tl.constexpr,
               WORD_GROUPS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
               PDL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Decode (2 <= M <= 16): one tl.dot per field p, x[:, p::P] (BLOCK_M x BLOCK_K / P)."""
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    release(PDL)
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    k_lo, k_hi, w_hi, offs_w, nxt = _split(pid_k, K, qw_ptr, offs_n, n_mask, stride_qw,
                                           SPLIT_K, BLOCK_K, P)
    wait(PDL)  # the first tile of weights is loaded (pdl.py)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qw, hi, nxt = _next_tile(qw_ptr, nxt, offs_w, w_hi, offs_n, n_mask, stride_qw, KW)
        if MODE == 0:
            s, z = _group_sz(s_ptr, qz_ptr, (k0 + GROUP_OFFSET) // GROUP_SIZE, offs_n, n_mask,
                             stride_s, stride_qz, BITS)
            part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for p in tl.static_range(P):
                c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
                xt = _load_xt(x_ptr, perm_ptr, offs_m, m_mask, offs_w * P + p, K, stride_xm,
                              stride_xk, HAS_PERM, EVEN_K)
                w = (_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)[None, :]).to(xt.dtype)  # q - z
                part = tl.dot(xt, w, part, input_precision=DOT_PRECISION)
            acc += part * s[None, :]
        elif MODE == 1:
            g0 = (k0 + GROUP_OFFSET) // GROUP_SIZE
            acc = _mm_tile_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr, g0,
                                tl.minimum(g0 + 1, G - 1), (g0 + 1) * GROUP_SIZE - GROUP_OFFSET,
                                offs_m, m_mask, offs_n, n_mask, K, stride_xm, stride_xk,
                                stride_qz, stride_s, BITS, GROUP_SIZE, GROUP_OFFSET, False,
                                HAS_PERM, EVEN_K, True, DOT_PRECISION)
        elif HAS_GIDX and WORD_GROUPS:  # padded act-order: scale and zero per word, once
            s, z = _word_sz(s_ptr, qz_ptr, gidx_ptr, k0, offs_w, w_hi, offs_n, n_mask, G,
                            stride_s, stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, True, False)
            for p in tl.static_range(P):
                c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
                xt = _load_xt(x_ptr, perm_ptr, offs_m, m_mask, offs_w * P + p, K, stride_xm,
                              stride_xk, HAS_PERM, EVEN_K)
                w = ((_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)) * s).to(xt.dtype)
                acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
        elif HAS_GIDX:
            rows = k0 + tl.arange(0, BLOCK_K)
            g_t = tl.load(gidx_ptr + rows, mask=rows < K, other=0)
            g0 = tl.min(tl.where(rows < K, g_t, 1 << 30), axis=0)
            g1 = tl.max(g_t, axis=0)
            if g1 - g0 <= 1:
                acc = _mm_tile_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr,
                                    g0, g1, 0, offs_m, m_mask, offs_n, n_mask, K, stride_xm,
                                    stride_xk, stride_qz, stride_s, BITS, GROUP_SIZE,
                                    GROUP_OFFSET, True, HAS_PERM, EVEN_K, True, DOT_PRECISION)
            else:
                acc = _mm_tile_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr,
                                    g0, g1, 0, offs_m, m_mask, offs_n, n_mask, K, stride_xm,
                                    stride_xk, stride_qz, stride_s, BITS, GROUP_SIZE,
                                    GROUP_OFFSET, True, HAS_PERM, EVEN_K, False, DOT_PRECISION)
        else:
            acc = _mm_tile_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr, 0, 0,
                                0, offs_m, m_mask, offs_n, n_mask, K, stride_xm, stride_xk,
                                stride_qz, stride_s, BITS, GROUP_SIZE, GROUP_OFFSET, False,
                                HAS_PERM, EVEN_K, False, DOT_PRECISION)
        offs_w += KW
    offs = offs_m[:, None] * stride_om + offs_n[None, :]
    offs_ws = offs_m[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    _finish(acc, out_ptr, offs, ws_ptr, offs_ws, mask, cnt_ptr, pid_m * tl.num_programs(0) + pid_n,
            pid_k, M * N, SPLIT_K)


_CONFIGS = [cfg(64, 128, 1, bm=16), cfg(64, 128, 4, bm=16), cfg(128, 128, 2, bm=16),
            cfg(128, 128, 8, bm=16), cfg(64, 64, 8, bm=16), cfg(128, 256, 4, 8, bm=16)]
_tuned = tuned(_mm_kernel, _CONFIGS, ["M_KEY"] + KEY)
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2)


def decode_matmul(x: torch.Tensor, w, perm: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K], 2 <= M <= 16 (fp16, bf16 or fp32) @ the 4/8-bit GPTQWeight w -> out [M, N].

    `perm` (act-order): use x[:, perm], gathered as the kernel reads it. `config` fixes the block
    sizes (tests); by default they are autotuned per (M, shape, shard).
    """
    out = new_out(x, w, out)
    x, perm = through_perm(x, perm)
    m, n = out.shape
    ws, cnt = workspace(x.device, m * n, m * triton.cdiv(n, 16))
    args = gptq_args(x, w, out) | dict(
        M=m, M_KEY=m, stride_xm=x.stride(0), stride_om=out.stride(0),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        perm_ptr=x if perm is None else perm, HAS_PERM=perm is not None, ws_ptr=ws, cnt_ptr=cnt,
        WORD_GROUPS=w.g_idx is not None and w.word_groups) | pdl_options(x)
    launch(_mm_kernel, _tuned, args,
           lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m, c["BLOCK_M"]), c["SPLIT_K"]),
           config, INTERPRET_CONFIG)
    return out


if __name__ == "__main__":
    self_check(decode_matmul, ms=(2, 5, 16))
