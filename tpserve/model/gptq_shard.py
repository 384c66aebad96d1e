"""One rank's slice of a GPTQ linear layer, read with exact global-group offsets.

A row-parallel rank holding input rows [k0, k1) keeps the scales/zeros of groups
k0//gs .. (k1-1)//gs (a group straddling two ranks is kept by both), and its local row j belongs to
local group (j + k0 % gs) // gs: the *group offset* k0 % gs travels with the shard into the kernel.
With act-order, local g_idx = g_idx[k0:k1] (global ids, rebased to the first kept group).
Shards that do not start on a pack boundary are unpacked from the covering words and repacked from
local row 0. Only the covering words/groups/columns are read from disk.
"""

from __future__ import annotations

import logging
import os

import torch

from tpserve.kernels import GPTQWeight
from tpserve.model import gptq
from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import QuantConfig
from tpserve.errors import CheckpointError

log = logging.getLogger(__name__)
# Test hook: reproduce the bug of engines that assume a shard starts on a group boundary, so
# `tpserve verify` can be shown to catch it. Never set this in production.
BREAK_GROUP_OFFSET_ENV = "TPSERVE_DEBUG_FORCE_GROUP_OFFSET_ZERO"


def read_gptq_shard(ckpt: Checkpoint, prefix: str, quant: QuantConfig, in_features: int,
                    out_features: int, rows: tuple[int, int], cols: tuple[int, int],
                    scale_dtype: torch.dtype | None = None) -> GPTQWeight:
    """Read rows [k0, k1) x columns [n0, n1) of the GPTQ layer `prefix` from the checkpoint."""
    bits, gs = quant.bits, quant.group_size_for(in_features)
    (k0, k1), (n0, n1) = rows, cols
    n_groups = -(-in_features // gs)
    zero_words = gptq.packed_len(out_features, bits)
    shapes = {"qweight": (gptq.packed_len(in_features, bits), out_features),
              "qzeros": (n_groups, zero_words), "scales": (n_groups, out_features)}
    for name, shape in shapes.items():
        actual = ckpt.shape(f"{prefix}.{name}")
        if actual != shape:
            raise CheckpointError(
                f"tensor '{prefix}.{name}' has shape {list(actual)} but bits={bits}, "
                f"group_size={quant.group_size} and the layer's {in_features}x{out_features} "
                f"imply {list(shape)}; the checkpoint and its quantization config do not match")

    g_idx = None
    if f"{prefix}.g_idx" in ckpt:
        g_idx = ckpt.read(f"{prefix}.g_idx", rows=(k0, k1), shape=(in_features,)).long()
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= n_groups):
            raise CheckpointError(f"tensor '{prefix}.g_idx' holds group ids outside "
                                  f"[0, {n_groups}); the checkpoint is corrupt")
        # desc_act=False checkpoints still carry a trivial g_idx; use offset arithmetic for them.
        if torch.equal(g_idx, torch.arange(k0, k1, device=g_idx.device) // gs):
            g_idx = None
    if g_idx is None:
        g_first, g_last = k0 // gs, (k1 - 1) // gs
    else:
        g_first, g_last = int(g_idx.min()), int(g_idx.max())

    scales = ckpt.read(f"{prefix}.scales", rows=(g_first, g_last + 1), cols=(n0, n1))
    if not torch.isfinite(scales).all():
        raise CheckpointError(f"tensor '{prefix}.scales' holds NaN or inf values; the checkpoint "
                              f"is corrupt, re-quantize or re-download it")

    w0, w1 = n0 * bits // 32, gptq.packed_len(n1, bits)
    zwords = ckpt.read(f"{prefix}.qzeros", rows=(g_first, g_last + 1), cols=(w0, w1))
    zeros = gptq.unpack_zeros(zwords, bits, n1 - n0, bit_offset=n0 * bits - w0 * 32, v1=quant.v1,
                              word_start=w0)

    r0, r1 = k0 * bits // 32, gptq.packed_len(k1, bits)
    qwords = ckpt.read(f"{prefix}.qweight", rows=(r0, r1), cols=(n0, n1))
    if (k0 * bits) % 32 or ((k1 - k0) * bits) % 32:  # a slice starting or ending mid-word:
        # unpacked and repacked from local row 0 (whole words are already the shard's packing)
        qwords = gptq.pack_rows(gptq.unpack_rows(qwords, bits, k1 - k0,
                                                 bit_offset=k0 * bits - r0 * 32), bits)

    offset = k0 % gs if g_idx is None else 0
    if offset and os.environ.get(BREAK_GROUP_OFFSET_ENV) == "1":
        log.warning("%s=1: dropping the group offset %d of %s (deliberately wrong)",
                    BREAK_GROUP_OFFSET_ENV, offset, prefix)
        offset = 0
    return GPTQWeight(
        qweight=qwords.contiguous(), qzeros=gptq.pack_cols(zeros, bits),
        scales=(scales if scale_dtype is None else scales.to(scale_dtype)).contiguous(),
        g_idx=None if g_idx is None else (g_idx - g_first).to(torch.int32),
        group_offset=offset, bits=bits, group_size=gs,
        in_features=k1 - k0, out_features=n1 - n0)


def group_order(ckpt: Checkpoint, prefix: str, in_features: int) -> torch.Tensor | None:
    """The order of an act-order layer's input rows that sorts them by group (stable), or None
    where the layer has no g_idx or its rows are in group order already.

    An MLP's intermediate channels may be taken in any order, so long as gate/up's output columns
    and down's input rows follow the same one: taking them in down_proj's group order makes every
    rank's down shard a run of whole groups (GPTQ puts group_size rows in each group), read by the
    aligned kernels without a gather of x, where the checkpoint's order would leave each rank an
    arbitrary subset of every group (`tpserve.model.layers.GatedMLP`)."""
    if f"{prefix}.g_idx" not in ckpt:
        return None
    g = ckpt.read(f"{prefix}.g_idx", shape=(in_features,)).long()
    order = torch.argsort(g, stable=True)
    return None if torch.equal(order, torch.arange(in_features, device=g.device)) else order


def read_gptq_rows(ckpt: Checkpoint, prefix: str, quant: QuantConfig, in_features: int,
                   out_features: int, rows: torch.Tensor, cols: tuple[int, int]) -> GPTQWeight:
    """Input rows `rows` (global ids, in that order) x columns [n0, n1) of an act-order layer,
    with their g_idx (the Linear sorts them, `prepare_act_order`; rows already in group order
    become an aligned shard with a group offset). The layer's packed rows are read whole."""
    w = read_gptq_shard(ckpt, prefix, quant, in_features, out_features, (0, in_features), cols)
    if w.g_idx is None:
        raise CheckpointError(f"tensor '{prefix}.g_idx' is in group order; read it by span")
    rows = rows.to(w.qweight.device)
    g = w.g_idx.long()[rows]
    g_first, g_last = int(g.min()), int(g.max())
    step = max(1, (1 << 25) // max(1, in_features))  # unpack a bounded block of columns at a time
    words = torch.cat([gptq.pack_rows(gptq.unpack_rows(w.qweight[:, c:c + step], w.bits,
                                                       in_features)[rows], w.bits)
                       for c in range(0, w.out_features, step)], 1)
    return GPTQWeight(qweight=words, qzeros=w.qzeros[g_first:g_last + 1].contiguous(),
                      scales=w.scales[g_first:g_last + 1].contiguous(),
                      g_idx=(g - g_first).to(torch.int32), group_offset=0, bits=w.bits,
                      group_size=w.group_size, in_features=len(rows), out_features=w.out_features)


def select_columns(w: GPTQWeight, cols: torch.Tensor) -> GPTQWeight:
    """Output columns `cols` of a GPTQ shard, in that order (qzeros unpacked and repacked)."""
    cols = cols.to(w.qweight.device)
    zeros = gptq.unpack_cols(w.qzeros, w.bits, w.out_features)[:, cols]
    return GPTQWeight(qweight=w.qweight[:, cols].contiguous(), qzeros=gptq.pack_cols(zeros, w.bits),
                      scales=w.scales[:, cols].contiguous(), g_idx=w.g_idx,
                      group_offset=w.group_offset, bits=w.bits, group_size=w.group_size,
                      in_features=w.in_features, out_features=len(cols), x_features=w.x_features,
                      word_groups=w.word_groups)


def prepare_act_order(w: GPTQWeight) -> tuple[GPTQWeight, torch.Tensor | None]:
    """Rows sorted by group, so that x[:, perm] @ w_sorted == x @ w. Returns (w_sorted, perm).

    Done once at load, for the kernels' fast path. perm is None when there is nothing to permute
    (no g_idx, or rows already in group order). Sorted groups are contiguous. When every group but
    the first and last holds exactly group_size rows, the sorted shard drops g_idx for a
    group_offset (one group per tile in the kernels): always so for an unsharded act-order layer,
    whose GPTQ order puts group_size rows in each group. A row-parallel shard of one holds an
    arbitrary subset of each group; it keeps the sorted g_idx, and at 4 and 8 bits each group's run
    is padded to whole words (`_pad_groups`) so that the GEMV reads one group per word.
    """
    if w.g_idx is None:
        return w, None
    k, gs = w.in_features, w.group_size
    g = w.g_idx.long()
    perm = torch.argsort(g, stable=True)
    g_sorted = g[perm]
    g_first, g_last = int(g_sorted[0]), int(g_sorted[-1])
    g_sorted -= g_first
    first = int((g_sorted == 0).sum())
    rows = torch.arange(k, device=g.device)
    in_order = torch.equal(perm, rows)  # e.g. an MLP's rows read in group order (GatedMLP)
    qzeros = w.qzeros[g_first:g_last + 1].contiguous()
    scales = w.scales[g_first:g_last + 1].contiguous()
    if first <= gs and torch.equal(g_sorted, (rows + gs - first) // gs):
        words = w.qweight if in_order else gptq.pack_rows(
            gptq.unpack_rows(w.qweight, w.bits, k)[perm], w.bits)
        sorted_w = GPTQWeight(qweight=words, qzeros=qzeros, scales=scales,
                              g_idx=None, group_offset=(gs - first) % gs, bits=w.bits,
                              group_size=gs, in_features=k, out_features=w.out_features)
        return sorted_w, None if in_order else perm
    q = gptq.unpack_rows(w.qweight, w.bits, k)[perm]
    word_groups = w.bits in (4, 8)
    if word_groups:
        zeros = gptq.unpack_cols(qzeros, w.bits, w.out_features)
        q, g_sorted, perm = _pad_groups(q, g_sorted, perm, zeros, 32 // w.bits)
    return GPTQWeight(qweight=gptq.pack_rows(q, w.bits), qzeros=qzeros, scales=scales,
                      g_idx=g_sorted.to(torch.int32), group_offset=0, bits=w.bits, group_size=gs,
                      in_features=q.shape[0], out_features=w.out_features, x_features=k,
                      word_groups=word_groups), \
        None if q.shape[0] == k and in_order else perm


def _pad_groups(q, g_sorted, perm, zeros, p: int):
    """Each group's run of sorted rows padded to a multiple of p rows (whole words): padding rows
    hold q = the group's zero, so (q - z) * s is exactly 0 whatever x they read (the run's first
    row's, through perm). -> (q, g_idx, perm), all with the padded row count."""
    counts = torch.bincount(g_sorted, minlength=zeros.shape[0])
    padded = (counts + p - 1) // p * p
    starts, pstarts = counts.cumsum(0) - counts, padded.cumsum(0) - padded
    dest = pstarts[g_sorted] + torch.arange(len(g_sorted), device=q.device) - starts[g_sorted]
    g_pad = torch.repeat_interleave(torch.arange(len(counts), device=q.device), padded)
    q_pad = zeros[g_pad].to(q.dtype)
    q_pad[dest] = q
    perm_pad = perm[starts[g_pad]]
    perm_pad[dest] = perm
    return q_pad, g_pad, perm_pad
