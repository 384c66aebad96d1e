"""Rotary position embeddings as transformers computes them (default, linear and llama3 scaling, and
Gemma 4's proportional rope)."""

from __future__ import annotations

import math

import torch

from tpserve.model.config import RopeConfig


def inv_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    if rope.kind == "proportional":
        # Only the first partial_rotary_factor of the frequencies turn, the rest are 0 (cos 1,
        # sin 0), over the full head_dim.
        angles = int(rope.partial_rotary_factor * dim // 2)
        turning = 1.0 / rope.theta ** (torch.arange(0, 2 * angles, 2).float() / dim)
        return torch.cat([turning, torch.zeros(dim // 2 - angles)]) / rope.factor
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class Rotary:
    def __init__(self, rope: RopeConfig, head_dim: int, device="cpu"):
        self.inv_freq = inv_frequencies(rope, head_dim).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)
