"""Model config: a small frozen dataclass that validates itself, and `load_configs`.

`load_configs(path)` reads `config.json` and the GPTQ quantization config (`quant_config.py`) and
refuses anything tpserve cannot run exactly, in one sentence that names the key, the value and what
is supported. Gemma's extra fields are read in `gemma_config.py`, rope settings in `rope_config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tpserve.errors import ConfigError
from tpserve.model.gemma_config import GEMMA_ARCHS, GemmaConfig, read_gemma
from tpserve.model.quant_config import QuantConfig, load_quant_config, read_json
from tpserve.model.rope_config import SUPPORTED_ROPE, RopeConfig

__all__ = ["ModelConfig", "QuantConfig", "RopeConfig", "load_configs"]

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3") + GEMMA_ARCHS
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(name, where: str) -> torch.dtype:
    name = str(name or "float16").replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"{where} dtype={name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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
            layer_types = tuple(d["layer_types"]) if window and d.get("layer_types") else ()
            gemma, max_position, tied = None, 4096, False
            if arch in GEMMA_ARCHS:
                # Gemma's rope settings are per layer type: the generic reader does not apply.
                (head_dim, window, layer_types, rope, gemma, max_position,
                 tied) = read_gemma(arch, d, num_layers, kv_heads)
            else:
                rope = RopeConfig.from_config(d)
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


def load_configs(path: str | Path) -> tuple[ModelConfig, QuantConfig | None]:
    """Read a checkpoint folder's model config and GPTQ config (None for an unquantized model)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model path {str(path)!r} does not exist or is not a folder; pass a "
                          f"local checkpoint folder holding config.json and *.safetensors")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json; pass a Hugging Face-style checkpoint folder")
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path / 'config.json'} does not hold a JSON object; re-download it")
    return ModelConfig.from_dict(raw), load_quant_config(path, raw)
