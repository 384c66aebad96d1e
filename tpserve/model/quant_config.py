"""GPTQ quantization config: a frozen dataclass that validates itself, its per-module `dynamic`
overrides, and where checkpoints keep it (`config.json["quantization_config"]`, else
`quantize_config.json`, else `quantization_config.json`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tpserve.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
# per-module `dynamic` keys -> QuantConfig field (None: accepted, no effect on the packed format)
DYNAMIC_KEYS = {"bits": "bits", "group_size": "group_size", "sym": "sym", "desc_act": "desc_act",
                "mse": None, "damp_percent": None}
QUANT_CONFIG_FILES = ("quantize_config.json", "quantization_config.json")


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
        dynamic = _dynamic(d.get("dynamic") or {}, source)
        for key in ("bits", "group_size"):
            if key not in d:
                raise ConfigError(f"{source}: the key {key!r} is missing; a GPTQ config needs "
                                  f"bits and group_size")
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]),
                   desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)),
                   v1=fmt == "gptq", lm_head=bool(d.get("lm_head", False)), source=source,
                   dynamic=dynamic)


def _dynamic(overrides: dict, source: str) -> tuple[tuple[str, tuple], ...]:
    """GPTQModel/AutoRound `dynamic` {pattern: {key: value}} as (pattern, sorted overrides)."""
    dynamic = []
    for pattern, over in overrides.items():
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
    return tuple(dynamic)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or "
                          f"re-download the file") from None


def load_quant_config(path: Path, raw: dict) -> QuantConfig | None:
    """The GPTQ config of the checkpoint folder `path` whose config.json holds `raw`; None when
    the folder has none (an unquantized model)."""
    if isinstance(raw.get("quantization_config"), dict):
        return QuantConfig.from_dict(raw["quantization_config"], "config.json[quantization_config]")
    for name in QUANT_CONFIG_FILES:
        if (path / name).is_file():
            return QuantConfig.from_dict(read_json(path / name), name)
    return None
