"""One rank's part of a decoder (llama, mistral, qwen2, qwen3): every layer's local heads and MLP rows.

The residual stream h [T, hidden] is replicated on every rank; each row-parallel layer ends in an
all-reduce, so after it every rank holds the same h again. The embedding, the final norm and the
lm_head live at the coordinator (`tpserve.model.head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import ModelConfig, QuantConfig
from tpserve.model.kv_cache import KVCache, StepPlan, attention
from tpserve.model.linear import ColumnParallelLinear, RowParallelLinear
from tpserve.model.rope import Rotary
from tpserve.model.shard_plan import ShardPlan


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    @classmethod
    def load(cls, ckpt: Checkpoint, name: str, size: int, eps: float, dtype: torch.dtype):
        return cls(ckpt.read(name, shape=(size,)).to(dtype), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers: normalise in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, ckpt: Checkpoint, prefix: str, cfg: ModelConfig, quant: QuantConfig | None,
                 plan: ShardPlan, comm, layer: int, dtype: torch.dtype, device):
        super().__init__()
        r, hd, hidden = comm.rank, cfg.head_dim, cfg.hidden_size
        shard = plan.ranks[r]
        self.layer, self.num_heads, self.num_kv = layer, shard.num_q_heads, shard.num_kv_heads
        self.head_dim, self.window = hd, cfg.window_of(layer)
        q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd

        def column(name, out):
            _, cols = plan.linear_spans(r, f"self_attn.{name}", hidden, out)
            return ColumnParallelLinear.load(ckpt, f"{prefix}.{name}", quant, hidden, out, cols,
                                             dtype, bias=cfg.attention_bias)

        self.q_proj, self.k_proj, self.v_proj = column("q_proj", q_out), column("k_proj", kv_out), \
            column("v_proj", kv_out)
        rows, _ = plan.linear_spans(r, "self_attn.o_proj", q_out, hidden)
        # Qwen2 has q/k/v biases but none on o_proj; llama's attention_bias covers o_proj too.
        self.o_proj = RowParallelLinear.load(ckpt, f"{prefix}.o_proj", quant, q_out, hidden, rows,
                                             dtype, comm, bias=cfg.attention_bias and cfg.arch != "qwen2")
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm.load(ckpt, f"{prefix}.q_norm.weight", hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm.load(ckpt, f"{prefix}.k_norm.weight", hd, cfg.rms_norm_eps, dtype)
        self.kv_map = torch.tensor(plan.kv_map(r), dtype=torch.long, device=device)
        self.scale = hd ** -0.5

    def forward(self, x, cos, sin, cache: KVCache, plan: StepPlan) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # (T, heads, hd)
        k = self.k_proj(x).view(t, self.num_kv, self.head_dim)  # (T, kv_heads, hd)
        v = self.v_proj(x).view(t, self.num_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        o = attention(q, k, v, cache, self.layer, plan, self.kv_map, self.scale, self.window)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class MLP(torch.nn.Module):
    def __init__(self, ckpt: Checkpoint, prefix: str, cfg: ModelConfig, quant: QuantConfig | None,
                 plan: ShardPlan, comm, dtype: torch.dtype):
        super().__init__()
        r, hidden, inter = comm.rank, cfg.hidden_size, cfg.intermediate_size
        _, cols = plan.linear_spans(r, "mlp.gate_proj", hidden, inter)
        self.gate_proj = ColumnParallelLinear.load(ckpt, f"{prefix}.gate_proj", quant, hidden, inter,
                                                   cols, dtype, bias=cfg.mlp_bias)
        self.up_proj = ColumnParallelLinear.load(ckpt, f"{prefix}.up_proj", quant, hidden, inter,
                                                 cols, dtype, bias=cfg.mlp_bias)
        rows, _ = plan.linear_spans(r, "mlp.down_proj", inter, hidden)
        self.down_proj = RowParallelLinear.load(ckpt, f"{prefix}.down_proj", quant, inter, hidden,
                                                rows, dtype, comm, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(torch.nn.Module):
    def __init__(self, ckpt, cfg: ModelConfig, quant, plan, comm, layer: int, dtype, device):
        super().__init__()
        p, eps, hidden = f"model.layers.{layer}", cfg.rms_norm_eps, cfg.hidden_size
        self.input_layernorm = RMSNorm.load(ckpt, f"{p}.input_layernorm.weight", hidden, eps, dtype)
        self.self_attn = Attention(ckpt, f"{p}.self_attn", cfg, quant, plan, comm, layer, dtype,
                                   device)
        self.post_attention_layernorm = RMSNorm.load(ckpt, f"{p}.post_attention_layernorm.weight",
                                                     hidden, eps, dtype)
        self.mlp = MLP(ckpt, f"{p}.mlp", cfg, quant, plan, comm, dtype)

    def forward(self, h, cos, sin, cache, plan):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, plan)
        return h + self.mlp(self.post_attention_layernorm(h))


class RankModel(torch.nn.Module):
    """Every decoder layer's local shard on one rank, plus that rank's KV cache."""

    def __init__(self, path, cfg: ModelConfig, quant: QuantConfig | None, plan: ShardPlan, comm,
                 dtype: torch.dtype, device="cpu", num_slots: int = 8, max_len: int | None = None,
                 progress=None):
        super().__init__()
        self.cfg, self.comm, self.dtype, self.device = cfg, comm, dtype, torch.device(device)
        self.ckpt = ckpt = Checkpoint(path, device=device)
        layers = []
        for i in range(cfg.num_layers):
            layers.append(DecoderLayer(ckpt, cfg, quant, plan, comm, i, dtype, device))
            if progress is not None:
                progress(i + 1, cfg.num_layers)
        self.layers = torch.nn.ModuleList(layers)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, device)
        shard = plan.ranks[comm.rank]
        self.cache = KVCache(cfg.num_layers, num_slots, max_len or cfg.max_position,
                             shard.num_kv_heads, cfg.head_dim, dtype, device)

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, plan: StepPlan, capture: list | None = None) -> torch.Tensor:
        """h [T, hidden] -> the last layer's output [T, hidden] (before the final norm).

        `capture`, when given, receives every layer's output (for `tpserve verify`).
        """
        self.cache.check(plan)
        cos, sin = self.rotary.cos_sin(plan.positions(self.device), h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, self.cache, plan)
            if capture is not None:
                capture.append(h)
        return h


def build_rank_model(path, cfg: ModelConfig, quant: QuantConfig | None, plan: ShardPlan, comm,
                     dtype: torch.dtype, device="cpu", num_slots: int = 8,
                     max_len: int | None = None) -> torch.nn.Module:
    """The rank-side model class for the checkpoint's architecture."""
    if cfg.gemma is not None:
        from tpserve.model.gemma import GemmaRankModel
        return GemmaRankModel(path, cfg, quant, plan, comm, dtype, device, num_slots, max_len)
    return RankModel(path, cfg, quant, plan, comm, dtype, device, num_slots, max_len)
