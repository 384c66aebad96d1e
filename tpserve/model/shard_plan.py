"""The shard plan: which rank holds which rows and columns of every weight, as plain data.

`LINEAR_PLAN` says, per linear layer, whether its output columns (column-parallel) or its input
rows (row-parallel) are split, and by which unit. `GPTQ_SPLIT` says how each GPTQ tensor follows a
split. `ShardPlan.build(config, tp)` turns the units into per-rank spans for any tp that divides
the attention heads:

- q heads: h/tp contiguous heads per rank.
- kv heads: a rank holds every kv head its q heads read, so when tp > num_kv_heads (or the heads do
  not line up) a kv head is replicated on each rank that needs it. Exact for any tp dividing h.
- MLP rows: intermediate_size split into units of MLP_UNIT rows as evenly as possible (sizes
  differ by at most one unit), so tp=3 runs intermediate_size=688.

Row-parallel spans need not start on a quantization group or a pack boundary; the loader keeps the
global group offset (`tpserve.model.gptq_shard`). Norms are replicated; a row-parallel bias is added once,
by rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpserve.model.config import ModelConfig
from tpserve.errors import ConfigError

COLUMN, ROW = "column", "row"

# linear layer (suffix under model.layers.{i}.) -> (which side is split, the unit it is split by)
LINEAR_PLAN: dict[str, tuple[str, str]] = {
    "self_attn.q_proj": (COLUMN, "q_heads"),
    "self_attn.k_proj": (COLUMN, "kv_heads"),
    "self_attn.v_proj": (COLUMN, "kv_heads"),
    "self_attn.o_proj": (ROW, "q_heads"),
    "mlp.gate_proj": (COLUMN, "mlp"),
    "mlp.up_proj": (COLUMN, "mlp"),
    "mlp.down_proj": (ROW, "mlp"),
}

# GPTQ tensor -> (what a row-parallel shard [k0, k1) slices, what a column-parallel [n0, n1) slices)
GPTQ_SPLIT: dict[str, tuple[str, str]] = {
    "qweight": ("rows k0..k1 of a bit stream along K (repacked from row 0)", "columns n0..n1"),
    "qzeros": ("groups k0//gs .. (k1-1)//gs", "bit stream along N (repacked from column 0)"),
    "scales": ("groups k0//gs .. (k1-1)//gs", "columns n0..n1"),
    "g_idx": ("rows k0..k1, global group ids kept", "unchanged"),
    "bias": ("replicated, added once by rank 0", "entries n0..n1"),
}

MLP_UNIT = 8  # rows per MLP split unit: one 4-bit pack word, so 4/8-bit shards start on a word


def _even_split(n_units: int, tp: int, rank: int) -> tuple[int, int]:
    return rank * n_units // tp, (rank + 1) * n_units // tp


@dataclass(frozen=True)
class RankShard:
    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp_rows: tuple[int, int]

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig
    tp: int
    ranks: tuple[RankShard, ...]

    @classmethod
    def build(cls, config: ModelConfig, tp: int) -> "ShardPlan":
        h, kv = config.num_heads, config.num_kv_heads
        if not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tp={tp!r} is invalid; use a positive integer")
        if h % tp:
            ok = [t for t in range(1, h + 1) if h % t == 0]
            raise ConfigError(f"num_attention_heads={h} is not divisible by tp={tp}; choose tp "
                              f"from {ok}")
        unit = MLP_UNIT if config.intermediate_size % MLP_UNIT == 0 else 1
        n_units = config.intermediate_size // unit
        if n_units < tp:
            raise ConfigError(f"intermediate_size={config.intermediate_size} is too small for "
                              f"tp={tp}; use tp <= {n_units}")
        group = h // kv  # q heads per kv head
        ranks = []
        for r in range(tp):
            h0, h1 = r * h // tp, (r + 1) * h // tp
            u0, u1 = _even_split(n_units, tp, r)
            ranks.append(RankShard(rank=r, q_heads=(h0, h1),
                                   kv_heads=(h0 // group, (h1 - 1) // group + 1),
                                   mlp_rows=(u0 * unit, u1 * unit)))
        return cls(config=config, tp=tp, ranks=tuple(ranks))

    def unit_span(self, rank: int, unit: str) -> tuple[int, int]:
        """Element span [a, b) of a split unit on `rank`."""
        s, hd = self.ranks[rank], self.config.head_dim
        if unit == "q_heads":
            return s.q_heads[0] * hd, s.q_heads[1] * hd
        if unit == "kv_heads":
            return s.kv_heads[0] * hd, s.kv_heads[1] * hd
        assert unit == "mlp", unit
        return s.mlp_rows

    def linear_spans(self, rank: int, name: str, in_features: int, out_features: int):
        """(input rows [k0, k1), output columns [n0, n1)) of linear `name` held by `rank`."""
        side, unit = LINEAR_PLAN[name]
        span = self.unit_span(rank, unit)
        return ((0, in_features), span) if side == COLUMN else (span, (0, out_features))

    def kv_map(self, rank: int) -> list[int]:
        """For each local q head, the index of the local kv head it reads."""
        s = self.ranks[rank]
        group = self.config.num_heads // self.config.num_kv_heads
        return [q // group - s.kv_heads[0] for q in range(*s.q_heads)]
