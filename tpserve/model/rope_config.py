"""Rotary position settings as config.json states them (`rope_parameters`, or the older
`rope_theta` + `rope_scaling`), read into one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from tpserve.errors import ConfigError

SUPPORTED_ROPE = ("default", "linear", "llama3", "proportional")  # proportional: Gemma 4 only


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
