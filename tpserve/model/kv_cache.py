"""Per-rank KV cache in fixed slots, the step plan that addresses it, and attention over it.

A step runs any mix of sequences: sequence i owns cache slot `slots[i]`, brings `lens[i]` new
tokens starting at position `starts[i]` (a prefill has start 0 and many tokens, a decode step one
token). The hidden states of a step are those tokens concatenated in plan order: [T, hidden].
The plan is plain lists of ints so it travels in a msgpack header unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F

from tpserve.errors import TpserveError
from tpserve.kernels.prefill_attention import padded_rows, prefill_attention


@dataclass
class StepPlan:
    slots: list[int]
    starts: list[int]
    lens: list[int]
    # Rows of the step's hidden states the coordinator needs back (for logits); None: every row.
    out_rows: list[int] | None = None
    _positions: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.lens)

    def positions(self, device="cpu") -> torch.Tensor:
        if self._positions is None or self._positions.device != torch.device(device):
            self._positions = torch.cat([torch.arange(s, s + n) for s, n in zip(
                self.starts, self.lens)]).to(device, non_blocking=True)
        return self._positions

    @property
    def is_fresh(self) -> bool:
        """Every sequence starts at position 0 (first prefills): its keys are this step's own."""
        return not any(self.starts)

    def row_slots(self, device) -> torch.Tensor:
        """int64 [T]: each row's cache slot, in plan order."""
        key = ("row_slots", str(device))
        if key not in self._masks:
            self._masks[key] = torch.repeat_interleave(
                torch.tensor(self.slots), torch.tensor(self.lens)).to(device, non_blocking=True)
        return self._masks[key]

    def padded_rows(self, device) -> torch.Tensor:
        """`prefill_attention.padded_rows` of the step's sequences on `device`, for every layer."""
        key = ("padded_rows", str(device))
        if key not in self._masks:
            self._masks[key] = padded_rows(self.lens).to(device, non_blocking=True)
        return self._masks[key]

    def attention_groups(self, device) -> list["BatchLayout"]:
        """The step's sequences as the padded batches attention runs over (`group_sequences`);
        built once per step and device, shared by every layer."""
        key = ("groups", str(device))
        if key not in self._masks:
            self._masks[key] = [BatchLayout.of(self, sorted(g), device)
                                for g in group_sequences(self.starts, self.lens)]
        return self._masks[key]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings one token: the static-shape (graph-captured) step applies."""
        return all(n == 1 for n in self.lens)

    def advanced(self, k: int) -> "StepPlan":
        """The decode step `k` steps after this one: each sequence one position further per step."""
        return StepPlan(self.slots, [s + k for s in self.starts], self.lens, self.out_rows)

    def decode_meta(self, device) -> "DecodeMeta":
        return DecodeMeta.build(self.slots, self.starts, device)

    def last_rows(self) -> list[int]:
        """Row of each sequence's last token."""
        ends, total = [], 0
        for n in self.lens:
            total += n
            ends.append(total - 1)
        return ends

    def to_wire(self) -> dict:
        return {"slots": self.slots, "starts": self.starts, "lens": self.lens,
                "out_rows": self.out_rows}


@dataclass
class DecodeMeta:
    """A decode step's plan as device tensors, so a captured step replays with new values.

    Rows past the real sequences (a batch bucket's padding) write to the cache's scratch slot and
    have length 0: the attention kernel gives them zeros.
    """
    slots: torch.Tensor  # int64 [B]: each sequence's cache slot
    positions: torch.Tensor  # int64 [B]: the new token's position
    lens: torch.Tensor  # int32 [B]: keys visible to it (position + 1; 0 for padding)

    @staticmethod
    def host(slots: list[int], starts: list[int], size: int | None = None,
             scratch_slot: int = 0) -> torch.Tensor:
        """The plan as int64 [3, size] on the host: slots, positions, lens (padding rows last)."""
        pad = (size or len(slots)) - len(slots)
        return torch.tensor([slots + [scratch_slot] * pad, starts + [0] * pad,
                             [s + 1 for s in starts] + [0] * pad], dtype=torch.int64)

    @classmethod
    def of(cls, rows: torch.Tensor) -> "DecodeMeta":
        """Views of a [3, B] int64 tensor laid out as `host` (lens converted to int32)."""
        return cls(rows[0], rows[1], rows[2].to(torch.int32))

    @classmethod
    def build(cls, slots: list[int], starts: list[int], device, size: int | None = None,
              scratch_slot: int = 0) -> "DecodeMeta":
        return cls.of(cls.host(slots, starts, size, scratch_slot).to(device, non_blocking=True))


class KVCache:
    """k/v of this rank's kv heads for some layers: [slots + 1, max_len, kv_heads, head_dim] each.

    The last slot is scratch: a captured decode step's padding rows write there.
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device="cpu"):
        shape = (num_slots + 1, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class LayerCaches:
    """A rank's KV caches, one `KVCache` per layer type (Gemma 4's full layers have their own head
    shape); `where[i]` is layer i's (cache, index). A KV-shared layer points at its producer's
    entry and owns no memory."""

    def __init__(self, groups: dict[str, KVCache], where: list[tuple[KVCache, int]]):
        self.groups, self.where = groups, where
        first = next(iter(groups.values()))
        self.num_slots, self.max_len = first.num_slots, first.max_len

    @classmethod
    def build(cls, cfg, heads_of, producer_of, num_slots: int, max_len: int, dtype, device):
        """heads_of(layer) -> (kv_heads, head_dim) on this rank; producer_of(layer) -> the layer
        whose k/v it reads (itself for ordinary layers)."""
        types = cfg.layer_types or ("",) * cfg.num_layers
        owners = {t: [i for i in range(cfg.num_layers) if types[i] == t and producer_of(i) == i]
                  for t in dict.fromkeys(types)}
        groups = {t: KVCache(len(ls), num_slots, max_len, *heads_of(ls[0]), dtype, device)
                  for t, ls in owners.items() if ls}
        where = []
        for i in range(cfg.num_layers):
            src = producer_of(i)
            where.append((groups[types[src]], owners[types[src]].index(src)))
        return cls(groups, where)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.groups.values())

    def check(self, plan: StepPlan) -> None:
        for slot, start, n in zip(plan.slots, plan.starts, plan.lens):
            if not 0 <= slot < self.num_slots:
                raise TpserveError(f"KV slot {slot} is outside [0, {self.num_slots}); the engine "
                                   f"addressed a slot that does not exist")
            if start < 0 or n < 1 or start + n > self.max_len:
                raise TpserveError(f"positions {start}..{start + n} do not fit the KV cache of "
                                   f"{self.max_len} positions; shorten the request or raise max_model_len")


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
    groups = plan.attention_groups(q.device)
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
    rows = plan.padded_rows(q.device) if len(set(plan.lens)) > 1 else None
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
