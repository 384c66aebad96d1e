"""Causal attention of a step's fresh sequences (first prefills), in torch: the packed sequences
padded to [B, maxlen] and one scaled_dot_product_attention (flash attention on a GPU). Decode
attention over the slot KV cache, and its Triton kernel, are in `attention.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_scores(s: torch.Tensor, valid: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Soft-cap then mask fp32 scores [..., keys]; valid broadcasts against them."""
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s.masked_fill(~valid, float("-inf"))


def padded_rows(lens: list[int]) -> torch.Tensor:
    """int64 [T] (host): the row of each packed token in the [B * max(lens)] padded layout."""
    maxlen = max(lens)
    return torch.cat([torch.arange(n) + i * maxlen for i, n in enumerate(lens)])


def prefill_attention(q, k, v, cu_seqlens, scale, window=None, softcap=None, kv_group=1,
                      rows=None):
    """Causal attention of fresh sequences packed back to back (each starts at position 0).

    q [T, H, D], k/v [T, KVH, D] with H = KVH * kv_group (q head h reads kv head h // kv_group),
    cu_seqlens int [B + 1] (host; sequence i is rows cu[i]:cu[i+1]) -> [T, H, D] in q's dtype.
    Padded to [B, maxlen] for one scaled_dot_product_attention call (sequences of one length are
    that layout already: views only). Padding needs no mask of its own: causality already hides
    padded keys from every real query, and padded query rows are dropped. `rows`: the padding's
    `padded_rows` on q's device, where the caller keeps them for every layer of a step (else made
    here, on the host, and copied without waiting for the GPU). window: keys at positions > pos -
    window; softcap: scores = tanh(s / cap) * cap, which SDPA cannot do, so that path computes the
    fp32 scores explicitly ([B, H, maxlen, maxlen]).
    """
    t, h, d = q.shape
    kvh = k.shape[1]
    assert h == kvh * kv_group, f"{h} query heads vs {kvh} kv heads x kv_group {kv_group}"
    cu = [int(c) for c in cu_seqlens.tolist()]  # prefill runs eagerly: host values are fine
    lens = [e - s for s, e in zip(cu, cu[1:])]
    b, maxlen = len(lens), max(lens, default=0)
    if t == 0:
        return torch.empty_like(q)
    if t == b * maxlen:  # one sequence, or several of one length: nothing to pad, views only
        rows = None

        def pad(x):  # (T, heads, D) -> (B, heads, maxlen, D)
            return x.view(b, maxlen, x.shape[1], d).transpose(1, 2)
    else:
        if rows is None:
            rows = padded_rows(lens).to(q.device, non_blocking=True)

        def pad(x):  # (T, heads, D) -> (B, heads, maxlen, D)
            out = x.new_zeros(b * maxlen, x.shape[1], d).index_copy_(0, rows, x)
            return out.view(b, maxlen, x.shape[1], d).transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    mask = None  # plain causal attention needs none (SDPA's is_causal)
    if window is not None or softcap is not None:
        qpos = torch.arange(maxlen, device=q.device)
        mask = qpos[None, :] <= qpos[:, None]  # (maxlen, maxlen): query row, key column
        if window is not None:
            mask &= qpos[None, :] > qpos[:, None] - window
    if softcap is None:
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=None if window is None else mask,
                                           is_causal=window is None, scale=scale,
                                           enable_gqa=kv_group > 1)
    else:
        qg = qp.reshape(b, kvh, kv_group * maxlen, d)  # kv_group heads of one kv head stacked
        s = (qg.float() @ kp.float().transpose(-1, -2)).view(b, kvh, kv_group, maxlen, maxlen)
        p = masked_scores(s * scale, mask, softcap).softmax(-1)
        o = (p.view(b, kvh, kv_group * maxlen, maxlen) @ vp.float()).view(b, h, maxlen, d)
    if rows is None:
        return o.transpose(1, 2).reshape(t, h, d).to(q.dtype)
    return o.transpose(1, 2).reshape(b * maxlen, h, d)[rows].to(q.dtype)
