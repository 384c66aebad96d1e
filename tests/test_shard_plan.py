"""The shard plan as data: spans tile every weight exactly once, kv heads cover their q heads."""

import pytest

from tpserve.model.config import ModelConfig, RopeConfig
from tpserve.errors import ConfigError
from tpserve.model.shard_plan import COLUMN, LINEAR_PLAN, MLP_UNIT, ShardPlan
import torch


def cfg(heads=12, kv=4, inter=688, hd=16, hidden=192):
    return ModelConfig(arch="llama", hidden_size=hidden, intermediate_size=inter, num_layers=1,
                       num_heads=heads, num_kv_heads=kv, head_dim=hd, vocab_size=32,
                       max_position=64, rms_norm_eps=1e-6, rope=RopeConfig(), dtype=torch.float32)


SIZES = {"self_attn.q_proj": (192, 192), "self_attn.k_proj": (192, 64),
         "self_attn.v_proj": (192, 64), "self_attn.o_proj": (192, 192),
         "mlp.gate_proj": (192, 688), "mlp.up_proj": (192, 688), "mlp.down_proj": (688, 192)}


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("name", list(LINEAR_PLAN))
def test_spans_tile_the_split_side(tp, name):
    plan = ShardPlan.build(cfg(), tp)
    k, n = SIZES[name]
    spans = [plan.linear_spans(r, name, k, n) for r in range(tp)]
    side = LINEAR_PLAN[name][0]
    split = [s[1] if side == COLUMN else s[0] for s in spans]
    whole = [s[0] if side == COLUMN else s[1] for s in spans]
    assert all(w == (0, k if side == COLUMN else n) for w in whole)
    if name in ("self_attn.k_proj", "self_attn.v_proj") and 4 % tp:
        # replicated kv heads: every column is covered, neighbours may overlap
        assert split[0][0] == 0 and split[-1][1] == n
        assert all(a[1] >= b[0] for a, b in zip(split, split[1:]))
    else:
        assert split[0][0] == 0 and split[-1][1] == (n if side == COLUMN else k)
        assert all(a[1] == b[0] for a, b in zip(split, split[1:]))


@pytest.mark.parametrize("tp,heads,kv", [(3, 12, 4), (4, 12, 4), (8, 8, 2), (6, 12, 4), (2, 4, 1)])
def test_every_local_q_head_reads_its_own_kv_head(tp, heads, kv):
    plan = ShardPlan.build(cfg(heads=heads, kv=kv, hidden=heads * 16), tp)
    for r, s in enumerate(plan.ranks):
        for i, q in enumerate(range(*s.q_heads)):
            assert s.kv_heads[0] + plan.kv_map(r)[i] == q // (heads // kv)


def test_uneven_mlp_split_for_tp3_on_688():
    plan = ShardPlan.build(cfg(), 3)
    sizes = [s.mlp_rows[1] - s.mlp_rows[0] for s in plan.ranks]
    assert sum(sizes) == 688 and max(sizes) - min(sizes) <= MLP_UNIT
    assert all(s % MLP_UNIT == 0 for s in sizes)


def test_tp_not_dividing_heads_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"num_attention_heads=12 is not divisible by tp=5"):
        ShardPlan.build(cfg(), 5)
    with pytest.raises(ConfigError, match=r"tp=0"):
        ShardPlan.build(cfg(), 0)
