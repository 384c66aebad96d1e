"""The GPTQ shard the kernels read, and its torch reference: y = x @ W with W dequantized in full.

One rank's slice of a linear layer with K local input rows and N local output columns:

    qweight  int32 [ceil(K*bits/32), N]  packed along K: row k at bit k*bits of its column's stream
    qzeros   int32 [G, ceil(N*bits/32)]  packed along N, true (v2) zeros
    scales   [G, N]
    g_idx    int32 [K] or None           local group of each row (act-order), else row k is in
                                         group (k + group_offset) // group_size

A sorted act-order shard (the loader's `prepare_act_order`) may hold more rows than x has columns:
each group's run of rows is padded to whole words (`word_groups`), padding rows holding q = z (so
they add exactly 0) and reading x through the permutation like every other row; `x_features` is
then x's width.

At 2, 4 and 8 bits a field never straddles a word (word k // P, bits (k % P) * bits, P = 32 / bits);
at 3 bits it may, which `unpack` reads through a 64-bit window. The loader (tpserve/model) builds
this; the kernels only read it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch


def unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Fields 0..count-1 of the bit stream packed along dim 0 of int32 words -> int32 [count, ...]."""
    if 32 % bits == 0:  # 2, 4, 8 bits: word i holds fields i*P .. i*P+P-1, one shift per field slot
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        fields = (words.unsqueeze(1) >> shifts.view(1, -1, *[1] * (words.dim() - 1))) & ((1 << bits) - 1)
        return fields.reshape(-1, *words.shape[1:])[:count]
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(1, *words.shape[1:])])
    pos = torch.arange(count, device=words.device) * bits
    pair = w[pos // 32] | (w[pos // 32 + 1] << 32)  # a field starting in word i ends by word i + 1
    shift = (pos % 32).view(-1, *[1] * (words.dim() - 1))
    return ((pair >> shift) & ((1 << bits) - 1)).to(torch.int32)


@dataclass
class GPTQWeight:
    """Packed GPTQ shard of a [K, N] weight (K local input rows, N local output columns)."""

    qweight: torch.Tensor  # int32 [ceil(K*bits/32), N], local row 0 at bit 0
    qzeros: torch.Tensor  # int32 [G, ceil(N*bits/32)], true (v2) zeros
    scales: torch.Tensor  # [G, N]
    g_idx: torch.Tensor | None  # int32 [K] local group of each row (act-order), else None
    group_offset: int  # k0 % group_size; local row j is in group (j + group_offset) // gs
    bits: int
    group_size: int  # already resolved: never -1
    in_features: int  # rows of the packed weight
    out_features: int
    x_features: int | None = None  # x's width when it differs from in_features (padded rows)
    word_groups: bool = False  # every word's rows lie in one group (g_idx shards padded at load)
    # the shard in torch's int4 CPU kernel layout, made on its first CPU call (`gptq_cpu.py`)
    cpu_pack: object = field(default=None, repr=False, compare=False)
    # dequantized copies by x dtype, made on a first fp32/fp16 CPU call within a budget (gptq_cpu)
    cpu_dense: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def groups(self) -> torch.Tensor:
        """Local group index of every local row [K]."""
        if self.g_idx is not None:
            return self.g_idx
        j = torch.arange(self.in_features, device=self.qweight.device)
        return (j + self.group_offset) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as [K, N] = (q - z[g]) * s[g]: the torch reference every kernel is checked against."""
        q = unpack(self.qweight, self.bits, self.in_features)
        z = unpack(self.qzeros.T, self.bits, self.out_features).T
        g = self.groups().long()
        return (q - z[g]).to(dtype) * self.scales[g].to(dtype)

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.qzeros, self.scales] + ([self.g_idx] if self.g_idx is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def shape_key(w: GPTQWeight) -> tuple:
    """What a kernel's speed depends on in a shard (for choosing between kernels)."""
    return (w.x_features or w.in_features, w.out_features, w.bits, w.group_size,
            w.group_offset, w.g_idx is not None, str(w.qweight.device))


def gptq_matmul_reference(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor:
    """x [M, K] @ W -> [M, N] in x.dtype (x already permuted for a sorted act-order shard)."""
    return x @ w.dequantize(x.dtype)


def whole_groups(w: GPTQWeight) -> tuple[int, int]:
    """(groups the shard's rows touch, rows after its last row up to that group's end): with
    `group_offset` rows in front, the padding that makes every group whole."""
    groups = -(-(w.in_features + w.group_offset) // w.group_size)
    return groups, groups * w.group_size - w.group_offset - w.in_features


def gptq_matmul_cpu(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor:
    """The reference's product without its per-row gathers of zeros and scales: rows padded to whole
    groups (group_offset in front, the last group's tail behind) so that (q - z) * s broadcasts per
    group; three passes over [K, N] instead of six. The path for CPU ranks, tested against
    `gptq_matmul_reference`. Unsorted act-order rows (g_idx) take the reference."""
    if w.g_idx is not None:
        return gptq_matmul_reference(x, w)
    k, n, gs, off = w.in_features, w.out_features, w.group_size, w.group_offset
    groups, tail = whole_groups(w)
    q = unpack(w.qweight, w.bits, k)
    z = unpack(w.qzeros.T, w.bits, n).T[:groups]
    if off or tail:
        q = torch.nn.functional.pad(q, (0, 0, off, tail))
        x = torch.nn.functional.pad(x, (off, tail))
    wq = (q.view(groups, gs, n) - z[:, None]).to(x.dtype) * w.scales[:groups, None].to(x.dtype)
    return x @ wq.view(groups * gs, n)


def random_weight(k: int, n: int, bits: int, group_size: int, group_offset: int = 0,
                  g_idx: torch.Tensor | None = None, device="cpu",
                  generator: torch.Generator | None = None) -> GPTQWeight:
    """A shard of random words and scales (the kernels' self-checks and timing; any words are valid).

    Scales are ~1/(8 sqrt(K)) so that y stays O(1) for unit x, whatever K.
    """
    groups = int(g_idx.max()) + 1 if g_idx is not None else math.ceil((k + group_offset) / group_size)

    def words(*shape):
        return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32, generator=generator)
    scales = (torch.rand(groups, n, generator=generator) + 0.5) / (8 * k ** 0.5)
    return GPTQWeight(qweight=words(math.ceil(k * bits / 32), n).to(device),
                      qzeros=words(groups, math.ceil(n * bits / 32)).to(device),
                      scales=scales.half().to(device), g_idx=g_idx, group_offset=group_offset,
                      bits=bits, group_size=group_size, in_features=k, out_features=n)


# (bits, K, N, group size, group offset, act-order) of the kernels' self-checks (`python -m`).
SELF_CHECK_SHAPES = [(4, 200, 72, 64, 0, False), (4, 200, 72, 64, 32, False),
                     (8, 136, 40, 32, 16, False), (4, 256, 64, 64, 0, True),
                     (8, 256, 64, 32, 0, True), (4, 512, 96, 128, 0, False)]


def self_check(run, ms):
    """Print run(x, w, perm)'s error against the torch reference on SELF_CHECK_SHAPES."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    print(f"device {dev}{' (TRITON_INTERPRET=1)' if os.environ.get('TRITON_INTERPRET') == '1' else ''}, float16 x")
    print(f"{'bits':>4} {'K':>5} {'N':>5} {'gs':>4} {'off':>4} {'act':>4} {'M':>3} {'max|err|':>9} "
          f"{'max|y|':>8}")
    for bits, k, n, gs, off, act in SELF_CHECK_SHAPES:
        # act-order, as the loader leaves it: rows sorted by group, x gathered through perm
        perm = torch.randperm(k, generator=gen).to(dev) if act else None
        g_idx = (torch.arange(k) // gs).to(torch.int32).to(dev) if act else None
        w = random_weight(k, n, bits, gs, off, g_idx, dev, gen)
        w.word_groups = act and gs % (32 // bits) == 0  # sorted groups of whole words
        for m in ms:
            x = torch.randn(m, k, generator=gen).half().to(dev)
            ref = gptq_matmul_reference((x if perm is None else x[:, perm]).float(), w)
            err = (run(x, w, perm).float() - ref).abs().max().item()
            print(f"{bits:>4} {k:>5} {n:>5} {gs:>4} {off:>4} {str(act):>4} {m:>3} {err:>9.2e} "
                  f"{ref.abs().max().item():>8.2f}")
