"""Attention over the slot KV cache for a step's plan (`kv_cache.StepPlan`): the eager path of
any mix of prefill and decode rows, as a few padded batches (`group_sequences`), and first
prefills on the step's own k/v (`fresh_attention`). The static-shape decode step's attention is
the Triton kernel in `kernels/attention.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F

from tpserve.kernels.prefill_attention import padded_rows, prefill_attention
from tpserve.model.kv_cache import KVCache, StepPlan


def attention_groups(plan: StepPlan, device) -> list["BatchLayout"]:
    """The step's sequences as the padded batches attention runs over (`group_sequences`)."""
    return plan.memo(("groups", str(device)), lambda: [
        BatchLayout.of(plan, sorted(g), device) for g in group_sequences(plan.starts, plan.lens)])


def group_sequences(starts: list[int], lens: list[int], waste: float = 2.0) -> list[list[int]]:
    """Sequences that attend as one padded batch: taken longest context first, a batch grows
    while its padded work (sequences x longest query x longest context) stays within `waste`
    times the work of its own rows, so a long prompt never pads the decode rows beside it."""
    order = sorted(range(len(lens)), key=lambda i: (-(starts[i] + lens[i]), -lens[i]))
    groups: list[list[int]] = []
    for i in order:  # contexts only shrink along `order`: the first of a batch has the longest
        end = starts[i] + lens[i]
        padded = (len(groups[-1]) + 1) * max(n, lens[i]) * keys if groups else 0
        if groups and padded <= waste * (work + lens[i] * end):
            groups[-1].append(i)
            n, work = max(n, lens[i]), work + lens[i] * end
        else:
            groups.append([i])
            n, keys, work = lens[i], end, lens[i] * end
    return groups


@dataclass
class BatchLayout:
    """Some of a step's sequences as a padded batch [B, n] for attention: row `rows[t]` of the
    step sits at [seq[t], col[t]]; `rows` is None where the batch is every row in plan order."""
    slots: torch.Tensor  # int64 [B]: each sequence's cache slot
    rows: torch.Tensor | None  # int64 [T_b]: the step rows of these sequences
    row_slots: torch.Tensor  # int64 [T_b]: the slot of each row
    positions: torch.Tensor  # int64 [T_b]: the position of each row
    seq: torch.Tensor  # int64 [T_b]
    col: torch.Tensor  # int64 [T_b]
    qpos: torch.Tensor  # int64 [B, n]: the position of each padded query row
    owned: torch.Tensor  # bool [B, keys]: key positions before each sequence's end
    n: int  # the longest query
    keys: int  # the longest context: keys read from each sequence's slot
    masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, plan: StepPlan, seqs: list[int], device) -> "BatchLayout":
        first = [0, *accumulate(plan.lens)]  # each sequence's first row
        lens = torch.tensor([plan.lens[i] for i in seqs])
        starts = torch.tensor([plan.starts[i] for i in seqs])
        slots = torch.tensor([plan.slots[i] for i in seqs])
        seq = torch.repeat_interleave(torch.arange(len(seqs)), lens)
        col = torch.cat([torch.arange(plan.lens[i]) for i in seqs])
        rows = torch.cat([torch.arange(first[i], first[i] + plan.lens[i]) for i in seqs])
        n, ends = int(lens.max()), starts + lens
        keys = int(ends.max())
        qpos = starts[:, None] + torch.arange(n)[None, :]
        owned = torch.arange(keys)[None, :] < ends[:, None]
        rows = None if seqs == list(range(len(plan.lens))) else rows.to(device, non_blocking=True)
        return cls(slots.to(device, non_blocking=True), rows, *(
            t.to(device, non_blocking=True)
            for t in (slots[seq], starts[seq] + col, seq, col, qpos, owned)), n, keys)

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, n, keys] bool: query row j of sequence i (position starts[i] + j) sees key
        position p when p <= its position (and within `window` when set). Padding rows see what
        their position would; their outputs are dropped."""
        if window not in self.masks:
            qpos = self.qpos[:, :, None]  # (B, n, 1)
            kpos = torch.arange(self.keys, device=qpos.device)[None, None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            self.masks[window] = mask
        return self.masks[window]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
              plan: StepPlan, kv_map: torch.Tensor, scale: float, window: int | None = None,
              softcap: float | None = None, kv_group: int | None = None) -> torch.Tensor:
    """q (T, heads, hd), k/v (T, kv_heads, hd) of this step -> (T, heads, hd).

    Writes k/v into the cache, then every sequence's queries attend to its cached keys (causal;
    within `window` positions when set), as few padded batches as `group_sequences` allows
    (usually one): queries padded to the batch's longest, keys read from each sequence's slot up
    to the batch's longest context, one masked attention per batch. kv_map gives each q head its
    kv head; kv_group, where q head h reads kv head h // kv_group (else None).
    """
    if plan.is_fresh:
        rows = (plan.row_slots(q.device), plan.positions(q.device))
        cache.k[layer].index_put_(rows, k)
        cache.v[layer].index_put_(rows, v)
        return fresh_attention(q, k, v, plan, kv_map, scale, window, softcap, kv_group)
    groups = attention_groups(plan, q.device)
    if groups[0].rows is None:  # one batch of every row in plan order
        return _attend(q, k, v, cache, layer, groups[0], kv_map, scale, window, softcap)
    out = torch.empty_like(q)
    for lay in groups:
        out[lay.rows] = _attend(q[lay.rows], k[lay.rows], v[lay.rows], cache, layer, lay, kv_map,
                                scale, window, softcap)
    return out


def fresh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan,
                    kv_map: torch.Tensor, scale: float, window: int | None = None,
                    softcap: float | None = None, kv_group: int | None = None) -> torch.Tensor:
    """`attention` of a step of first prefills (`plan.is_fresh`), whose k/v the caller has
    written to the cache: each sequence's keys are its own rows of this step, so attention runs on
    q/k/v as they are (no cache read, no mask tensor where plain causal; one sequence unpadded)."""
    if kv_group is None:  # q heads do not read kv head h // group: one kv head per q head
        k, v, kv_group = k.index_select(1, kv_map), v.index_select(1, kv_map), 1
    cu = torch.tensor([0, *accumulate(plan.lens)])
    # ragged lengths: the padding's rows, made once per step (equal lengths need none)
    dev = q.device
    rows = None if len(set(plan.lens)) == 1 else plan.memo(
        ("padded_rows", str(dev)), lambda: padded_rows(plan.lens).to(dev, non_blocking=True))
    return prefill_attention(q, k, v, cu, scale, window, softcap, kv_group, rows)


def _attend(q, k, v, cache: KVCache, layer: int, lay: BatchLayout, kv_map, scale, window,
            softcap) -> torch.Tensor:
    """`attention` for the rows of one padded batch."""
    cache.k[layer].index_put_((lay.row_slots, lay.positions), k)
    cache.v[layer].index_put_((lay.row_slots, lay.positions), v)
    # Each sequence's slot up to the longest end; what lies past its own end (a previous
    # occupant's entries) is zeroed so that nothing there, not even a NaN, reaches the output.
    own = lay.owned[:, :, None, None]
    keys = cache.k[layer][lay.slots, :lay.keys].where(own, 0).index_select(2, kv_map)
    vals = cache.v[layer][lay.slots, :lay.keys].where(own, 0).index_select(2, kv_map)
    qs = q.new_zeros(lay.slots.shape[0], lay.n, *q.shape[1:])
    qs[lay.seq, lay.col] = q
    qs, keys, vals = qs.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2)  # (B, H, ., hd)
    mask = lay.mask(window)[:, None]  # (B, 1, n, L)
    if softcap is None:
        o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale)
    else:
        s = (qs @ keys.transpose(2, 3)).float() * scale  # (B, H, n, L)
        s = torch.tanh(s / softcap) * softcap
        o = s.masked_fill(~mask, float("-inf")).softmax(-1).to(vals.dtype) @ vals
    return o.transpose(1, 2)[lay.seq, lay.col]  # (T, heads, hd)
