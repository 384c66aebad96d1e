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
def _x_pairs(x_ptr, perm_ptr, offs_w, K, stride_xk, BITS: tl.constexpr, HAS_PERM: tl.constexpr,
             EVEN_K: tl.constexpr):
    """One row of x as the pairs (x[k + j], x[k + j + P/2]) of each word row k = P * offs_w, as
    int32 bits [KW, 1]: four pairs at 4 bits, two at 8 (the last two repeat the first two)."""
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
    return x0, x1, x2, x3


@triton.jit
def _h2_dot(qw, offs_w, x_ptr, perm_ptr, z, K, stride_xk, BITS: tl.constexpr,
            HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """sum over each word's P rows of (q - z) / 2**BITS * x, as fp32 [KW, BLOCK_N]; z [.., BLOCK_N]
    (per column, or per word row and column for a tile of two groups)."""
    x0, x1, x2, x3 = _x_pairs(x_ptr, perm_ptr, offs_w, K, stride_xk, BITS, HAS_PERM, EVEN_K)
    return _h2_word(qw, x0, x1, x2, x3, z, BITS)


def _dequant_lines(bits: int, w: int, nz: int) -> list[str]:
    """_ASM4's / _ASM8's dequantization of word $w into the fp16x2 pairs t0..t3 (t0, t1 at 8
    bits), (q - z) / 2**bits exactly, with the negated zero pair(s) at $nz (and $nz+1 at 4 bits)."""
    if bits == 4:
        return [f"lop3.b32 t0, ${w}, 0x000f000f, 0x64006400, 0xea;",
                f"lop3.b32 t1, ${w}, 0x00f000f0, 0x64006400, 0xea;",
                "lop3.b32 t2, q, 0x000f000f, 0x64006400, 0xea;",
                "lop3.b32 t3, q, 0x00f000f0, 0x64006400, 0xea;",
                f"fma.rn.f16x2 t0, t0, c16, ${nz};", f"fma.rn.f16x2 t1, t1, c256, ${nz + 1};",
                f"fma.rn.f16x2 t2, t2, c16, ${nz};", f"fma.rn.f16x2 t3, t3, c256, ${nz + 1};"]
    return [f"lop3.b32 t0, ${w}, 0x00ff00ff, 0x64006400, 0xea;",
            "lop3.b32 t1, q, 0x00ff00ff, 0x64006400, 0xea;",
            f"fma.rn.f16x2 t0, t0, c256, ${nz};", f"fma.rn.f16x2 t1, t1, c256, ${nz};"]


def _rows_asm(bits: int, rows: int) -> str:
    """The word's dot product with `rows` rows of x: the word's fields dequantized once (as in
    _ASM4 / _ASM8), then P/2 fp16x2 FMAs and one fp32 sum per row. Operands: $0 .. $rows-1 the
    rows' sums (fp32 bits), $rows the word, then each row's x pairs (P/2 per row), then the
    negated zero pair(s). The sums go to their outputs last: an output may share a register with
    an input of a later row."""
    pairs, w = 32 // bits // 2, rows
    fs = ", ".join(f"s{m}" for m in range(rows))
    lines = ["{", ".reg .b32 q, t0, t1, t2, t3, a, c16, c256;", ".reg .b16 l, h;",
             f".reg .f32 fl, fh, {fs};", "mov.b32 c16, 0x2C002C00;", "mov.b32 c256, 0x1C001C00;",
             f"shr.u32 q, ${w}, 8;", *_dequant_lines(bits, w, rows + 1 + pairs * rows)]
    for m in range(rows):
        x = [f"${rows + 1 + pairs * m + j}" for j in range(pairs)]
        lines.append(f"mul.rn.f16x2 a, t0, {x[0]};")
        lines += [f"fma.rn.f16x2 a, t{j}, {x[j]}, a;" for j in range(1, pairs)]
        lines += ["mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;",
                  f"add.f32 s{m}, fl, fh;"]
    return "\n".join(lines + [f"mov.b32 ${m}, s{m};" for m in range(rows)] + ["}"])


_ASM4_R2 = tl.constexpr(_rows_asm(4, 2))
_ASM4_R4 = tl.constexpr(_rows_asm(4, 4))
_ASM8_R2 = tl.constexpr(_rows_asm(8, 2))
_ASM8_R4 = tl.constexpr(_rows_asm(8, 4))
_C2_4 = tl.constexpr("=r,=r," + ",".join(["r"] * 11))  # 2 sums; word, 2 x 4 pairs, 2 zeros
_C4_4 = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 19))  # 4 sums; word, 4 x 4 pairs, 2 zeros
_C2_8 = tl.constexpr("=r,=r," + ",".join(["r"] * 6))  # 2 sums; word, 2 x 2 pairs, 1 zero
_C4_8 = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 10))  # 4 sums; word, 4 x 2 pairs, 1 zero


@triton.jit
def _as_f32(t):
    return t.to(tl.float32, bitcast=True)


@triton.jit
def _h2_word2(qw, a0, a1, a2, a3, b0, b1, b2, b3, z, BITS: tl.constexpr):
    """`_h2_word` for two rows of x (pairs a*, b*), the word dequantized once -> two fp32 sums."""
    if INTERPRET:
        return _h2_word(qw, a0, a1, a2, a3, z, BITS), _h2_word(qw, b0, b1, b2, b3, z, BITS)
    if BITS == 4:
        ya, yb = tl.inline_asm_elementwise(
            _ASM4_R2, _C2_4, [qw, a0, a1, a2, a3, b0, b1, b2, b3, _nz(z, 16, BITS),
                              _nz(z, 256, BITS)], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        ya, yb = tl.inline_asm_elementwise(
            _ASM8_R2, _C2_8, [qw, a0, a1, b0, b1, _nz(z, 256, BITS)], dtype=(tl.int32, tl.int32),
            is_pure=True, pack=1)
    return _as_f32(ya), _as_f32(yb)


@triton.jit
def _h2_word4(qw, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3, z,
              BITS: tl.constexpr):
    """`_h2_word` for four rows of x (pairs a*, b*, c*, d*), the word dequantized once -> four
    fp32 sums."""
    if INTERPRET:
        return (_h2_word(qw, a0, a1, a2, a3, z, BITS), _h2_word(qw, b0, b1, b2, b3, z, BITS),
                _h2_word(qw, c0, c1, c2, c3, z, BITS), _h2_word(qw, d0, d1, d2, d3, z, BITS))
    if BITS == 4:
        ya, yb, yc, yd = tl.inline_asm_elementwise(
            _ASM4_R4, _C4_4, [qw, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3,
                              _nz(z, 16, BITS), _nz(z, 256, BITS)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        ya, yb, yc, yd = tl.inline_asm_elementwise(
            _ASM8_R4, _C4_8, [qw, a0, a1, b0, b1, c0, c1, d0, d1, _nz(z, 256, BITS)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return _as_f32(ya), _as_f32(yb), _as_f32(yc), _as_f32(yd)


# A 4-bit word's eight fields dequantized to fp16 for a tensor-core dot: the lop3 + HFMA2 of
# _ASM4 give (q - z) / 16 exactly per pair of fields, one HMUL2 by 16 s rounds (q - z) s once (as
# fp32 (q - z) s rounded to fp16 does). $0-$7: fields 0-7 (fp16); $8 the word; $9, $10 the negated
# zero pairs (low fields, fields 4 bits up); $11 the pair (16 s, 16 s).
_DEQ4 = tl.constexpr("\n".join([
    "{", ".reg .b32 q, t0, t1, t2, t3, c16, c256;", "mov.b32 c16, 0x2C002C00;",
    "mov.b32 c256, 0x1C001C00;", "shr.u32 q, $8, 8;", *_dequant_lines(4, 8, 9),
    *[f"mul.rn.f16x2 t{j}, t{j}, $11;" for j in range(4)],
    *[f"mov.b32 {{${j}, ${j + 4}}}, t{j};" for j in range(4)], "}"]))


@triton.jit
def _h2_tile(qw, z, s):
    """A tile of 4-bit words [KW, BLOCK_N] (one group: z, s fp32 [1, BLOCK_N]) as the fp16
    weights (q - z) s [8 KW, BLOCK_N], row 8 w + f being field f of word row w: eight fields per
    word from one asm (~13 instructions per word where shifts, masks and fp32 arithmetic per
    field take ~48), joined and laid out for the dot."""
    KW: tl.constexpr = qw.shape[0]
    BLOCK_N: tl.constexpr = qw.shape[1]
    if INTERPRET:  # the same numbers: (q - z) s is exact in fp32, rounded once to fp16
        f0 = ((((qw >> 0) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f1 = ((((qw >> 4) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f2 = ((((qw >> 8) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f3 = ((((qw >> 12) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f4 = ((((qw >> 16) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f5 = ((((qw >> 20) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f6 = ((((qw >> 24) & 15).to(tl.float32) - z) * s).to(tl.float16)
        f7 = ((((qw >> 28) & 15).to(tl.float32) - z) * s).to(tl.float16)
    else:
        s16 = (s * 16.0).to(tl.float16)
        f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
            _DEQ4, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r",
            [qw, _nz(z, 16, 4), _nz(z, 256, 4), _pair(s16, s16)], dtype=(tl.float16,) * 8,
            is_pure=True, pack=1)
    # join's new axis is the last: the innermost join pairs fields 4 apart, the outermost 1
    # apart, so that the flattened last axis runs over fields 0..7 in order
    f = tl.join(tl.join(tl.join(f0, f4), tl.join(f2, f6)), tl.join(tl.join(f1, f5), tl.join(f3, f7)))
    f = tl.permute(tl.reshape(f, (KW, BLOCK_N, 8)), (0, 2, 1))
    return tl.reshape(f, (KW * 8, BLOCK_N))
