"""Gemma 2, 3 and 4 text decoder layers (transformers 5.23 semantics), assembled from the shared
layers.

What differs from the llama family (`tpserve.model.llama`), checked against transformers' modeling files:
- RMSNorm in fp32; Gemma 2/3 store the weight as an offset (x * (1 + w)), Gemma 4 as is (x * w).
- Sandwich norms: each of attention and MLP output is normed before its residual add.
- gelu-tanh MLP; scores scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3) or 1 (Gemma 4, whose
  q and k are RMS-normed); attention logit soft-capping (Gemma 2).
- `layer_types`: sliding-window and full layers, each type with its own rope (Gemma 3/4) and, in
  Gemma 4, its own head_dim / kv heads; Gemma 4 full layers may take v from the k projection
  (attention_k_eq_v); v is RMS-normed without a scale; every layer output is multiplied by its
  stored `layer_scalar`.
- KV sharing (Gemma 4 `num_kv_shared_layers`): the last n layers have no k/v projections and attend
  over the cache of the last earlier layer of their type; they own no cache memory.
- MoE (Gemma 4 `enable_moe_block`): a routed expert block beside the dense MLP in every layer
  (`tpserve.model.moe`).

Per-layer embeddings (Gemma 4 `hidden_size_per_layer_input`): `PerLayerInputs`
(`tpserve.model.head`) lives at the coordinator beside the main embedding. Per token it gathers one row of `embed_tokens_per_layer`
[vocab, layers x ple_dim] (a table as large as several decoder layers, held once, never as an
lm_head), adds the projection of the scaled embedding, and the coordinator ships the result with h
as extra columns of the one step tensor: `[h | ple]`, [T, hidden + layers x ple_dim]. The wire
format and executors are unchanged; the rank model splits the columns. Each layer's small gate
(hidden -> ple_dim) and projection (ple_dim -> hidden) are replicated on every rank, so PLE adds no
all-reduce.
"""

from __future__ import annotations

import torch

from tpserve.model.layers import ACTIVATIONS, Attention, DecoderLayer, GatedMLP, LayerLoader
from tpserve.model.moe import MoEBlock
from tpserve.model.rope import Rotary

SLIDING, FULL = "sliding_attention", "full_attention"


def norm_offset(cfg) -> float:
    return cfg.gemma.norm_offset


def layer(load: LayerLoader, i: int) -> DecoderLayer:
    cfg, g, hidden = load.cfg, load.cfg.gemma, load.cfg.hidden_size
    p, kind = f"model.layers.{i}", cfg.layer_types[i]
    shared = g.kv_producer(cfg, i) is not None  # no k/v projections or norms
    hd = load.plan.head_split(i).head_dim

    def norm(name, size=hidden, weighted=True):
        return load.norm(f"{p}.{name}.weight", size, weighted)

    attn = Attention(
        load, i, scale=g.attn_scale, shares_kv=shared, softcap=g.attn_softcap,
        k_is_v=g.k_eq_v and kind == FULL,  # v is the k projection's output, before k_norm
        q_norm=norm("self_attn.q_norm", hd) if g.version >= 3 else None,
        k_norm=norm("self_attn.k_norm", hd) if g.version >= 3 and not shared else None,
        v_norm=norm("self_attn.v_norm", hd, weighted=False) if g.version >= 4 and not shared
        else None)
    wide = shared and g.double_wide_mlp
    mlp = GatedMLP(load, i, "gelu_tanh", width=cfg.intermediate_size * (2 if wide else 1))
    return DecoderLayer(
        norm("input_layernorm"), attn, norm("pre_feedforward_layernorm"), mlp,
        attn_out=norm("post_attention_layernorm"), mlp_out=norm("post_feedforward_layernorm"),
        moe=MoEBlock(load, i) if g.num_experts else None,
        per_layer=PerLayerBlock(load, i) if g.ple_dim else None,
        layer_scalar=load.tensor(f"{p}.layer_scalar", (1,)) if g.version >= 4 else None,
        layer_type=kind)


class PerLayerBlock(torch.nn.Module):
    """h += norm(proj(gelu(gate(h)) * ple)): a layer's per-layer input, replicated on every rank."""

    def __init__(self, load: LayerLoader, i: int):
        super().__init__()
        hidden, dim = load.cfg.hidden_size, load.cfg.gemma.ple_dim
        self.gate = load.linear(i, "per_layer_input_gate", hidden, dim)
        self.projection = load.linear(i, "per_layer_projection", dim, hidden)
        self.norm = load.norm(f"model.layers.{i}.post_per_layer_input_norm.weight", hidden)

    def forward(self, h: torch.Tensor, ple: torch.Tensor) -> torch.Tensor:
        return h + self.norm(self.projection(ACTIVATIONS["gelu_tanh"](self.gate(h)) * ple))


def kv_producer(cfg):
    g = cfg.gemma
    return lambda i: i if g.kv_producer(cfg, i) is None else g.kv_producer(cfg, i)


def rotaries(cfg, device) -> dict[str, Rotary]:
    g = cfg.gemma
    return {SLIDING: Rotary(g.rope_sliding, cfg.head_dim, device),
            FULL: Rotary(cfg.rope, g.full_head_dim, device)}
