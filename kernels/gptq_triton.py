"""Triton GPTQ dequantize-and-multiply for 4- and 8-bit shards: y[M, N] = x[M, K] @ W[K, N].

Run `python -m tpserve.kernels.gptq_triton` to print the error against the torch reference (on a
machine without CUDA it sets TRITON_INTERPRET=1 and runs the kernels on the CPU). 2- and 3-bit shards
are not handled here: `gptq_matmul` sends them to the torch reference (3-bit fields straddle words).

Packing (tpserve/model/gptq.py): one int32 word of qweight holds P = 32 / bits consecutive input rows of a
column, row k at bits (k % P) * bits of word k // P, so a [BLOCK_K / P, BLOCK_N] tile of words is
BLOCK_K rows, read with coalesced 16-byte loads along N. Field p is turned into a float by one
AND-OR (`_lane`: bits(2**23 + q * 2**(bits*j)) from the word's low or high half), with no shift per
field and no int -> float convert; one FMA then gives q - z exactly.

Paths, by M:
  M == 1       _gemv_kernel: fp32 FMAs into a [BLOCK_K / P, BLOCK_N] accumulator, reduced at the end.
  2 <= M <= 16 _mm_kernel: per field p a tl.dot of x[:, p::P] (BLOCK_M x BLOCK_K / P) with the
               unpacked field; a sum over K may be taken in any order, so no interleave is needed.
  16 < M < DEQUANT_MIN_M  _prefill_kernel: a [BLOCK_K, BLOCK_N] tile unpacked row by row, one tl.dot.
  M >= DEQUANT_MIN_M      W dequantized once (`_dequant_kernel`), then cuBLAS.
Both decode kernels load the next tile while computing this one, and split K over SPLIT_K programs
(so a 4096-wide layer still fills 132 SMs): each adds its fp32 partial into a workspace with atomics,
and the last program of a tile (a per-tile ticket) reads the sum back, writes the output and
re-zeroes the workspace, so a call is one launch. The workspace is per device: calls on concurrent
CUDA streams would race on it (tpserve runs one stream per rank).

Groups. Local row k is in group (k + GROUP_OFFSET) // GROUP_SIZE, or g_idx[k]. Group size, offset
and HAS_GIDX are compile-time constants, and a tile of BLOCK_K rows takes one of (MODE):
  0 ONE  BLOCK_K divides the group size and the offset: scale and zero loaded once per tile, the
         scale applied once per tile to the partial sum.
  1 TWO  no g_idx and BLOCK_K <= group size (a shard starting inside a group): at most two groups
         per tile; x is split at the boundary row into the two groups' parts.
  2      g_idx: per tile, if its rows span at most two groups (sorted act-order, most tiles) the
         TWO path with the boundary read from g_idx, else scale and zero gathered per row; without
         g_idx (groups smaller than BLOCK_K) always per row.
The autotuner keeps only the configs that reach the best mode for the shard.
Act-order: `prepare_act_order` (gptq_matmul.py) sorts rows by group once at load time and returns
the permutation, which the kernels apply to x as they read it. An unsharded act-order layer then
has contiguous full groups (ONE); a row-parallel shard of one keeps a sorted g_idx (mode 2).
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAGIC = tl.constexpr(8388608.0)  # 2**23


@triton.jit
def _lane(qw, hi, p: tl.constexpr, BITS: tl.constexpr):
    """Field p of each word as the fp32 2**23 + q * 2**(BITS * j), j = p mod (16 / BITS).

    One AND-OR (a lop3) on the low half of the word (qw) or its high half (hi = qw >> 16): a field
    at bits BITS * j < 16 of a half stays inside the 23-bit mantissa, so no shift per field and no
    int -> float convert. Callers undo the 2**(BITS * j) by a constant factor (exact).
    """
    P2: tl.constexpr = 16 // BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << (BITS * (p % P2))
    if p < P2:
        h = qw
    else:
        h = hi
    return ((h & MASK) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _zeros(qz_ptr, g, offs_n, mask, stride_qz, BITS: tl.constexpr):
    """True zeros of groups g (scalar or [R, 1]) at columns offs_n, as fp32."""
    PZ: tl.constexpr = 32 // BITS
    words = tl.load(qz_ptr + g * stride_qz + offs_n // PZ, mask=mask, other=0)
    return ((words >> ((offs_n % PZ) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _load_x(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """x[rows] (x[perm[rows]] for act-order) as fp32; rows past K read 0 (EVEN_K: there are none,
    and the unmasked loads save an instruction or three per x value)."""
    if EVEN_K:
        if HAS_PERM:
            rows = tl.load(perm_ptr + rows)
        return tl.load(x_ptr + rows * stride_xk).to(tl.float32)
    else:
        mask = rows < K
        if HAS_PERM:
            rows = tl.load(perm_ptr + rows, mask=mask, other=0)
        return tl.load(x_ptr + rows * stride_xk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_xt(x_ptr, perm_ptr, offs_m, m_mask, rows, K, stride_xm, stride_xk, HAS_PERM: tl.constexpr,
             EVEN_K: tl.constexpr):
    """x[offs_m, rows] as [BLOCK_M, len(rows)] in x's dtype (columns through perm for act-order)."""
    r_mask = rows < K
    if HAS_PERM:
        if EVEN_K:
            rows = tl.load(perm_ptr + rows)
        else:
            rows = tl.load(perm_ptr + rows, mask=r_mask, other=0)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :] * stride_xk,
                   mask=m_mask[:, None] & r_mask[None, :], other=0.0)


@triton.jit
def _in_second(gidx_ptr, rows, K, g0, k_b, HAS_GIDX: tl.constexpr):
    """Whether each row belongs to the second of a tile's two groups."""
    if HAS_GIDX:
        return tl.load(gidx_ptr + rows, mask=rows < K, other=0) != g0
    else:
        return rows >= k_b


@triton.jit
def _finish(y, out_ptr, offs_out, ws_ptr, offs_ws, mask, cnt_ptr, tile, SPLIT_K: tl.constexpr):
    """Store y, or add it into the workspace; the last of SPLIT_K programs stores the sum."""
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_out, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptr + offs_ws, y, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            zero = tl.zeros_like(y)
            total = tl.atomic_add(ws_ptr + offs_ws, zero, mask=mask, sem="relaxed")  # read at L2
            total = tl.where(mask, total, 0.0)  # masked lanes return garbage
            tl.store(out_ptr + offs_out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(ws_ptr + offs_ws, zero, mask=mask)  # no program of this launch adds here now
            tl.store(cnt_ptr + tile, 0)


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
        r_mask = rows < K
        if HAS_GIDX:
            g = tl.load(gidx_ptr + rows, mask=r_mask, other=0)
        else:
            g = (rows + GROUP_OFFSET) // GROUP_SIZE
        m2 = r_mask[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2, other=0.0)
        z = _zeros(qz_ptr, g[:, None], offs_n[None, :], m2, stride_qz, BITS)
        xv = _load_x(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM, EVEN_K)
        acc += (_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)) * s.to(tl.float32) * xv[:, None]
    return acc


@triton.jit
def _gemv_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, ws_ptr, cnt_ptr,
                 N, K, G, stride_xk, stride_qw, stride_qz, stride_s,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
                 HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr, MODE: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    w_hi = tl.cdiv(k_hi, P)  # words of this split (the packed tail word is zero-padded)
    acc = tl.zeros([KW, BLOCK_N], tl.float32)
    corr = tl.zeros([BLOCK_N], tl.float32)  # -sum_k z * s * x of two-group tiles
    offs_w = k_lo // P + tl.arange(0, KW)
    # The next tile is loaded while this one is computed (the loop is not software-pipelined).
    nxt = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                  mask=(offs_w < w_hi)[:, None] & n_mask[None, :], other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qw = nxt
        nxt = tl.load(qw_ptr + (offs_w + KW)[:, None] * stride_qw + offs_n[None, :],
                      mask=(offs_w + KW < w_hi)[:, None] & n_mask[None, :], other=0)
        hi = qw >> 16
        if MODE == 0:
            g = (k0 + GROUP_OFFSET) // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = _zeros(qz_ptr, g, offs_n, n_mask, stride_qz, BITS)
            part = tl.zeros([KW, BLOCK_N], tl.float32)
            for p in tl.static_range(P):
                c = 1.0 / (1 << (BITS * (p % (16 // BITS))))
                xv = _load_x(x_ptr, perm_ptr, offs_w * P + p, K, stride_xk, HAS_PERM, EVEN_K)
                part += (_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)[None, :]) * xv[:, None]
            acc += part * s[None, :]
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
    _finish(y, out_ptr, offs_n, ws_ptr, offs_n, n_mask, cnt_ptr, pid_n, SPLIT_K)


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
            r_mask = rows < K
            if HAS_GIDX:
                g = tl.load(gidx_ptr + rows, mask=r_mask, other=0)
            else:
                g = (rows + GROUP_OFFSET) // GROUP_SIZE
            m2 = r_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            z = _zeros(qz_ptr, g[:, None], offs_n[None, :], m2, stride_qz, BITS)
        xt = _load_xt(xs_ptr, perm_ptr, offs_m, m_mask, rows, K, stride_xm, stride_xk, HAS_PERM, EVEN_K)
        w = ((_lane(qw, hi, p, BITS) * c - (z + MAGIC * c)) * s).to(xt.dtype)
        acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mm_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, ws_ptr, cnt_ptr,
               M, N, K, G, M_KEY, stride_xm, stride_xk, stride_om, stride_qw, stride_qz, stride_s,
               BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
               HAS_GIDX: tl.constexpr, HAS_PERM: tl.constexpr, MODE: tl.constexpr,
               EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Decode (2 <= M <= 16): one tl.dot per field p, x[:, p::P] (BLOCK_M x BLOCK_K / P)."""
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    k_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    w_hi = tl.cdiv(k_hi, P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    offs_w = k_lo // P + tl.arange(0, KW)
    nxt = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                  mask=(offs_w < w_hi)[:, None] & n_mask[None, :], other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qw = nxt
        nxt = tl.load(qw_ptr + (offs_w + KW)[:, None] * stride_qw + offs_n[None, :],
                      mask=(offs_w + KW < w_hi)[:, None] & n_mask[None, :], other=0)
        hi = qw >> 16
        if MODE == 0:
            g = (k0 + GROUP_OFFSET) // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = _zeros(qz_ptr, g, offs_n, n_mask, stride_qz, BITS)
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
            SPLIT_K)


@triton.jit
def _prefill_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, out_ptr, M, N, K, G, M_KEY,
                    stride_xm, stride_xk, stride_om, stride_qw, stride_qz, stride_s,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
                    HAS_GIDX: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """Prefill (M > 16): a [BLOCK_K, BLOCK_N] tile unpacked row by row (each word read by its P
    rows, from L1) and one tl.dot per tile; x (already permuted for act-order) read contiguously."""
    P: tl.constexpr = 32 // BITS
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
        qw = tl.load(qw_ptr + (offs_k // P)[:, None] * stride_qw + offs_n[None, :],
                     mask=k_mask[:, None] & n_mask[None, :], other=0)
        q = ((qw >> ((offs_k % P) * BITS)[:, None]) & ((1 << BITS) - 1)) | 0x4B000000
        q = q.to(tl.float32, bitcast=True)  # 2**23 + q
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if MODE == 0:
            g = (k0 + GROUP_OFFSET) // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = _zeros(qz_ptr, g, offs_n, n_mask, stride_qz, BITS)
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
                if HAS_GIDX:
                    g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
                else:
                    g = (offs_k + GROUP_OFFSET) // GROUP_SIZE
                m2 = k_mask[:, None] & n_mask[None, :]
                s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2,
                            other=0.0).to(tl.float32)
                z = _zeros(qz_ptr, g[:, None], offs_n[None, :], m2, stride_qz, BITS)
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
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        g = (offs_k + GROUP_OFFSET) // GROUP_SIZE
    s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
    z = _zeros(qz_ptr, g[:, None], offs_n[None, :], mask, stride_qz, BITS)
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
             ((q - z) * s.to(tl.float32)).to(w_ptr.dtype.element_ty), mask=mask)


# Autotuning. Configs are few on purpose (each is a compile); `_prune` keeps those that fit the
# shape and reach the best group mode for the shard.
def _cfg(bn, bk, sk=None, warps=4, stages=2, bm=None, group_m=None):
    kw = dict(BLOCK_N=bn, BLOCK_K=bk)
    kw |= {k: v for k, v in dict(SPLIT_K=sk, BLOCK_M=bm, GROUP_M=group_m).items() if v is not None}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


_GEMV_CONFIGS = [_cfg(128, 64, 4), _cfg(128, 64, 8), _cfg(64, 64, 16), _cfg(256, 64, 8, 2),
                 _cfg(256, 64, 16, 2), _cfg(128, 64, 16, 1), _cfg(128, 128, 4), _cfg(64, 128, 16),
                 _cfg(64, 128, 32), _cfg(128, 32, 8), _cfg(256, 32, 16, 2)]
_DECODE_CONFIGS = [_cfg(64, 128, 1, bm=16), _cfg(64, 128, 4, bm=16), _cfg(128, 128, 2, bm=16),
                   _cfg(128, 128, 8, bm=16), _cfg(64, 64, 8, bm=16), _cfg(128, 256, 4, 8, bm=16)]
_PREFILL_CONFIGS = [_cfg(128, 64, None, 8, 3, bm=128, group_m=8),
                    _cfg(128, 64, None, 4, 3, bm=64, group_m=8),
                    _cfg(64, 64, None, 4, 4, bm=128, group_m=8),
                    _cfg(128, 32, None, 8, 4, bm=128, group_m=8)]


def _mode_of(block_k: int, gs: int, off: int, has_gidx: bool) -> int:
    """0 = ONE, 1 = TWO, 2 = g_idx or ROW (see the module docstring)."""
    if has_gidx:
        return 2
    if gs % block_k == 0 and off % block_k == 0:
        return 0
    return 1 if block_k <= gs else 2


def _prune(configs, named_args, **kwargs):
    """Configs that fit the shape and reach its best group mode, each with its MODE filled in."""
    a = {**named_args, **kwargs}
    p = 32 // a["BITS"]

    def fits(c):
        kw = c.kwargs
        bk, sk = kw["BLOCK_K"], kw.get("SPLIT_K", 1)
        min_words = 16 if "SPLIT_K" in kw and "BLOCK_M" in kw else 1  # decode: tl.dot K >= 16
        return bk // p >= min_words and (sk == 1 or a["K"] >= 2 * sk * bk)

    ok = [c for c in configs if fits(c)] or configs
    mode = [_mode_of(c.kwargs["BLOCK_K"], a["GROUP_SIZE"], a["GROUP_OFFSET"], a["HAS_GIDX"])
            for c in ok]
    def filled(c, md):
        kw = {**c.kwargs, "MODE": md}
        if "SPLIT_K" in kw:  # the split-K kernels skip row masks when tiles divide K
            kw["EVEN_K"] = a["K"] % kw["BLOCK_K"] == 0
        return triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)

    return [filled(c, md) for c, md in zip(ok, mode) if md == min(mode)]


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _tuned(kernel, configs, key):
    if _INTERPRET:
        return None
    prune = {"early_config_prune": _prune}
    try:
        return triton.autotune(configs, key=key, prune_configs_by=prune, do_bench=_bench)(kernel)
    except TypeError:  # an older triton without do_bench=
        return triton.autotune(configs, key=key, prune_configs_by=prune)(kernel)


_KEY = ["N", "K", "BITS", "GROUP_SIZE", "GROUP_OFFSET", "HAS_GIDX"]
_gemv_tuned = _tuned(_gemv_kernel, _GEMV_CONFIGS, _KEY)
_decode_tuned = _tuned(_mm_kernel, _DECODE_CONFIGS, ["M_KEY"] + _KEY)
_prefill_tuned = _tuned(_prefill_kernel, _PREFILL_CONFIGS, ["M_KEY"] + _KEY)

# Fixed configs for the interpreter (autotuning there would run every config many times).
INTERPRET_CONFIGS = {"gemv": dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2),
                     "decode": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2),
                     "prefill": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)}

# From this many rows on, a matmul dequantizes W once and hands it to cuBLAS (a prefill of M = 512
# on 4096x14336 took 364 us in the tl.dot kernel, bf16 cuBLAS 87 us, dequantizing ~40 us).
DEQUANT_MIN_M = 256

_workspaces: dict = {}


def _workspace(device: torch.device, n_acc: int, n_cnt: int):
    """Zeroed fp32 split-K accumulator and int32 tickets; the kernels leave them zeroed."""
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < n_acc or cnt.numel() < n_cnt:
        ws = torch.zeros(max(n_acc, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(n_cnt, 1 << 12), dtype=torch.int32, device=device)
        _workspaces[device] = (ws, cnt)
    return ws, cnt


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


def gptq_matmul_triton(x: torch.Tensor, w, perm: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (fp16, bf16 or fp32) @ the 4/8-bit GPTQWeight w -> out [M, N] in x.dtype.

    `perm` (from `prepare_act_order`): use x[:, perm]; decode kernels gather it on the fly.
    `config` fixes the block sizes (tests); by default they are autotuned per (M, N, K, shard).
    """
    if w.bits not in (4, 8):
        raise ValueError(f"the Triton GPTQ kernel handles bits 4 and 8, not {w.bits}; "
                         f"use gptq_matmul, which falls back to the torch reference")
    m, k = x.shape
    n = w.out_features
    assert k == w.in_features, (x.shape, w.in_features)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1 and out.dtype == x.dtype
    kind = "gemv" if m == 1 else "decode" if m <= 16 else "prefill"
    if kind == "prefill" and perm is not None:
        x, perm = x.index_select(1, perm), None
    if m >= DEQUANT_MIN_M and config is None:  # compute-bound: dequantize once, then cuBLAS
        return torch.matmul(x, dequantize_triton(w, x.dtype), out=out)
    args = dict(x_ptr=x, qw_ptr=w.qweight, qz_ptr=w.qzeros, s_ptr=w.scales,
                gidx_ptr=w.qweight if w.g_idx is None else w.g_idx, out_ptr=out, N=n, K=k,
                G=w.scales.shape[0], stride_xk=x.stride(1), stride_qw=w.qweight.stride(0),
                stride_qz=w.qzeros.stride(0), stride_s=w.scales.stride(0), BITS=w.bits,
                GROUP_SIZE=w.group_size, GROUP_OFFSET=w.group_offset, HAS_GIDX=w.g_idx is not None)
    if kind != "gemv":
        args.update(M=m, M_KEY=m if m <= 16 else triton.next_power_of_2(m), stride_xm=x.stride(0),
                    stride_om=out.stride(0),
                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    if kind != "prefill":
        ws, cnt = _workspace(x.device, m * n, m * triton.cdiv(n, 16))
        args.update(perm_ptr=x if perm is None else perm, HAS_PERM=perm is not None, ws_ptr=ws,
                    cnt_ptr=cnt)

    def grid(c):
        if kind == "gemv":
            return triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"]
        if kind == "decode":
            return triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m, c["BLOCK_M"]), c["SPLIT_K"]
        return (triton.cdiv(n, c["BLOCK_N"]) * triton.cdiv(m, c["BLOCK_M"]),)

    kernel, tuned = {"gemv": (_gemv_kernel, _gemv_tuned), "decode": (_mm_kernel, _decode_tuned),
                     "prefill": (_prefill_kernel, _prefill_tuned)}[kind]
    if config is None and tuned is not None:
        tuned[grid](**args)
    else:
        c = dict(config or INTERPRET_CONFIGS[kind])
        c["MODE"] = _mode_of(c["BLOCK_K"], w.group_size, w.group_offset, w.g_idx is not None)
        if kind != "prefill":
            c["EVEN_K"] = k % c["BLOCK_K"] == 0
        launch = {k: c.pop(k) for k in ("num_warps", "num_stages") if k in c}
        kernel[grid(c)](**args, **c, **launch)
    return out


def _main():
    from tpserve.model.gptq_shard import GPTQWeight
    from tpserve.kernels.gptq_matmul import gptq_matmul_reference, prepare_act_order, random_gptq

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    print(f"device {dev}{' (TRITON_INTERPRET=1)' if _INTERPRET else ''}, {dtype}")
    print(f"{'bits':>4} {'K':>5} {'N':>5} {'gs':>4} {'off':>4} {'act':>4} {'M':>3} {'max|err|':>9} "
          f"{'max|y|':>8}")
    shapes = [(4, 200, 72, 64, 0, False), (4, 200, 72, 64, 32, False), (8, 136, 40, 32, 16, False),
              (4, 256, 64, 64, 0, True), (8, 256, 64, 32, 0, True)]
    for bits, k, n, gs, off, act in shapes:
        w: GPTQWeight = random_gptq(k, n, bits, gs, off, act_order=act, device=dev)
        w, perm = prepare_act_order(w) if act else (w, None)
        for m in (1, 4, 33):
            x = torch.randn(m, k, dtype=dtype, device=dev)
            y = gptq_matmul_triton(x, w, perm)
            ref = gptq_matmul_reference((x if perm is None else x[:, perm]).float(), w)
            print(f"{bits:>4} {k:>5} {n:>5} {gs:>4} {off:>4} {str(act):>4} {m:>3} "
                  f"{(y.float() - ref).abs().max().item():>9.2e} {ref.abs().max().item():>8.1f}")


if __name__ == "__main__":
    _main()
