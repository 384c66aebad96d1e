"""What Gemma 2, 3 and 4 add to a decoder, read from config.json as transformers 5.23 reads it:
layer types, the two rope settings (full and sliding layers), soft-caps, Gemma 4's full-attention
head shape, per-layer embeddings, KV sharing and MoE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from tpserve.errors import ConfigError
from tpserve.model.rope_config import RopeConfig

if TYPE_CHECKING:
    from tpserve.model.config import ModelConfig

GEMMA_ARCHS = ("gemma2", "gemma3_text", "gemma4_text")
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass(frozen=True)
class GemmaConfig:
    """What Gemma 2, 3 and 4 add to a decoder, as transformers 5.23 reads their config.json.

    Sliding-window layers use `ModelConfig.head_dim` / `num_kv_heads` and `rope_sliding`; full
    attention layers use `full_head_dim` / `full_kv_heads` (Gemma 4's global_head_dim and
    num_global_key_value_heads) and `ModelConfig.rope`.
    """

    version: int  # 2, 3 or 4
    attn_scale: float  # query_pre_attn_scalar ** -0.5 (Gemma 2/3); 1.0 (Gemma 4: q/k are normed)
    attn_softcap: float | None  # Gemma 2 only (Gemma 3 reads the key but never applies it)
    final_softcap: float | None
    rope_sliding: RopeConfig
    full_head_dim: int
    full_kv_heads: int
    k_eq_v: bool = False  # Gemma 4 full layers: v is the k projection (no v_proj)
    ple_dim: int = 0  # hidden_size_per_layer_input (0: no per-layer embeddings)
    ple_vocab: int = 0
    kv_shared_layers: int = 0  # the last n layers reuse an earlier layer's k/v
    double_wide_mlp: bool = False  # KV-shared layers have 2 x intermediate_size
    num_experts: int = 0  # enable_moe_block: a routed MoE beside the dense MLP in every layer
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    @property
    def norm_offset(self) -> float:
        """Gemma 2/3 store RMSNorm weights as an offset from 1 (x * (1 + w)); Gemma 4 as is."""
        return 1.0 if self.version < 4 else 0.0

    def validate(self, cfg: "ModelConfig") -> None:
        where = "config.json"
        if self.full_head_dim <= 0 or self.full_kv_heads <= 0:
            raise ConfigError(f"{where}: global_head_dim={self.full_head_dim} and "
                              f"num_global_key_value_heads={self.full_kv_heads} must be positive")
        if cfg.num_heads % self.full_kv_heads:
            raise ConfigError(f"{where}: num_attention_heads={cfg.num_heads} is not a multiple of "
                              f"the full-attention layers' num_key_value_heads={self.full_kv_heads}")
        if not 0 <= self.kv_shared_layers < cfg.num_layers:
            raise ConfigError(f"{where}: num_kv_shared_layers={self.kv_shared_layers} must be in "
                              f"[0, num_hidden_layers={cfg.num_layers})")
        if self.kv_shared_layers:
            first = cfg.num_layers - self.kv_shared_layers
            if set(cfg.layer_types[first:]) - set(cfg.layer_types[:first]):
                raise ConfigError(f"{where}: num_kv_shared_layers={self.kv_shared_layers} leaves a "
                                  f"shared layer type with no earlier layer of its type to reuse")
        if self.num_experts and not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(f"{where}: top_k_experts={self.top_k_experts} must be in [1, "
                              f"num_experts={self.num_experts}]")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError(f"{where}: moe_intermediate_size={self.moe_intermediate_size} must be "
                              f"positive when enable_moe_block is set")
        if self.ple_dim and self.ple_vocab < cfg.vocab_size:
            raise ConfigError(f"{where}: vocab_size_per_layer_input={self.ple_vocab} is smaller than "
                              f"vocab_size={cfg.vocab_size}; token ids past it have no per-layer "
                              f"embedding")

    def kv_producer(self, cfg: "ModelConfig", layer: int) -> int | None:
        """For a KV-shared layer, the earlier layer whose k/v it reads; None for other layers.

        As transformers' `kv_sharing_modes`: the last non-shared layer of the same layer type.
        """
        first = cfg.num_layers - self.kv_shared_layers
        if not self.kv_shared_layers or layer < first:
            return None
        kind = cfg.layer_types[layer]
        return max(i for i in range(first) if cfg.layer_types[i] == kind)


def _gemma_layer_types(arch: str, d: dict, num_layers: int) -> tuple[str, ...]:
    """layer_types, or the default each config class derives when config.json omits it."""
    types = d.get("layer_types")
    if not types:
        # gemma2: every other layer slides; gemma3/4: `sliding_window_pattern` (5 sliding : 1 full)
        period = 2 if arch == "gemma2" else int(d.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % period else "full_attention"
                 for i in range(num_layers)]
    types = list(types)
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ConfigError(f"config.json: layer_types holds {bad}; Gemma layers are "
                          f"'sliding_attention' or 'full_attention'")
    if arch == "gemma4_text" and types:
        types[-1] = "full_attention"  # Gemma4TextConfig forces the last layer to full attention
    return tuple(types)


def _gemma_ropes(arch: str, d: dict) -> tuple[RopeConfig, RopeConfig]:
    """(full-attention rope, sliding-window rope) as the Gemma config classes standardise them."""
    if arch == "gemma2":
        rope = RopeConfig.from_config(d)
        return rope, rope
    p = d.get("rope_parameters") or {}
    if arch == "gemma4_text" and not p:  # Gemma4TextConfig's defaults
        p = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
             "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                "rope_theta": 1_000_000.0}}
    if "full_attention" in p or "sliding_attention" in p:
        full, sliding = dict(p.get("full_attention") or {}), dict(p.get("sliding_attention") or {})
    else:  # Gemma 3's older keys: rope_theta for full layers, rope_local_base_freq for sliding
        full, sliding = dict(p), {"rope_theta": d.get("rope_local_base_freq", 10_000.0)}
    if arch == "gemma3_text":  # Gemma3TextConfig applies rope_scaling to the full layers
        full.update(d.get("rope_scaling") or {})
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    sliding.setdefault("rope_theta", 10_000.0)
    return (RopeConfig.from_config({"rope_parameters": full}),
            RopeConfig.from_config({"rope_parameters": sliding}))


def _gemma_full_layer_shape(d: dict, types: tuple[str, ...], head_dim: int,
                            kv_heads: int) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of Gemma 4's full-attention layers.

    config.json says it either as `global_head_dim` / `num_global_key_value_heads` (the latter only
    when attention_k_eq_v), or, when saved by transformers >= 5.23, as a sparse `per_layer_config`
    {layer index: {head_dim, num_key_value_heads}} over the full-attention layers.
    """
    overrides = d.get("per_layer_config")
    if overrides is None:
        kv = d.get("num_global_key_value_heads") if d.get("attention_k_eq_v", False) else None
        return int(d.get("global_head_dim") or 512), int(kv or kv_heads)
    per_layer = {}
    for key, over in dict(overrides).items():
        unknown = set(over or {}) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(f"config.json: per_layer_config[{key!r}] overrides {sorted(unknown)}; "
                              f"tpserve supports per-layer head_dim and num_key_value_heads")
        layers = ([i for i, t in enumerate(types) if t == key] if key in types
                  else [int(key)])
        for i in layers:
            per_layer[i] = (int(over.get("head_dim", head_dim)),
                            int(over.get("num_key_value_heads", kv_heads)))
    shapes = {t: {per_layer.get(i, (head_dim, kv_heads)) for i, kind in enumerate(types)
                  if kind == t} for t in set(types)}
    if shapes.get("sliding_attention", {(head_dim, kv_heads)}) != {(head_dim, kv_heads)} or \
            len(shapes.get("full_attention", ())) > 1:
        raise ConfigError(f"config.json: per_layer_config gives layers of one type different head "
                          f"shapes ({shapes}); tpserve supports one shape per layer type")
    return next(iter(shapes.get("full_attention", {(head_dim, kv_heads)})))


def _gemma_config(arch: str, d: dict, types: tuple[str, ...], head_dim: int,
                  kv_heads: int) -> GemmaConfig:
    version = {"gemma2": 2, "gemma3_text": 3, "gemma4_text": 4}[arch]
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GEMMA_ACTIVATIONS:
        raise ConfigError(f"config.json: hidden_activation={act!r} is not supported for "
                          f"model_type={arch!r}; tpserve runs {GEMMA_ACTIVATIONS}")
    bidirectional = d.get("use_bidirectional_attention")
    if bidirectional and bidirectional != "vision":
        raise ConfigError(f"config.json: use_bidirectional_attention={bidirectional!r} is not "
                          f"supported; tpserve serves causal decoders")
    _, sliding = _gemma_ropes(arch, d)
    full_hd, full_kv = (_gemma_full_layer_shape(d, types, head_dim, kv_heads) if version == 4
                        else (head_dim, kv_heads))
    cap = d.get("attn_logit_softcapping", 50.0) if version == 2 else None
    final = d.get("final_logit_softcapping", 30.0 if version == 2 else None)
    moe = version == 4 and bool(d.get("enable_moe_block"))
    ple = int(d.get("hidden_size_per_layer_input", 256) or 0) if version == 4 else 0
    return GemmaConfig(
        version=version,
        attn_scale=1.0 if version == 4 else float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=float(cap) if cap else None, final_softcap=float(final) if final else None,
        rope_sliding=sliding, full_head_dim=full_hd, full_kv_heads=full_kv,
        k_eq_v=version == 4 and bool(d.get("attention_k_eq_v", False)),
        ple_dim=ple, ple_vocab=int(d.get("vocab_size_per_layer_input", 262_144)) if ple else 0,
        kv_shared_layers=int(d.get("num_kv_shared_layers") or 0) if version == 4 else 0,
        double_wide_mlp=version == 4 and bool(d.get("use_double_wide_mlp", False)),
        num_experts=int(d.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(d.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(d.get("moe_intermediate_size") or 0) if moe else 0)


class GemmaFields(NamedTuple):
    """What a Gemma config.json sets in ModelConfig (the Gemma config classes' defaults applied)."""

    head_dim: int
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope: RopeConfig  # the full-attention layers'
    gemma: GemmaConfig
    max_position: int  # used when config.json omits max_position_embeddings
    tied: bool  # used when config.json omits tie_word_embeddings


def read_gemma(arch: str, d: dict, num_layers: int, kv_heads: int) -> GemmaFields:
    window = d.get("sliding_window", 512 if arch == "gemma4_text" else 4096)
    head_dim = int(d.get("head_dim") or 256)
    layer_types = _gemma_layer_types(arch, d, num_layers)
    return GemmaFields(head_dim=head_dim, sliding_window=window, layer_types=layer_types,
                       rope=_gemma_ropes(arch, d)[0],
                       gemma=_gemma_config(arch, d, layer_types, head_dim, kv_heads),
                       max_position=8192 if arch == "gemma2" else 131_072, tied=True)
