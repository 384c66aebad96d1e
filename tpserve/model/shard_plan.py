"""The shard plan: which rank holds which rows and columns of every weight, as plain data.

`LINEAR_PLAN` says, per linear layer, whether its output columns (column-parallel) or its input
rows (row-parallel) are split, and by which unit; the shard reader and every model build their
linears from it. `GPTQ_SPLIT` says which dim of each GPTQ tensor follows a split, and the reader
slices by it. `ShardPlan.build(config, tp)` turns the units into per-rank spans for any tp that
divides the attention heads, for every shape the model has (Gemma 4's full-attention layers have
their own head_dim and kv heads; its KV-shared layers a double-wide MLP; its experts their own
width):

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

COLUMN, ROW, REPLICATED = "column", "row", "replicated"

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
# Gemma 4: routed experts split like the MLP by their own width; the per-layer-input gate and
# projection are small and replicated (sharding them would cost a third all-reduce per layer).
EXTRA_PLAN: dict[str, tuple[str, str]] = {
    **{name.replace("mlp.", "experts."): (side, "experts")
       for name, (side, unit) in LINEAR_PLAN.items() if unit == "mlp"},
    "per_layer_input_gate": (REPLICATED, ""),
    "per_layer_projection": (REPLICATED, ""),
}

# GPTQ tensor -> (dim a row-parallel shard [k0, k1) slices, dim a column-parallel [n0, n1) slices);
# None: not sliced. qweight is a bit stream along K and qzeros along N: the reader unpacks the
# covering words and repacks from row/column 0; scales/qzeros keep every group [k0//gs, (k1-1)//gs]
# (neighbouring ranks both keep a straddling group); g_idx keeps global group ids.
GPTQ_SPLIT: dict[str, tuple[int | None, int | None]] = {
    "qweight": (0, 1),
    "qzeros": (0, 1),
    "scales": (0, 1),
    "g_idx": (0, None),
    "bias": (None, 0),  # row-parallel: replicated, added once by rank 0
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
class HeadSplit:
    """One attention shape split over the ranks: per rank its q heads and the kv heads they read."""
    head_dim: int
    num_heads: int
    num_kv_heads: int
    q_heads: tuple[tuple[int, int], ...]
    kv_heads: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, heads: int, kv: int, head_dim: int, tp: int) -> "HeadSplit":
        group = heads // kv  # q heads per kv head
        q = tuple((r * heads // tp, (r + 1) * heads // tp) for r in range(tp))
        return cls(head_dim, heads, kv, q, tuple((h0 // group, (h1 - 1) // group + 1) for h0, h1 in q))

    def kv_map(self, rank: int) -> list[int]:
        """For each local q head, the index of the local kv head it reads."""
        group = self.num_heads // self.num_kv_heads
        return [q // group - self.kv_heads[rank][0] for q in range(*self.q_heads[rank])]


def _row_split(size: int, tp: int, what: str) -> tuple[tuple[int, int], ...]:
    unit = MLP_UNIT if size % MLP_UNIT == 0 else 1
    n_units = size // unit
    if n_units < tp:
        raise ConfigError(f"{what}={size} is too small for tp={tp}; use tp <= {n_units}")
    return tuple(tuple(u * unit for u in _even_split(n_units, tp, r)) for r in range(tp))


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig
    tp: int
    ranks: tuple[RankShard, ...]  # the base shape (sliding/only attention, the MLP)
    heads: dict[str, HeadSplit]  # by layer type ("" for models without layer types)
    widths: dict[str, tuple[tuple[int, int], ...]]  # "mlp", "wide_mlp", "experts": rows per rank

    @classmethod
    def build(cls, config: ModelConfig, tp: int) -> "ShardPlan":
        h, kv = config.num_heads, config.num_kv_heads
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ConfigError(f"tp={tp!r} is invalid; use a positive integer")
        if h % tp:
            ok = [t for t in range(1, h + 1) if h % t == 0]
            raise ConfigError(f"num_attention_heads={h} is not divisible by tp={tp}; choose tp "
                              f"from {ok}")
        base = HeadSplit.build(h, kv, config.head_dim, tp)
        heads = {t: base for t in set(config.layer_types) | {""}}
        widths = {"mlp": _row_split(config.intermediate_size, tp, "intermediate_size")}
        g = config.gemma
        if g is not None:
            heads["full_attention"] = HeadSplit.build(h, g.full_kv_heads, g.full_head_dim, tp)
            if g.double_wide_mlp:
                widths["wide_mlp"] = _row_split(2 * config.intermediate_size, tp,
                                                "2 x intermediate_size")
            if g.num_experts:
                widths["experts"] = _row_split(g.moe_intermediate_size, tp, "moe_intermediate_size")
        ranks = tuple(RankShard(r, base.q_heads[r], base.kv_heads[r], widths["mlp"][r])
                      for r in range(tp))
        return cls(config, tp, ranks, heads, widths)

    def head_split(self, layer: int | None = None) -> HeadSplit:
        types = self.config.layer_types
        return self.heads[types[layer] if layer is not None and types else ""]

    def mlp_width(self, layer: int | None) -> str:
        g = self.config.gemma
        wide = (layer is not None and g is not None and g.double_wide_mlp
                and g.kv_producer(self.config, layer) is not None)
        return "wide_mlp" if wide else "mlp"

    def unit_span(self, rank: int, unit: str, layer: int | None = None) -> tuple[int, int]:
        """Element span [a, b) of a split unit on `rank` (in layer `layer`'s shape)."""
        if unit in ("q_heads", "kv_heads"):
            split = self.head_split(layer)
            a, b = (split.q_heads if unit == "q_heads" else split.kv_heads)[rank]
            return a * split.head_dim, b * split.head_dim
        return self.widths[self.mlp_width(layer) if unit == "mlp" else unit][rank]

    def linear_spans(self, rank: int, name: str, in_features: int, out_features: int,
                     layer: int | None = None):
        """(input rows [k0, k1), output columns [n0, n1)) of linear `name` held by `rank`."""
        side, unit = LINEAR_PLAN.get(name) or EXTRA_PLAN[name]
        if side == REPLICATED:
            return (0, in_features), (0, out_features)
        span = self.unit_span(rank, unit, layer)
        return ((0, in_features), span) if side == COLUMN else (span, (0, out_features))

    def kv_map(self, rank: int, layer: int | None = None) -> list[int]:
        """For each local q head, the index of the local kv head it reads."""
        return self.head_split(layer).kv_map(rank)
