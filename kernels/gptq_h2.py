"""The dot product of one qweight word with x in fp16x2 arithmetic (the H2 path of the GEMV).

Marlin's magic-number dequantization, on fp16 x. One AND-OR (lop3) puts two fields of a word, the same
column's rows k and k + P/2, into the mantissas of two fp16 halves of 1024 (0x6400): bits
(1024 + q) or, for a field 4 bits up, (1024 + 16 q). One fp16x2 FMA turns each pair into
(q - z) / 2**bits exactly (scaled so that |q - z| / 2**bits < 1 and the fp16 sums below cannot
overflow before |x| > 16384), and P / 2 fp16x2 FMAs take the word's dot product with x, paired on
the fly as (x[k], x[k + P/2]). Per 8 4-bit weights: 1 shift, 4 lop3, 4 + 4 HFMA2, then 2 converts
and 2 fp32 ops for the word's sum; the scale (times 2**bits) is one FFMA per word (the fp32 design
needs ~3 instructions per weight plus its x handling). The word's sum is rounded to fp16 once per
op (8 products), ~2**-11 relative, like an fp16 matmul's inputs. No re-layout of qweight is needed:
the pairing is done on x, once per row of words, shared by the columns a thread holds.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gptq_common import INTERPRET, _load_rows

# The word's dot product in fp16x2 (see the module docstring). $0: fp32 bits of the sum;
# $1: the word; then the x pairs (x[k + j], x[k + j + P/2]) for j < P/2; then the negated zeros
# -(1024 / MUL + z / 2**bits) as fp16 pairs (4-bit: one for the low fields, MUL 16, one for the
# fields 4 bits up, MUL 256). lop3 0xEA = (a & b) | c. 0x2C00 = 1/16, 0x1C00 = 1/256 in fp16.
_SUM = """mov.b32 {l, h}, a;
cvt.f32.f16 fl, l;
cvt.f32.f16 fh, h;
add.f32 fs, fl, fh;
mov.b32 $0, fs;
}"""  # the fp16x2 sum a, as fp32 bits
_ASM4 = tl.constexpr("""{
.reg .b32 q, t0, t1, t2, t3, a, c16, c256;
.reg .b16 l, h;
.reg .f32 fl, fh, fs;
mov.b32 c16, 0x2C002C00;
mov.b32 c256, 0x1C001C00;
shr.u32 q, $1, 8;
lop3.b32 t0, $1, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t1, $1, 0x00f000f0, 0x64006400, 0xea;
lop3.b32 t2, q, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t3, q, 0x00f000f0, 0x64006400, 0xea;
fma.rn.f16x2 t0, t0, c16, $6;
fma.rn.f16x2 t1, t1, c256, $7;
fma.rn.f16x2 t2, t2, c16, $6;
fma.rn.f16x2 t3, t3, c256, $7;
mul.rn.f16x2 a, t0, $2;
fma.rn.f16x2 a, t1, $3, a;
fma.rn.f16x2 a, t2, $4, a;
fma.rn.f16x2 a, t3, $5, a;
""" + _SUM)
_ASM8 = tl.constexpr("""{
.reg .b32 q, t0, t1, a, c256;
.reg .b16 l, h;
.reg .f32 fl, fh, fs;
mov.b32 c256, 0x1C001C00;
shr.u32 q, $1, 8;
lop3.b32 t0, $1, 0x00ff00ff, 0x64006400, 0xea;
lop3.b32 t1, q, 0x00ff00ff, 0x64006400, 0xea;
fma.rn.f16x2 t0, t0, c256, $4;
fma.rn.f16x2 t1, t1, c256, $4;
mul.rn.f16x2 a, t0, $2;
fma.rn.f16x2 a, t1, $3, a;
""" + _SUM)


@triton.jit
def _pair(lo, hi):
    """Two fp16 tensors as the int32 bits of fp16x2 pairs (lo in the low half)."""
    lo16 = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _half(p, HI: tl.constexpr):
    """One fp16 half of int32 pairs, as fp32 (the interpreter's stand-in for the asm)."""
    if HI:
        p = p >> 16
    return (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _emu_pair(qw, xp, nz, BIT: tl.constexpr, FS: tl.constexpr, MUL: tl.constexpr,
              BITS: tl.constexpr):
    """What one lop3 + HFMA2 + HFMA2 of the asm computes, in fp32: fields at bits BIT and BIT + 16,
    lane value (1024 + q * 2**FS) / MUL + nz, times the x pair."""
    mask: tl.constexpr = (1 << BITS) - 1
    lo = (1024.0 + ((qw >> BIT) & mask).to(tl.float32) * (1 << FS)) / MUL + _half(nz, False)
    hi = (1024.0 + ((qw >> (BIT + 16)) & mask).to(tl.float32) * (1 << FS)) / MUL + _half(nz, True)
    return lo * _half(xp, False) + hi * _half(xp, True)


@triton.jit
def _nz(z, MUL: tl.constexpr, BITS: tl.constexpr):
    """The asm's negated zero pair -(1024 / MUL + z / 2**BITS) (exact in fp16)."""
    h = (-(1024.0 / MUL) - z * (1.0 / (1 << BITS))).to(tl.float16)
    return _pair(h, h)


@triton.jit
def _h2_word(qw, x0, x1, x2, x3, z, BITS: tl.constexpr):
    """sum over one word's P rows of (q - z) / 2**BITS * x, as fp32 (broadcast over qw, the x
    pairs (x[k + j], x[k + j + P/2]) as int32 bits, and z); x2, x3 unused at 8 bits."""
    if BITS == 4:
        nz_lo, nz_hi = _nz(z, 16, BITS), _nz(z, 256, BITS)
        if INTERPRET:
            return (_emu_pair(qw, x0, nz_lo, 0, 0, 16, BITS) + _emu_pair(qw, x1, nz_hi, 4, 4, 256, BITS)
                    + _emu_pair(qw, x2, nz_lo, 8, 0, 16, BITS)
                    + _emu_pair(qw, x3, nz_hi, 12, 4, 256, BITS))
        return tl.inline_asm_elementwise(_ASM4, "=r,r,r,r,r,r,r,r", [qw, x0, x1, x2, x3, nz_lo, nz_hi],
                                         dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    else:
        nz = _nz(z, 256, BITS)
        if INTERPRET:
            return _emu_pair(qw, x0, nz, 0, 0, 256, BITS) + _emu_pair(qw, x1, nz, 8, 0, 256, BITS)
        return tl.inline_asm_elementwise(_ASM8, "=r,r,r,r,r", [qw, x0, x1, nz], dtype=tl.int32,
                                         is_pure=True, pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _h2_dot(qw, offs_w, x_ptr, perm_ptr, z, K, stride_xk, BITS: tl.constexpr,
            HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """sum over each word's P rows of (q - z) / 2**BITS * x, as fp32 [KW, BLOCK_N]; z [.., BLOCK_N]
    (per column, or per word row and column for a tile of two groups)."""
    P: tl.constexpr = 32 // BITS
    H: tl.constexpr = P // 2
    r = offs_w * P
    x0 = _pair(_load_rows(x_ptr, perm_ptr, r, K, stride_xk, HAS_PERM, EVEN_K),
               _load_rows(x_ptr, perm_ptr, r + H, K, stride_xk, HAS_PERM, EVEN_K))[:, None]
    x1 = _pair(_load_rows(x_ptr, perm_ptr, r + 1, K, stride_xk, HAS_PERM, EVEN_K),
               _load_rows(x_ptr, perm_ptr, r + 1 + H, K, stride_xk, HAS_PERM, EVEN_K))[:, None]
    x2, x3 = x0, x1
    if BITS == 4:
        x2 = _pair(_load_rows(x_ptr, perm_ptr, r + 2, K, stride_xk, HAS_PERM, EVEN_K),
                   _load_rows(x_ptr, perm_ptr, r + 6, K, stride_xk, HAS_PERM, EVEN_K))[:, None]
        x3 = _pair(_load_rows(x_ptr, perm_ptr, r + 3, K, stride_xk, HAS_PERM, EVEN_K),
                   _load_rows(x_ptr, perm_ptr, r + 7, K, stride_xk, HAS_PERM, EVEN_K))[:, None]
    return _h2_word(qw, x0, x1, x2, x3, z, BITS)


@triton.jit
def _x_rows(x_ptr, perm_ptr, offs_m, m_mask, rows, K, stride_xm, stride_xk,
            HAS_PERM: tl.constexpr):
    """x[offs_m, rows] (columns through perm) as [BLOCK_M, len(rows)] fp16; 0 past M and K."""
    r_mask = rows < K
    if HAS_PERM:
        rows = tl.load(perm_ptr + rows, mask=r_mask, other=0)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :] * stride_xk,
                   mask=m_mask[:, None] & r_mask[None, :], other=0.0)


@triton.jit
def _h2_dot_rows(qw, offs_w, x_ptr, perm_ptr, offs_m, m_mask, z, K, stride_xm, stride_xk,
                 BITS: tl.constexpr, HAS_PERM: tl.constexpr):
    """`_h2_dot` for BLOCK_M rows of x at once: fp32 [BLOCK_M, KW, BLOCK_N]."""
    P: tl.constexpr = 32 // BITS
    H: tl.constexpr = P // 2
    r = offs_w * P
    x0 = _pair(_x_rows(x_ptr, perm_ptr, offs_m, m_mask, r, K, stride_xm, stride_xk, HAS_PERM),
               _x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + H, K, stride_xm, stride_xk,
                       HAS_PERM))[:, :, None]
    x1 = _pair(_x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + 1, K, stride_xm, stride_xk, HAS_PERM),
               _x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + 1 + H, K, stride_xm, stride_xk,
                       HAS_PERM))[:, :, None]
    x2, x3 = x0, x1
    if BITS == 4:
        x2 = _pair(_x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + 2, K, stride_xm, stride_xk,
                           HAS_PERM),
                   _x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + 6, K, stride_xm, stride_xk,
                           HAS_PERM))[:, :, None]
        x3 = _pair(_x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + 3, K, stride_xm, stride_xk,
                           HAS_PERM),
                   _x_rows(x_ptr, perm_ptr, offs_m, m_mask, r + 7, K, stride_xm, stride_xk,
                           HAS_PERM))[:, :, None]
    return _h2_word(qw[None, :, :], x0, x1, x2, x3, z, BITS)
