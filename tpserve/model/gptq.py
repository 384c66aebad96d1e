"""The GPTQ tensor format: bit packing, zero conventions and the torch dequantization reference.

A linear layer with input size K, output size N, group size gs and G = ceil(K / gs) groups:

    qweight  int32 [ceil(K*bits/32), N]   packed along K
    qzeros   int32 [G, ceil(N*bits/32)]   packed along N
    scales   fp16  [G, N]
    g_idx    int32 [K]                    group of each input row (act-order permutes it)

Packing is one little-endian bit stream per column (qweight) or per row (qzeros): value i sits at
bit i*bits. For 2/4/8 bits that is `bits`-wide fields inside each word; 3-bit values (32 per three
words) can straddle two words, which the same arithmetic handles.

Zeros: `gptq` (v1) stores zero - 1, `gptq_v2` stores the zero. At 2/4/8 bits GPTQModel writes v1
zeros with a word-level subtraction of the packed "all ones" constant, so a true zero of 0 (only
asymmetric quantization produces one) borrows from its neighbour field. tpserve reads v1 with the
inverse, a word-level addition of the same constant, which restores every field exactly, borrows
included. 3-bit fields straddle words, so there the shift is per field, mod 8, both ways (as
GPTQModel does). A writer that instead clamps each field at 0 (AutoRound) loses that zero: it
reads back as 1, which is what the file says.
"""

from __future__ import annotations

import math

import torch

_WORD = 0xFFFFFFFF


def packed_len(count: int, bits: int) -> int:
    """Number of int32 words holding `count` values of `bits` bits."""
    return math.ceil(count * bits / 32)


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    words64 = words64 & _WORD
    return torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ints [K, N] (0 <= v < 2**bits) along dim 0 into int32 [ceil(K*bits/32), N]."""
    k = values.shape[0]
    v = values.to(torch.int64) & ((1 << bits) - 1)
    pos = torch.arange(k, device=values.device) * bits
    word, shift = pos // 32, (pos % 32)[:, None]
    out = torch.zeros((packed_len(k, bits) + 1, *values.shape[1:]), dtype=torch.int64,
                      device=values.device)
    # Fields never overlap, so adding is OR-ing; the second add carries a straddling field's
    # high bits into the next word (it adds 0 for fields that fit).
    out.index_add_(0, word, v << shift)
    out.index_add_(0, word + 1, v >> (32 - shift))
    return _to_int32(out[:-1])


def unpack_rows(words: torch.Tensor, bits: int, count: int, bit_offset: int = 0) -> torch.Tensor:
    """Unpack `count` values along dim 0, starting `bit_offset` bits into the first word."""
    w = words.to(torch.int64) & _WORD
    w = torch.cat([w, torch.zeros_like(w[:1])])  # so that word + 1 is always valid
    pos = bit_offset + torch.arange(count, device=words.device) * bits
    word, shift = pos // 32, (pos % 32)[:, None]
    # shift == 0 moves the neighbour word 32 bits up, out of the mask: no special case needed.
    v = (w[word] >> shift) | (w[word + 1] << (32 - shift))
    return (v & ((1 << bits) - 1)).to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ints [G, N] along dim 1 into int32 [G, ceil(N*bits/32)] (the qzeros layout)."""
    return pack_rows(values.T, bits).T.contiguous()


def unpack_cols(words: torch.Tensor, bits: int, count: int, bit_offset: int = 0) -> torch.Tensor:
    return unpack_rows(words.T, bits, count, bit_offset).T.contiguous()


def v1_zero_constant(n: int, bits: int) -> torch.Tensor:
    """The packed words of `n` ones: what v1 subtracts from, and v1 -> v2 adds to, packed zeros."""
    return pack_cols(torch.ones(1, n, dtype=torch.int32), bits)[0]


def v1_to_v2_zeros(qzeros: torch.Tensor, bits: int, word_start: int = 0) -> torch.Tensor:
    """+1 on every field of packed v1 zeros (see the module docstring); 2, 4 and 8 bits.

    `word_start` is the index of qzeros' first word in the full row (the constant is the same for
    every word at these widths, so any slice of words converts alike).
    """
    assert bits != 3, "3-bit v1 zeros are shifted per field after unpacking (unpack_zeros)"
    total = word_start + qzeros.shape[1]
    const = v1_zero_constant(math.ceil(total * 32 / bits), bits)[word_start:total]
    const = const.to(qzeros.device, torch.int64) & _WORD
    return _to_int32((qzeros.to(torch.int64) & _WORD) + const)


def v2_to_v1_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of the v1 reading (used to write v1 checkpoints): -1 on every packed field."""
    if bits == 3:  # fields straddle words: shift each field, as GPTQModel does
        n = qzeros.shape[1] * 32 // 3
        return pack_cols((unpack_cols(qzeros, 3, n) - 1) & 7, 3)
    const = v1_zero_constant(math.ceil(qzeros.shape[1] * 32 / bits), bits)[: qzeros.shape[1]]
    const = const.to(qzeros.device, torch.int64) & _WORD
    return _to_int32((qzeros.to(torch.int64) & _WORD) - const)


def unpack_zeros(words: torch.Tensor, bits: int, count: int, bit_offset: int = 0,
                 v1: bool = False, word_start: int = 0) -> torch.Tensor:
    """True zeros [G, count] from packed qzeros words (a column slice starting at `word_start`).

    v1 at 2/4/8 bits: word-level +1 before unpacking (restores GPTQModel's borrows exactly).
    v1 at 3 bits: per-field +1 mod 8 after unpacking, since a word-level add would lose the carry
    of the fields that straddle two words (GPTQModel shifts 3-bit zeros per field too).
    """
    if v1 and bits != 3:
        words = v1_to_v2_zeros(words, bits, word_start)
    zeros = unpack_cols(words, bits, count, bit_offset)
    return (zeros + 1) & 7 if v1 and bits == 3 else zeros


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               groups: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: W[k, n] = (q[k, n] - zeros[g[k], n]) * scales[g[k], n].

    q [K, N] and zeros [G, N] are unpacked ints, scales [G, N], groups [K] index into G.
    Returns W as [K, N] (input-major, as GPTQ stores it; nn.Linear's weight is W.T).
    """
    g = groups.long()
    return ((q.to(torch.int32) - zeros[g].to(torch.int32)).to(dtype) * scales[g].to(dtype))


def quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = True):
    """Round-to-nearest GPTQ-layout quantization of W [K, N] (for tests and demo checkpoints).

    Returns (q [K, N], zeros [G, N], scales fp16 [G, N]) as unpacked ints with true (v2) zeros.
    """
    k, n = w.shape
    gs = k if group_size == -1 else group_size
    g = math.ceil(k / gs)
    pad = g * gs - k
    wg = torch.cat([w.float(), w.new_zeros(pad, n).float()]).view(g, gs, n)
    maxq = (1 << bits) - 1
    if sym:
        amax = wg.abs().amax(dim=1).clamp(min=1e-8)
        scales = 2 * amax / maxq
        zeros = torch.full((g, n), (maxq + 1) // 2, dtype=torch.int32, device=w.device)
    else:
        lo, hi = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)
        scales = ((hi - lo) / maxq).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, maxq).to(torch.int32)
    scales = scales.half()
    sf = scales.float()[:, None, :]
    q = torch.round(wg / sf + zeros[:, None, :]).clamp(0, maxq).to(torch.int32)
    return q.view(g * gs, n)[:k], zeros, scales
