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

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_ROPE = ("default", "linear", "llama3")
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
                   original_max_position=int(p.get("original_max_position_embeddings", 8192)))


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
            return cls(
                arch=arch, hidden_size=hidden, intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                vocab_size=int(d["vocab_size"]),
                max_position=int(d.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope=RopeConfig.from_config(d),
                dtype=_dtype(d.get("dtype") or d.get("torch_dtype"), "config.json"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; the others say so in attention_bias.
                attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=arch == "qwen3",
                sliding_window=int(window) if window else None,
                layer_types=tuple(d["layer_types"]) if window and d.get("layer_types") else (),
                bos_token_id=d.get("bos_token_id"), eos_token_ids=eos, extra=d)
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
