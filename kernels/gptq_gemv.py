"""GPTQ decode GEMV (M = 1), 4- and 8-bit: y[1, N] = x[1, K] @ W[K, N].

Run `python -m tpserve.kernels.gptq_gemv` to print its error against the torch reference (on a
machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter runs the kernel
on the CPU).

fp16 x, tiles in one group or two whose boundary falls between words, or act-order rows padded
to whole words per group at load (H2): the word's dot product in fp16x2 arithmetic (`gptq_h2.py`),
one FFMA per word for the scale (gathered per word for act-order rows).

Otherwise (bf16/fp32 x, per-row groups, g_idx): fp32 FMAs into a [BLOCK_K / P, BLOCK_N]
accumulator with `_lane` fields; a tile spanning two groups splits x at the boundary row.
The next tile of words is loaded while this one is computed; K is split over SPLIT_K programs
(so a 4096-wide layer still fills 132 SMs), added up in the workspace (gptq_common.py).
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .gptq_common import (MAGIC, _finish, _group_sz, _in_second, _lane, _load_x,  # noqa: E402
                          _next_tile, _rows_sz, _split, _word_sz, _zeros)
from .gptq_launch import (KEY, cfg, gptq_args, launch, new_out, through_perm, tuned,  # noqa: E402
                          workspace)
from .gptq_h2 import _h2_dot  # noqa: E402
from .fixed_sum import clear, is_fixed, reads_as  # noqa: E402
from .pdl import options as pdl_options, release, wait  # noqa: E402
from .gptq_weight import self_check  # noqa: E402

@triton.jit
def _gemv_two(acc, corr, qw, hi, offs_w, k0, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr, g0, g1, k_b,
              offs_n, n_mask, K, stride_xk, stride_qz, stride_s, BITS: tl.constexpr,
              HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """A tile spanning groups g0 and g1: x split at the group boundary, zeros applied per tile."""
    P: tl.constexpr = 32 // BITS
    s0 = tl.load(s_ptr + g0 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + g1 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    z0 = _zeros(qz_ptr, g0, offs_n, n_mask, stride_qz, BITS)
    z1 = _zeros(qz_ptr, g1, offs_n, n_mask, stride_qz, BITS)
    part0 = tl.zeros_like(acc)
    part1 = tl.zeros_like(acc)
    for p in tl.static_range(P):
        c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
        rows = offs_w * P + p
        xv = _load_x(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM, EVEN_K)
        x1 = tl.where(_in_second(gidx_ptr, rows, K, g0, k_b, HAS_GIDX), xv, 0.0)
        q = _lane(qw, hi, p, BITS) * c - MAGIC * c
        part0 += q * (xv - x1)[:, None]
        part1 += q * x1[:, None]
    rows = k0 + tl.arange(0, BLOCK_K)
    xs = _load_x(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM, EVEN_K)
    sx1 = tl.sum(tl.where(_in_second(gidx_ptr, rows, K, g0, k_b, HAS_GIDX), xs, 0.0), axis=0)
    sx0 = tl.sum(xs, axis=0) - sx1
    acc += part0 * s0[None, :] + part1 * s1[None, :]
    corr -= z0 * s0 * sx0 + z1 * s1 * sx1
    return acc, corr


@triton.jit
def _gemv_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr, offs_n, n_mask, K,
               stride_xk, stride_qz, stride_s, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               GROUP_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr,
               EVEN_K: tl.constexpr):
    """Any tile: scale and zero gathered per row."""
    P: tl.constexpr = 32 // BITS
    for p in tl.static_range(P):
        c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
        rows = offs_w * P + p
        s, z = _rows_sz(s_ptr, qz_ptr, gidx_ptr, rows, rows < K, offs_n, n_mask, stride_s,
                        stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX)
        xv = _load_x(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM, EVEN_K)
        acc += (_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)) * s * xv[:, None]
    return acc



@triton.jit
def _gemv_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, ws_ptr, cnt_ptr,
                 clr_ptr, N, K, G, K_KEY, CLR_N, stride_xk, stride_qw, stride_qz, stride_s,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
                 HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr, MODE: tl.constexpr,
                 EVEN_K: tl.constexpr, H2: tl.constexpr, PDL: tl.constexpr, CLEAR: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    release(PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo, k_hi, w_hi, offs_w, nxt = _split(pid_k, K, qw_ptr, offs_n, n_mask, stride_qw,
                                           SPLIT_K, BLOCK_K, P)
    wait(PDL)  # the first tile of weights is loaded; x and the workspace come from other kernels
    if CLEAR:  # a buffer the kernels before this one have read (`gemv`'s clear)
        clear(clr_ptr, CLR_N, pid_k * tl.num_programs(0) + pid_n, tl.num_programs(0) * SPLIT_K)
    acc = tl.zeros([KW, BLOCK_N], tl.float32)
    corr = tl.zeros([BLOCK_N], tl.float32)  # -sum_k z * s * x of two-group tiles
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qw, hi, nxt = _next_tile(qw_ptr, nxt, offs_w, w_hi, offs_n, n_mask, stride_qw, KW)
        if MODE == 0:
            s, z = _group_sz(s_ptr, qz_ptr, (k0 + GROUP_OFFSET) // GROUP_SIZE, offs_n, n_mask,
                             stride_s, stride_qz, BITS)
            if H2:
                part = _h2_dot(qw, offs_w, x_ptr, perm_ptr, z[None, :], K, stride_xk, BITS,
                               HAS_PERM, EVEN_K)
                acc += part * (s * (1 << BITS))[None, :]
            else:
                part = tl.zeros([KW, BLOCK_N], tl.float32)
                for p in tl.static_range(P):
                    c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
                    xv = _load_x(x_ptr, perm_ptr, offs_w * P + p, K, stride_xk, HAS_PERM, EVEN_K)
                    part += (_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)[None, :]) * xv[:, None]
                acc += part * s[None, :]
        elif (MODE == 1 or HAS_GIDX) and H2:  # each word in one group: z, s per word row
            s, z = _word_sz(s_ptr, qz_ptr, gidx_ptr, k0, offs_w, w_hi, offs_n, n_mask, G, stride_s,
                            stride_qz, BITS, GROUP_SIZE, GROUP_OFFSET, HAS_GIDX, MODE == 1)
            part = _h2_dot(qw, offs_w, x_ptr, perm_ptr, z, K, stride_xk, BITS, HAS_PERM, EVEN_K)
            acc += part * s * (1 << BITS)
        elif MODE == 1:
            g0 = (k0 + GROUP_OFFSET) // GROUP_SIZE
            acc, corr = _gemv_two(acc, corr, qw, hi, offs_w, k0, x_ptr, perm_ptr, qz_ptr, s_ptr,
                                  gidx_ptr, g0, tl.minimum(g0 + 1, G - 1),
                                  (g0 + 1) * GROUP_SIZE - GROUP_OFFSET, offs_n, n_mask, K,
                                  stride_xk, stride_qz, stride_s, BITS, False, HAS_PERM, EVEN_K, BLOCK_K)
        elif HAS_GIDX:
            rows = k0 + tl.arange(0, BLOCK_K)
            g_t = tl.load(gidx_ptr + rows, mask=rows < K, other=0)
            g0 = tl.min(tl.where(rows < K, g_t, 1 << 30), axis=0)
            g1 = tl.max(g_t, axis=0)
            if g1 - g0 <= 1:  # sorted act-order: most tiles see one or two groups
                acc, corr = _gemv_two(acc, corr, qw, hi, offs_w, k0, x_ptr, perm_ptr, qz_ptr,
                                      s_ptr, gidx_ptr, g0, g1, 0, offs_n, n_mask, K, stride_xk,
                                      stride_qz, stride_s, BITS, True, HAS_PERM, EVEN_K, BLOCK_K)
            else:
                acc = _gemv_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr,
                                 offs_n, n_mask, K, stride_xk, stride_qz, stride_s, BITS,
                                 GROUP_SIZE, GROUP_OFFSET, True, HAS_PERM, EVEN_K)
        else:
            acc = _gemv_rows(acc, qw, hi, offs_w, x_ptr, perm_ptr, qz_ptr, s_ptr, gidx_ptr,
                             offs_n, n_mask, K, stride_xk, stride_qz, stride_s, BITS, GROUP_SIZE,
                             GROUP_OFFSET, False, HAS_PERM, EVEN_K)
        offs_w += KW
    y = tl.sum(acc, axis=0) + corr
    _finish(y, out_ptr, offs_n, ws_ptr, offs_n, n_mask, cnt_ptr, pid_n, pid_k, N, SPLIT_K)


_CONFIGS = [cfg(128, 64, 4), cfg(128, 64, 8), cfg(64, 64, 16), cfg(256, 64, 8, 2),
            cfg(256, 64, 16, 2), cfg(128, 64, 16, 1), cfg(128, 128, 4), cfg(64, 128, 16),
            cfg(64, 128, 32), cfg(128, 32, 8), cfg(256, 32, 16, 2), cfg(256, 128, 4),
            cfg(256, 128, 8), cfg(512, 64, 4, 4), cfg(256, 64, 4, 2),
            # a split's rows in one tile at K = 4096 (all of its words in flight at once: the
            # small shard shapes are latency-bound, bench/README.md)
            cfg(64, 256, 16), cfg(128, 256, 16, 8),
            # one warp per 64 columns: merged q/k/v (4096 x 6144) 10.2 us vs 11.2 with the pool's
            # best on an H200 (fixed-point outputs, bench/gemv_configs.py --extra)
            cfg(64, 128, 16, 1)]
_tuned = tuned(_gemv_kernel, _CONFIGS, KEY + ["H2"])
# a fixed-point output (`fixed_sum.py`) is added into: tuned apart (its dtype is in the tuner's
# key anyway), zeroed before each timed call and before the call itself
_tuned_fixed = tuned(_gemv_kernel, _CONFIGS, KEY + ["H2"], reset_to_zero=["out_ptr"])
INTERPRET_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)
USE_H2 = True  # the fp16x2 path where it applies (a switch for A/B timing)


def uses_h2(dtype: torch.dtype, w) -> bool:  # dtype: as x is read (`fixed_sum.reads_as`)
    """Whether the fp16x2 path applies: fp16 x, group boundaries between words (g_idx shards:
    only where the loader padded each group's rows to whole words)."""
    p = 32 // w.bits
    aligned = w.word_groups if w.g_idx is not None else (w.group_size % p == 0
                                                          and w.group_offset % p == 0)
    return USE_H2 and dtype == torch.float16 and aligned


def gemv(x: torch.Tensor, w, perm: torch.Tensor | None = None, out: torch.Tensor | None = None,
         config: dict | None = None, clear: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (fp16, bf16 or fp32) @ the 4/8-bit GPTQWeight w -> out [1, N] in x.dtype.

    `perm` (act-order, from the loader's sort): use x[:, perm], gathered as the kernel reads it.
    `config` fixes the block sizes (tests); by default they are autotuned per shape and shard.
    x int64 [1, 2K]: a fixed-point gate/up sum, read as silu(gate) * up in fp16 (`fixed_sum.gated`:
    the SiLU-mul kernel's output, without that kernel). `clear`: an int64 buffer that the kernel's
    programs zero once the kernel before it has completed (the previous gate/up sum, `GatedMLP`).
    """
    out = new_out(x, w, out)
    if not is_fixed(x):  # (a gate/up sum is read through perm by the kernel)
        x, perm = through_perm(x, perm)
    assert x.shape[0] == 1, x.shape
    h2 = uses_h2(reads_as(x), w)
    ws, cnt = workspace(x.device, w.out_features, triton.cdiv(w.out_features, 16))
    args = gptq_args(x, w, out) | dict(perm_ptr=x if perm is None else perm,
                                       HAS_PERM=perm is not None, ws_ptr=ws, cnt_ptr=cnt, H2=h2,
                                       CLEAR=clear is not None,
                                       clr_ptr=out if clear is None else clear,
                                       CLR_N=0 if clear is None else clear.numel()) | pdl_options(x)
    launch(_gemv_kernel, _tuned_fixed if out.dtype == torch.int64 else _tuned, args,
           lambda c: (triton.cdiv(w.out_features, c["BLOCK_N"]), c["SPLIT_K"]), config,
           INTERPRET_CONFIG)
    return out


if __name__ == "__main__":
    self_check(gemv, ms=(1,))
