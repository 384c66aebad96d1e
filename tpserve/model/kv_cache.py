"""Per-rank KV cache in fixed slots and the step plan that addresses it (attention over the cache
is `cache_attention.py`).

A step runs any mix of sequences: sequence i owns cache slot `slots[i]`, brings `lens[i]` new
tokens starting at position `starts[i]` (a prefill has start 0 and many tokens, a decode step one
token). The hidden states of a step are those tokens concatenated in plan order: [T, hidden].
The plan is plain lists of ints so it travels in a msgpack header unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpserve.errors import TpserveError


@dataclass
class StepPlan:
    slots: list[int]
    starts: list[int]
    lens: list[int]
    # Rows of the step's hidden states the coordinator needs back (for logits); None: every row.
    out_rows: list[int] | None = None
    # (src, dst, n): before the step, slot dst's first n positions become slot src's (every
    # layer's k/v): a choice starting from the prompt another choice of its request prefilled.
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    _positions: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

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

    def memo(self, key: tuple, make):
        """What `make()` builds for this step, built once: every layer of the step reads it."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def row_slots(self, device) -> torch.Tensor:
        """int64 [T]: each row's cache slot, in plan order."""
        return self.memo(("row_slots", str(device)), lambda: torch.repeat_interleave(
            torch.tensor(self.slots), torch.tensor(self.lens)).to(device, non_blocking=True))

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
        wire = {"slots": self.slots, "starts": self.starts, "lens": self.lens,
                "out_rows": self.out_rows}
        if self.copies:
            wire["copies"] = [list(c) for c in self.copies]
        return wire


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

    def check_copies(self, copies: list[tuple[int, int, int]]) -> None:
        for src, dst, n in copies:
            if not (0 <= src < self.num_slots and 0 <= dst < self.num_slots and src != dst
                    and 1 <= n <= self.max_len):
                raise TpserveError(f"KV copy of {n} positions from slot {src} to slot {dst} does "
                                   f"not fit {self.num_slots} slots of {self.max_len} positions; "
                                   f"the engine addressed a slot or position that does not exist")

    def copy_prefixes(self, copies: list[tuple[int, int, int]]) -> None:
        """Each (src, dst, n) of a step's plan (`StepPlan.copies`): slot dst's first n positions
        of every layer's k and v become slot src's, before the step runs."""
        self.check_copies(copies)
        for src, dst, n in copies:
            for cache in self.groups.values():
                for t in cache.k + cache.v:
                    t[dst, :n].copy_(t[src, :n])

    def check(self, plan: StepPlan) -> None:
        for slot, start, n in zip(plan.slots, plan.starts, plan.lens):
            if not 0 <= slot < self.num_slots:
                raise TpserveError(f"KV slot {slot} is outside [0, {self.num_slots}); the engine "
                                   f"addressed a slot that does not exist")
            if start < 0 or n < 1 or start + n > self.max_len:
                raise TpserveError(f"positions {start}..{start + n} do not fit the KV cache of "
                                   f"{self.max_len} positions; shorten the request or raise max_model_len")
