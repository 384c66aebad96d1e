"""Gemma 4's routed experts (`enable_moe_block`): a router replicated on every rank and experts
split exactly like the MLP (gate/up columns, down rows, the shard plan's `experts` unit), so a
rank's down rows may start inside a quantization group: exact global-group offsets as everywhere.

The router (RMS norm, scale, proj, softmax, top-k, renormalise, per-expert scale) runs on every
rank from the same h, so every rank picks the same experts; its proj is dequantized to a dense
weight at load when the checkpoint stores it GPTQ-packed (AutoRound does). The dense MLP's and the
experts' partial sums travel in one all-reduce (`MoEBlock.partial` / `combine`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpserve.model.gptq_shard import GPTQWeight
from tpserve.model.layers import ACTIVATIONS, LayerLoader, RMSNorm
from tpserve.model.linear import matmul, read_linear_weight

_gelu_tanh = ACTIVATIONS["gelu_tanh"]


class Expert(torch.nn.Module):
    """One expert's local columns/rows: dense [out, in] tensors, or GPTQ shards."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial of the expert's output (summed across ranks by the caller)."""
        return matmul(_gelu_tanh(matmul(x, self.gate)) * matmul(x, self.up), self.down)


def load_experts(load: LayerLoader, prefix: str, cols: tuple[int, int]) -> list[Expert]:
    """Every expert's shard: gate/up columns `cols` of [hidden -> inter], down rows `cols`.

    Three layouts: per-expert linears `experts.{e}.{gate,up,down}_proj` (vLLM, llm-compressor,
    GPTQModel), AutoRound's unfused `experts.gate_up_proj.{e}` [hidden -> 2 x inter] +
    `experts.down_proj.{e}`, or transformers' fused dense `experts.gate_up_proj` [E, 2I, H] +
    `experts.down_proj` [E, H, I].
    """
    g, hidden, ckpt = load.cfg.gemma, load.cfg.hidden_size, load.ckpt
    num, inter, (a, b) = g.num_experts, g.moe_intermediate_size, cols
    whole = (0, hidden)  # gate/up read every input row, down every output column

    def read(name, k, n, rows, columns):
        return read_linear_weight(ckpt, f"{prefix}.{name}", load.quant, k, n, rows, columns,
                                  load.dtype)

    def has(name):
        return f"{prefix}.{name}.qweight" in ckpt or f"{prefix}.{name}.weight" in ckpt

    if has("0.down_proj"):
        return [Expert(read(f"{e}.gate_proj", hidden, inter, whole, cols),
                       read(f"{e}.up_proj", hidden, inter, whole, cols),
                       read(f"{e}.down_proj", inter, hidden, cols, whole)) for e in range(num)]
    if has("down_proj.0"):
        return [Expert(read(f"gate_up_proj.{e}", hidden, 2 * inter, whole, cols),
                       read(f"gate_up_proj.{e}", hidden, 2 * inter, whole, (inter + a, inter + b)),
                       read(f"down_proj.{e}", inter, hidden, cols, whole)) for e in range(num)]
    # Fused dense tensors: 3-D, so read whole (unquantized checkpoints only) and slice.
    gate_up = ckpt.read(f"{prefix}.gate_up_proj", shape=(num, 2 * inter, hidden))
    down = ckpt.read(f"{prefix}.down_proj", shape=(num, hidden, inter))
    dt = load.dtype
    return [Expert(gate_up[e, a:b].to(dt), gate_up[e, inter + a:inter + b].to(dt),
                   down[e, :, a:b].contiguous().to(dt)) for e in range(num)]


class Router(torch.nn.Module):
    """Replicated on every rank: (top-k weights, top-k expert ids) per token."""

    def __init__(self, load: LayerLoader, prefix: str):
        super().__init__()
        g, hidden = load.cfg.gemma, load.cfg.hidden_size
        proj = read_linear_weight(load.ckpt, f"{prefix}.proj", load.quant, hidden, g.num_experts,
                                  (0, hidden), (0, g.num_experts), load.dtype)
        # Small ([experts, hidden]) and read by every token: dequantize a GPTQ router once, here.
        self.proj = proj.dequantize(torch.float32).T.to(load.dtype) \
            if isinstance(proj, GPTQWeight) else proj
        self.scale = load.tensor(f"{prefix}.scale", (hidden,))
        self.per_expert_scale = load.tensor(f"{prefix}.per_expert_scale", (g.num_experts,))
        self.norm = RMSNorm(None, load.cfg.rms_norm_eps, 0.0)
        self.root, self.top_k = hidden ** -0.5, g.top_k_experts

    def forward(self, h: torch.Tensor):
        x = self.norm(h) * self.scale * self.root
        probs = F.linear(x, self.proj).softmax(-1, dtype=torch.float32)  # (T, E)
        weights, index = probs.topk(self.top_k, dim=-1)  # (T, k)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(torch.nn.Module):
    def __init__(self, load: LayerLoader, layer: int):
        super().__init__()
        g = load.cfg.gemma
        _, cols = load.plan.linear_spans(load.rank, "experts.gate_proj", load.cfg.hidden_size,
                                         g.moe_intermediate_size, layer)
        self.experts = torch.nn.ModuleList(load_experts(load, f"model.layers.{layer}.experts", cols))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (T, H), weights/index (T, k) -> this rank's partial of the weighted sum (T, H)."""
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            tok, k = (index == e).nonzero(as_tuple=True)  # tokens routed to e, and at which top-k
            y = self.experts[e](x[tok]) * weights[tok, k, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class MoEBlock(torch.nn.Module):
    """The expert half beside a layer's dense MLP: one all-reduce carries [dense | routed]."""

    def __init__(self, load: LayerLoader, layer: int):
        super().__init__()
        p, hidden = f"model.layers.{layer}", load.cfg.hidden_size
        self.router = Router(load, f"{p}.router")
        self.experts = Experts(load, layer)
        self.post_dense_norm = load.norm(f"{p}.post_feedforward_layernorm_1.weight", hidden)
        self.pre_experts_norm = load.norm(f"{p}.pre_feedforward_layernorm_2.weight", hidden)
        self.post_experts_norm = load.norm(f"{p}.post_feedforward_layernorm_2.weight", hidden)

    def partial(self, h: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """h, the dense MLP's partial (T, H) -> [dense | routed] partials (T, 2H)."""
        weights, chosen = self.router(h)  # (T, top_k) each
        routed = self.experts(self.pre_experts_norm(h), weights, chosen)
        return torch.cat([dense, routed], dim=-1)

    def combine(self, both: torch.Tensor) -> torch.Tensor:
        dense, routed = both.chunk(2, dim=-1)
        return self.post_dense_norm(dense) + self.post_experts_norm(routed)
