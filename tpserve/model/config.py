"""Model and GPTQ quantization configs: small frozen dataclasses that validate themselves.

`load_configs(path)` reads `config.json` and the quantization config (from
`config.json["quantization_config"]`, else `quantize_config.json`, else
`quantization_config.json`) and refuses anything tpserve cannot run exactly, in one sentence that
names the key, the value and what is supported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tpserve.errors import ConfigError

GEMMA_ARCHS = ("gemma2", "gemma3_text", "gemma4_text")
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3") + GEMMA_ARCHS
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_ROPE = ("default", "linear", "llama3", "proportional")  # proportional: Gemma 4 only
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
# per-module `dynamic` keys -> QuantConfig field (None: accepted, no effect on the packed format)
DYNAMIC_KEYS = {"bits": "bits", "group_size": "group_size", "sym": "sym", "desc_act": "desc_act",
                "mse": None, "damp_percent": None}
QUANT_CONFIG_FILES = ("quantize_config.json", "quantization_config.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(name, where: str) -> torch.dtype:
    name = str(name or "float16").replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"{where} dtype={name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class QuantConfig:
    """GPTQ quantization of the checkpoint's linear layers.

    `v1` is GPTQ's original zero convention (stored zero = zero - 1, `format: gptq`, also AutoRound's
    `auto_round:auto_gptq`); v2 stores zeros as they are (`gptq_v2`).
    """

    bits: int
    group_size: int  # -1: one group spanning all of K
    desc_act: bool
    sym: bool
    v1: bool
    lm_head: bool
    source: str = "config.json"
    # GPTQModel/AutoRound `dynamic`: regex -> overrides ({} or a "-:" prefix: not quantized).
    dynamic: tuple[tuple[str, tuple], ...] = ()

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"{self.source}: bits={self.bits} is not supported; tpserve reads "
                              f"GPTQ bits {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"{self.source}: group_size={self.group_size} is invalid; use a "
                              f"positive group size or -1 (one group per column)")

    def for_module(self, name: str) -> "QuantConfig | None":
        """This module's settings after `dynamic` overrides; None when it is left unquantized."""
        for pattern, overrides in self.dynamic:
            negative = pattern.startswith("-:")
            if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, name):
                if negative:
                    return None
                return replace(self, dynamic=(), **dict(overrides)) if overrides else self
        return self

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "QuantConfig":
        method = str(d.get("quant_method", "gptq")).lower()
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        if method in ("auto-round", "auto_round", "intel/auto-round"):
            packing = str(d.get("packing_format", "auto_round:auto_gptq")).lower()
            if packing not in ("auto_round:auto_gptq", "auto_gptq"):
                raise ConfigError(f"{source}: packing_format={packing!r} is not supported; tpserve "
                                  f"reads AutoRound checkpoints saved with format='auto_gptq'")
            fmt = "gptq"
        elif method != "gptq":
            raise ConfigError(f"{source}: quant_method={method!r} is not supported; tpserve serves "
                              f"GPTQ checkpoints (quant_method 'gptq' or AutoRound's auto_gptq packing)")
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(f"{source}: checkpoint_format={fmt!r} is not supported; tpserve reads "
                              f"'gptq' (v1) and 'gptq_v2' packing (re-save marlin/bitblas/awq "
                              f"checkpoints in GPTQ format)")
        pack_dtype = str(d.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise ConfigError(f"{source}: pack_dtype={pack_dtype!r} is not supported; tpserve reads "
                              f"int32-packed GPTQ tensors")
        dynamic = []
        for pattern, over in (d.get("dynamic") or {}).items():
            unknown = set(over or {}) - set(DYNAMIC_KEYS)
            if not isinstance(over, dict) or unknown:
                raise ConfigError(f"{source}: dynamic override {pattern!r} sets {sorted(unknown)}; "
                                  f"tpserve supports per-module {sorted(DYNAMIC_KEYS)}")
            try:
                re.compile(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern)
            except re.error:
                raise ConfigError(f"{source}: dynamic pattern {pattern!r} is not a valid regular "
                                  f"expression") from None
            kept = {DYNAMIC_KEYS[k]: (int(v) if k in ("bits", "group_size") else bool(v))
                    for k, v in over.items() if k in DYNAMIC_KEYS and DYNAMIC_KEYS[k]}
            dynamic.append((pattern, tuple(sorted(kept.items()))))
        for key in ("bits", "group_size"):
            if key not in d:
                raise ConfigError(f"{source}: the key {key!r} is missing; a GPTQ config needs "
                                  f"bits and group_size")
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]),
                   desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)),
                   v1=fmt == "gptq", lm_head=bool(d.get("lm_head", False)), source=source,
                   dynamic=tuple(dynamic))


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    partial_rotary_factor: float = 1.0  # proportional: the share of head_dim that is rotated

    def __post_init__(self):
        if self.kind not in SUPPORTED_ROPE:
            raise ConfigError(f"config.json: rope_type={self.kind!r} is not supported; use one of "
                              f"{SUPPORTED_ROPE}")

    @classmethod
    def from_config(cls, d: dict) -> "RopeConfig":
        # transformers >= 5 writes `rope_parameters`; older configs use rope_theta + rope_scaling.
        p = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        p = {**scaling, **p}
        theta = p.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = p.get("rope_type", p.get("type", "default")) or "default"
        return cls(theta=float(theta), kind=kind, factor=float(p.get("factor", 1.0)),
                   low_freq_factor=float(p.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(p.get("high_freq_factor", 4.0)),
                   original_max_position=int(p.get("original_max_position_embeddings", 8192)),
                   partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)))


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


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rms_norm_eps: float
    rope: RopeConfig
    dtype: torch.dtype
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    gemma: GemmaConfig | None = None  # Gemma 2/3/4 (`tpserve.model.gemma`); rope is the full layers'
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config.json: num_attention_heads={self.num_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"config.json: layer_types has {len(self.layer_types)} entries but "
                              f"num_hidden_layers={self.num_layers}")
        if self.rope.kind == "proportional" and self.gemma is None:
            raise ConfigError(f"config.json: rope_type='proportional' is not supported for "
                              f"model_type={self.arch!r}; use one of {SUPPORTED_ROPE[:3]}")
        if self.gemma is not None:
            self.gemma.validate(self)

    def window_of(self, layer: int) -> int | None:
        """Sliding-window size of a layer, or None for full attention."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(f"config.json: model_type={arch!r} is not supported; tpserve runs "
                              f"{', '.join(SUPPORTED_ARCHS)}")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = d.get("sliding_window")
            if arch in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
                window = None
            num_layers = int(d["num_hidden_layers"])
            kv_heads = int(d.get("num_key_value_heads") or heads)
            head_dim = int(d.get("head_dim") or hidden // heads)
            rope = RopeConfig.from_config(d)
            layer_types = tuple(d["layer_types"]) if window and d.get("layer_types") else ()
            gemma, max_position, tied = None, 4096, False
            if arch in GEMMA_ARCHS:
                # The Gemma config classes' defaults apply when config.json omits a key.
                max_position, tied = (8192 if arch == "gemma2" else 131_072), True
                window = d.get("sliding_window", 512 if arch == "gemma4_text" else 4096)
                head_dim = int(d.get("head_dim") or 256)
                layer_types = _gemma_layer_types(arch, d, num_layers)
                rope = _gemma_ropes(arch, d)[0]
                gemma = _gemma_config(arch, d, layer_types, head_dim, kv_heads)
            return cls(
                arch=arch, hidden_size=hidden, intermediate_size=int(d["intermediate_size"]),
                num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                vocab_size=int(d["vocab_size"]),
                max_position=int(d.get("max_position_embeddings", max_position)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope=rope,
                dtype=_dtype(d.get("dtype") or d.get("torch_dtype"), "config.json"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", tied)),
                # Qwen2 always has q/k/v biases; the others say so in attention_bias.
                attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=arch == "qwen3",
                sliding_window=int(window) if window else None, layer_types=layer_types,
                bos_token_id=d.get("bos_token_id"), eos_token_ids=eos, gemma=gemma, extra=d)
        except KeyError as e:
            raise ConfigError(f"config.json: the key {e.args[0]!r} is missing; it is required "
                              f"for model_type={arch!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json: a value has the wrong type ({e}); compare it with "
                              f"the model's original config.json") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or "
                          f"re-download the file") from None


def load_configs(path: str | Path) -> tuple[ModelConfig, QuantConfig | None]:
    """Read a checkpoint folder's model config and GPTQ config (None for an unquantized model)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model path {str(path)!r} does not exist or is not a folder; pass a "
                          f"local checkpoint folder holding config.json and *.safetensors")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json; pass a Hugging Face-style checkpoint folder")
    raw = _read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path / 'config.json'} does not hold a JSON object; re-download it")
    model = ModelConfig.from_dict(raw)
    quant = None
    if isinstance(raw.get("quantization_config"), dict):
        quant = QuantConfig.from_dict(raw["quantization_config"], "config.json[quantization_config]")
    else:
        for name in QUANT_CONFIG_FILES:
            if (path / name).is_file():
                quant = QuantConfig.from_dict(_read_json(path / name), name)
                break
    return model, quant
