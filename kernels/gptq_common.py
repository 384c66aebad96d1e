"""Shared device pieces of the GPTQ Triton kernels: field extraction, zeros, x loads, split-K
(their host side, configs, tuning and launching, is `gptq_launch.py`).

Packing (`gptq_weight.py`): one int32 word of qweight holds P = 32 / bits consecutive input rows of
a column, row k at bits (k % P) * bits of word k // P, so a [BLOCK_K / P, BLOCK_N] tile of words is
BLOCK_K rows, read with coalesced 16-byte loads along N. In the fp32 design a field p becomes a float
by one AND-OR (`_lane`: bits(2**23 + q * 2**(bits*j)) from the word's low or high half), with no
shift per field and no int -> float convert; one FMA then gives q - z exactly.

Groups. Local row k is in group (k + GROUP_OFFSET) // GROUP_SIZE, or g_idx[k]. Group size, offset
and HAS_GIDX are compile-time constants, and a tile of BLOCK_K rows takes one of (MODE):
  0 ONE  BLOCK_K divides the group size and the offset: scale and zero loaded once per tile.
  1 TWO  no g_idx and BLOCK_K <= group size (a shard starting inside a group): at most two groups
         per tile, split at the boundary row.
  2      g_idx: per tile, if its rows span at most two groups (sorted act-order, most tiles) the
         TWO path with the boundary read from g_idx, else scale and zero gathered per row; without
         g_idx (groups smaller than BLOCK_K) always per row.
The autotuner keeps only the configs that reach the best mode for the shard (`gptq_launch._prune`).

Split-K (decode kernels): SPLIT_K programs share a tile of outputs; each stores its fp32 partial in
its own slice of a workspace, and the last of them (a per-tile ticket) sums the slices in split
order and writes the output, so a call is one launch and its result does not depend on the order
the programs ran in (atomic adds into one sum would: decode would not be bitwise repeatable). The
workspace is per device (`gptq_launch.workspace`): calls on concurrent CUDA streams would race on
it (tpserve runs one stream per rank).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .fixed_sum import MAX as FIXED_MAX, ONE as FIXED_ONE, gated

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET = tl.constexpr(_INTERPRET)  # inside @triton.jit: the asm has no interpreter
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
def _words(qw_ptr, offs_w, w_hi, offs_n, n_mask, stride_qw):
    """The [len(offs_w), BLOCK_N] tile of qweight words (0 past w_hi)."""
    return tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                   mask=(offs_w < w_hi)[:, None] & n_mask[None, :], other=0)


@triton.jit
def _split(pid_k, K, qw_ptr, offs_n, n_mask, stride_qw, SPLIT_K: tl.constexpr,
           BLOCK_K: tl.constexpr, P: tl.constexpr):
    """Rows [k_lo, k_hi) of split pid_k, the end of its words (the packed tail word is
    zero-padded), the offsets of its first tile of words and that tile, already loaded."""
    k_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    w_hi = tl.cdiv(k_hi, P)
    offs_w = k_lo // P + tl.arange(0, BLOCK_K // P)
    return k_lo, k_hi, w_hi, offs_w, _words(qw_ptr, offs_w, w_hi, offs_n, n_mask, stride_qw)


@triton.jit
def _next_tile(qw_ptr, cur, offs_w, w_hi, offs_n, n_mask, stride_qw, KW: tl.constexpr):
    """(this tile's words, their high halves, the next tile's words): the next load is issued
    while this tile is computed (the split-K loops are not software-pipelined)."""
    return cur, cur >> 16, _words(qw_ptr, offs_w + KW, w_hi, offs_n, n_mask, stride_qw)


@triton.jit
def _group_sz(s_ptr, qz_ptr, g, offs_n, n_mask, stride_s, stride_qz, BITS: tl.constexpr):
    """Scale (fp32) and zero of group g (a scalar) at columns offs_n."""
    s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return s, _zeros(qz_ptr, g, offs_n, n_mask, stride_qz, BITS)


@triton.jit
def _word_sz(s_ptr, qz_ptr, gidx_ptr, k0, offs_w, w_hi, offs_n, n_mask, G, stride_s, stride_qz,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
             HAS_GIDX: tl.constexpr, TWO: tl.constexpr):
    """Scale (fp32) and zero per (word row, column), [len(offs_w), BLOCK_N], where every word's
    rows lie in one group (the fp16x2 paths). TWO: the tile holds two groups, their boundary between
    words (selected per row from two loads). Act-order rows padded at load: the same selection where
    the tile's words hold at most two groups (their g_idx; sorted rows, so nearly every tile), else
    gathered per word; other weights: gathered per word (its rows' group)."""
    P: tl.constexpr = 32 // BITS
    if TWO:
        g0 = (k0 + GROUP_OFFSET) // GROUP_SIZE
        g1 = tl.minimum(g0 + 1, G - 1)
        in1 = (offs_w * P >= (g0 + 1) * GROUP_SIZE - GROUP_OFFSET)[:, None]
        z = tl.where(in1, _zeros(qz_ptr, g1, offs_n, n_mask, stride_qz, BITS)[None, :],
                     _zeros(qz_ptr, g0, offs_n, n_mask, stride_qz, BITS)[None, :])
        s0 = tl.load(s_ptr + g0 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + g1 * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        s = tl.where(in1, s1[None, :], s0[None, :])
    else:
        w_ok = offs_w < w_hi
        m2 = w_ok[:, None] & n_mask[None, :]
        if HAS_GIDX:
            g_w = tl.load(gidx_ptr + offs_w * P, mask=w_ok, other=0)
            # rows sorted by group: the tile's first and last words hold its lowest and highest
            # group (two scalar loads, no reductions across the program's threads)
            w_first = k0 // P
            g0 = tl.load(gidx_ptr + w_first * P)
            g1 = tl.load(gidx_ptr + (tl.minimum(w_first + offs_w.shape[0], w_hi) - 1) * P)
            if g1 - g0 <= 1:  # a tile mostly holds one group or two
                in1 = (g_w > g0)[:, None]
                z = tl.where(in1, _zeros(qz_ptr, g1, offs_n, n_mask, stride_qz, BITS)[None, :],
                             _zeros(qz_ptr, g0, offs_n, n_mask, stride_qz, BITS)[None, :])
                s0 = tl.load(s_ptr + g0 * stride_s + offs_n, mask=n_mask, other=0.0)
                s1 = tl.load(s_ptr + g1 * stride_s + offs_n, mask=n_mask, other=0.0)
                s = tl.where(in1, s1.to(tl.float32)[None, :], s0.to(tl.float32)[None, :])
            else:
                z = _zeros(qz_ptr, g_w[:, None], offs_n[None, :], m2, stride_qz, BITS)
                s = tl.load(s_ptr + g_w[:, None] * stride_s + offs_n[None, :], mask=m2,
                            other=0.0).to(tl.float32)
        else:
            g_w = ((offs_w * P + GROUP_OFFSET) // GROUP_SIZE)[:, None]
            z = _zeros(qz_ptr, g_w, offs_n[None, :], m2, stride_qz, BITS)
            s = tl.load(s_ptr + g_w * stride_s + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _rows_sz(s_ptr, qz_ptr, gidx_ptr, rows, r_mask, offs_n, n_mask, stride_s, stride_qz,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_OFFSET: tl.constexpr,
             HAS_GIDX: tl.constexpr):
    """Scale (fp32) and zero per (row, column): [len(rows), BLOCK_N] each."""
    if HAS_GIDX:
        g = tl.load(gidx_ptr + rows, mask=r_mask, other=0)
    else:
        g = (rows + GROUP_OFFSET) // GROUP_SIZE
    m2 = r_mask[:, None] & n_mask[None, :]
    s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2, other=0.0)
    return s.to(tl.float32), _zeros(qz_ptr, g[:, None], offs_n[None, :], m2, stride_qz, BITS)


@triton.jit
def _load_rows(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """x[rows] (x[perm[rows]] for act-order) in x's dtype; rows past K read 0 (EVEN_K: there are
    none, and the unmasked loads save an instruction or three per x value). An int64 x is a
    fixed-point gate/up sum [gate | up] (one row, M = 1 GEMV): silu(gate) * up, fp16."""
    if x_ptr.dtype.element_ty == tl.int64:  # (else-branches: int64 loads would not type-check)
        if HAS_PERM:
            rows = tl.load(perm_ptr + rows, mask=rows < K, other=0)
        return gated(x_ptr, rows, K)
    elif EVEN_K:
        if HAS_PERM:
            rows = tl.load(perm_ptr + rows)
        return tl.load(x_ptr + rows * stride_xk)
    else:
        mask = rows < K
        if HAS_PERM:
            rows = tl.load(perm_ptr + rows, mask=mask, other=0)
        return tl.load(x_ptr + rows * stride_xk, mask=mask, other=0.0)


@triton.jit
def _load_x(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    return _load_rows(x_ptr, perm_ptr, rows, K, stride_xk, HAS_PERM, EVEN_K).to(tl.float32)


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
def _finish(y, out_ptr, offs_out, ws_ptr, offs_ws, mask, cnt_ptr, tile, pid_k, ws_stride,
            SPLIT_K: tl.constexpr):
    """Store y; with split-K, store it into this split's workspace slice, and the last of the
    SPLIT_K programs (a per-tile ticket) sums the slices in split order and stores the sum: the
    same bits whatever order the programs ran in. An int64 output is a fixed-point sum
    (`fixed_sum.py`): each program adds y into it, no ticket."""
    if out_ptr.dtype.element_ty == tl.int64:
        y = tl.where(y == y, tl.minimum(tl.maximum(y, -FIXED_MAX), FIXED_MAX), FIXED_MAX)
        tl.atomic_add(out_ptr + offs_out, (y * FIXED_ONE).to(tl.int64), mask=mask, sem="relaxed")
    elif SPLIT_K == 1:
        tl.store(out_ptr + offs_out, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * ws_stride + offs_ws, y, mask=mask)  # global stores reach L2
        tl.debug_barrier()  # every thread's stores are issued before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            zero = tl.zeros_like(y)
            total = zero
            for k in tl.static_range(SPLIT_K):  # in split order; loads issued together, at L2
                total += tl.load(ws_ptr + k * ws_stride + offs_ws, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + offs_out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile, 0)


def mode_of(block_k: int, gs: int, off: int, has_gidx: bool) -> int:
    """0 = ONE, 1 = TWO, 2 = g_idx or ROW (see the module docstring)."""
    if has_gidx:
        return 2
    if gs % block_k == 0 and off % block_k == 0:
        return 0
    return 1 if block_k <= gs else 2
