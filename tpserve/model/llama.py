"""Llama, Mistral, Qwen2 and Qwen3 decoder layers, assembled from the shared layers.

Pre-norm residual blocks: h += attn(norm(h)); h += mlp(norm(h)); SiLU-gated MLP; scores scaled by
head_dim ** -0.5; Qwen3 RMS-normalises q and k per head; Qwen2 has q/k/v biases but none on o_proj.
"""

from __future__ import annotations

from tpserve.model.layers import Attention, DecoderLayer, GatedMLP, LayerLoader
from tpserve.model.rope import Rotary


def norm_offset(cfg) -> None:
    return None  # llama-style RMSNorm: scale after the cast back


def layer(load: LayerLoader, i: int) -> DecoderLayer:
    cfg, p, hd, hidden = load.cfg, f"model.layers.{i}", load.cfg.head_dim, load.cfg.hidden_size
    q_norm = k_norm = None
    if cfg.qk_norm:
        q_norm = load.norm(f"{p}.self_attn.q_norm.weight", hd)
        k_norm = load.norm(f"{p}.self_attn.k_norm.weight", hd)
    attn = Attention(load, i, scale=hd ** -0.5, q_norm=q_norm, k_norm=k_norm,
                     o_bias=cfg.attention_bias and cfg.arch != "qwen2")
    return DecoderLayer(load.norm(f"{p}.input_layernorm.weight", hidden), attn,
                        load.norm(f"{p}.post_attention_layernorm.weight", hidden),
                        GatedMLP(load, i, "silu"))


def kv_producer(cfg):
    return lambda i: i  # every layer owns its k/v


def rotaries(cfg, device) -> dict[str, Rotary]:
    return {"": Rotary(cfg.rope, cfg.head_dim, device)}
