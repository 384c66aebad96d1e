"""Gemma 2, 3 and 4 text decoders (transformers 5.23 semantics), one rank's part, plus Gemma 4's
per-layer embedding inputs (PLE), which the coordinator computes.

What differs from the llama-family `tpserve.model.llama`, checked against transformers' modeling files:
- RMSNorm in fp32; Gemma 2/3 store the weight as an offset (x * (1 + w)), Gemma 4 as is (x * w).
- Sandwich norms: each of attention and MLP output is normed before its residual add.
- gelu-tanh MLP; scores scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3) or 1 (Gemma 4, whose
  q and k are RMS-normed); attention logit soft-capping (Gemma 2).
- `layer_types`: sliding-window and full layers, each type with its own rope (Gemma 3/4) and, in
  Gemma 4, its own head_dim / kv heads; Gemma 4 full layers may take v from the k projection
  (attention_k_eq_v); v is RMS-normed without a scale; every layer output is multiplied by its
  stored `layer_scalar`.
- KV sharing (Gemma 4 `num_kv_shared_layers`): the last n layers have no k/v projections and attend
  over the cache of the last earlier layer of their type; they own no cache memory.
- MoE (Gemma 4 `enable_moe_block`): a routed expert block beside the dense MLP in every layer.
  Each expert is tensor-parallel exactly like the MLP (gate/up columns, down rows, the same split
  units, so a rank's down rows may start inside a quantization group: exact global-group offsets
  as everywhere). The router (RMS norm, scale, proj, softmax, top-k, renormalise, per-expert
  scale) is replicated on every rank, its proj dequantized to a dense weight at load when the
  checkpoint stores it GPTQ-packed (AutoRound does): every rank picks the same experts from the
  same h. The dense MLP's and the experts' partial sums travel in one all-reduce.

Per-layer embeddings (Gemma 4 `hidden_size_per_layer_input`): `PerLayerInputs` lives at the
coordinator beside the main embedding. Per token it gathers one row of `embed_tokens_per_layer`
[vocab, layers x ple_dim] (a table as large as several decoder layers, held once, never as an
lm_head), adds the projection of the scaled embedding, and the coordinator ships the result with h
as extra columns of the one step tensor: `[h | ple]`, [T, hidden + layers x ple_dim]. The wire
format and executors are unchanged; the rank model splits the columns. Each layer's small gate
(hidden -> ple_dim) and projection (ple_dim -> hidden) are replicated on every rank, so PLE adds no
all-reduce.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import ModelConfig, QuantConfig, RopeConfig
from tpserve.model.gptq_shard import GPTQWeight
from tpserve.kernels import gptq_matmul
from tpserve.model.kv_cache import KVCache, StepPlan, attention
from tpserve.model.linear import ColumnParallelLinear, RowParallelLinear, read_linear_weight
from tpserve.model.rope import Rotary, inv_frequencies
from tpserve.model.shard_plan import ShardPlan

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaRMSNorm(torch.nn.Module):
    """x / rms(x) * (offset + w), in fp32, cast back (w None: no scale, Gemma 4's v norm)."""

    def __init__(self, weight: torch.Tensor | None, eps: float, offset: float):
        super().__init__()
        self.weight, self.eps = weight, eps
        self.scale = None if weight is None else offset + weight.float()

    @classmethod
    def load(cls, ckpt: Checkpoint, name: str, size: int, eps: float, dtype: torch.dtype,
             offset: float) -> "GemmaRMSNorm":
        return cls(ckpt.read(name, shape=(size,)).to(dtype), eps, offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf if self.scale is None else xf * self.scale).to(x.dtype)


class GemmaRotary(Rotary):
    """Rotary with Gemma 4's `proportional` rope: only the first partial_rotary_factor of the
    frequencies turn, the rest are 0 (cos 1, sin 0), over the full head_dim."""

    def __init__(self, rope: RopeConfig, head_dim: int, device="cpu"):
        if rope.kind != "proportional":
            inv = inv_frequencies(rope, head_dim)
        else:
            angles = int(rope.partial_rotary_factor * head_dim // 2)
            turning = 1.0 / rope.theta ** (torch.arange(0, 2 * angles, 2).float() / head_dim)
            inv = torch.cat([turning, torch.zeros(head_dim // 2 - angles)]) / rope.factor
        self.inv_freq = inv.to(device)


class _Deferred:
    """The comm of a row-parallel layer whose partial its caller reduces together with another."""

    def __init__(self, rank: int):
        self.rank = rank

    @staticmethod
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        return x


def _replicated(ckpt, prefix, quant, in_features, out_features, dtype) -> ColumnParallelLinear:
    """A linear every rank holds whole (a column-parallel layer with every column)."""
    return ColumnParallelLinear.load(ckpt, prefix, quant, in_features, out_features,
                                     (0, out_features), dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _mm(x: torch.Tensor, w: GPTQWeight | torch.Tensor) -> torch.Tensor:
    """x @ W for a GPTQ shard [K, N] or a dense weight [N, K]."""
    return gptq_matmul(x, w) if isinstance(w, GPTQWeight) else F.linear(x, w)


class GemmaMLP(torch.nn.Module):
    """gelu-tanh gated MLP; gate/up column-parallel, down row-parallel over `plan`'s MLP rows."""

    def __init__(self, ckpt, prefix: str, hidden: int, inter: int, quant, plan: ShardPlan, comm,
                 dtype):
        super().__init__()
        _, cols = plan.linear_spans(comm.rank, "mlp.gate_proj", hidden, inter)
        rows, _ = plan.linear_spans(comm.rank, "mlp.down_proj", inter, hidden)
        self.gate_proj = ColumnParallelLinear.load(ckpt, f"{prefix}.gate_proj", quant, hidden,
                                                   inter, cols, dtype)
        self.up_proj = ColumnParallelLinear.load(ckpt, f"{prefix}.up_proj", quant, hidden, inter,
                                                 cols, dtype)
        self.down_proj = RowParallelLinear.load(ckpt, f"{prefix}.down_proj", quant, inter, hidden,
                                                rows, dtype, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class _Expert(torch.nn.Module):
    """One expert's local columns/rows: dense [out, in] tensors, or GPTQ shards."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial of the expert's output (summed across ranks by the caller)."""
        return _mm(_gelu_tanh(_mm(x, self.gate)) * _mm(x, self.up), self.down)


def _load_experts(ckpt: Checkpoint, prefix: str, num: int, quant, hidden: int, inter: int,
                  cols: tuple[int, int], dtype) -> list[_Expert]:
    """Every expert's shard: gate/up columns `cols` of [hidden -> inter], down rows `cols`.

    Three layouts: per-expert linears `experts.{e}.{gate,up,down}_proj` (vLLM, llm-compressor,
    GPTQModel), AutoRound's unfused `experts.gate_up_proj.{e}` [hidden -> 2 x inter] +
    `experts.down_proj.{e}`, or transformers' fused dense `experts.gate_up_proj` [E, 2I, H] +
    `experts.down_proj` [E, H, I].
    """
    a, b = cols
    whole = (0, hidden)  # gate/up read every input row, down every output column

    def read(name, k, n, rows, columns):
        return read_linear_weight(ckpt, f"{prefix}.{name}", quant, k, n, rows, columns, dtype)

    def has(name):
        return f"{prefix}.{name}.qweight" in ckpt or f"{prefix}.{name}.weight" in ckpt

    if has("0.down_proj"):
        return [_Expert(read(f"{e}.gate_proj", hidden, inter, whole, cols),
                        read(f"{e}.up_proj", hidden, inter, whole, cols),
                        read(f"{e}.down_proj", inter, hidden, cols, whole)) for e in range(num)]
    if has("down_proj.0"):
        return [_Expert(read(f"gate_up_proj.{e}", hidden, 2 * inter, whole, cols),
                        read(f"gate_up_proj.{e}", hidden, 2 * inter, whole, (inter + a, inter + b)),
                        read(f"down_proj.{e}", inter, hidden, cols, whole)) for e in range(num)]
    # Fused dense tensors: 3-D, so read whole (unquantized checkpoints only) and slice.
    gate_up = ckpt.read(f"{prefix}.gate_up_proj", shape=(num, 2 * inter, hidden))
    down = ckpt.read(f"{prefix}.down_proj", shape=(num, hidden, inter))
    return [_Expert(gate_up[e, a:b].to(dtype), gate_up[e, inter + a:inter + b].to(dtype),
                    down[e, :, a:b].contiguous().to(dtype)) for e in range(num)]


class Router(torch.nn.Module):
    """Gemma 4's router, replicated on every rank: (top-k weights, top-k expert ids) per token."""

    def __init__(self, ckpt: Checkpoint, prefix: str, cfg: ModelConfig, quant, dtype):
        super().__init__()
        g, hidden = cfg.gemma, cfg.hidden_size
        proj = read_linear_weight(ckpt, f"{prefix}.proj", quant, hidden, g.num_experts,
                                  (0, hidden), (0, g.num_experts), dtype)
        # Small ([experts, hidden]) and read by every token: dequantize a GPTQ router once, here.
        self.proj = proj.dequantize(torch.float32).T.to(dtype) if isinstance(proj, GPTQWeight) \
            else proj
        self.scale = ckpt.read(f"{prefix}.scale", shape=(hidden,)).to(dtype)
        self.per_expert_scale = ckpt.read(f"{prefix}.per_expert_scale",
                                          shape=(g.num_experts,)).to(dtype)
        self.norm = GemmaRMSNorm(None, cfg.rms_norm_eps, 0.0)
        self.root, self.top_k = hidden ** -0.5, g.top_k_experts

    def forward(self, h: torch.Tensor):
        x = self.norm(h) * self.scale * self.root
        probs = F.linear(x, self.proj).softmax(-1, dtype=torch.float32)  # (T, E)
        weights, index = probs.topk(self.top_k, dim=-1)  # (T, k)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(torch.nn.Module):
    def __init__(self, ckpt, prefix: str, cfg: ModelConfig, quant, plan: ShardPlan, rank: int,
                 dtype):
        super().__init__()
        g, hidden = cfg.gemma, cfg.hidden_size
        _, cols = plan.linear_spans(rank, "mlp.gate_proj", hidden, g.moe_intermediate_size)
        self.experts = torch.nn.ModuleList(_load_experts(
            ckpt, prefix, g.num_experts, quant, hidden, g.moe_intermediate_size, cols, dtype))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (T, H), weights/index (T, k) -> this rank's partial of the weighted sum (T, H)."""
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            tok, k = (index == e).nonzero(as_tuple=True)  # tokens routed to e, and at which top-k
            y = self.experts[e](x[tok]) * weights[tok, k, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class LayerCaches:
    """KV caches grouped by layer type, since Gemma 4's full layers have their own head shape.

    `where[i]` is layer i's (cache, index); a KV-shared layer points at its producer's entry.
    Offers the `max_len`, `nbytes` and `check` of a `KVCache`.
    """

    def __init__(self, groups: dict[str, KVCache], where: list[tuple[KVCache, int]]):
        self.groups, self.where = groups, where
        first = next(iter(groups.values()))
        self.num_slots, self.max_len = first.num_slots, first.max_len

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.groups.values())

    def check(self, plan: StepPlan) -> None:
        next(iter(self.groups.values())).check(plan)


class GemmaAttention(torch.nn.Module):
    def __init__(self, ckpt, prefix: str, cfg: ModelConfig, quant, plan: ShardPlan, comm,
                 layer: int, dtype, device, shared: bool):
        super().__init__()
        g, r, hidden = cfg.gemma, comm.rank, cfg.hidden_size
        full = cfg.layer_types[layer] == FULL
        hd, kv_heads = plan.config.head_dim, plan.config.num_kv_heads
        shard = plan.ranks[r]
        self.num_heads, self.num_kv, self.head_dim = shard.num_q_heads, shard.num_kv_heads, hd
        self.window, self.scale, self.softcap = cfg.window_of(layer), g.attn_scale, g.attn_softcap
        self.shared = shared
        q_out, kv_out, bias = cfg.num_heads * hd, kv_heads * hd, cfg.attention_bias

        def column(name, out):
            _, cols = plan.linear_spans(r, f"self_attn.{name}", hidden, out)
            return ColumnParallelLinear.load(ckpt, f"{prefix}.{name}", quant, hidden, out, cols,
                                             dtype, bias=bias)

        def norm(name, size, weighted=True):
            if not weighted:
                return GemmaRMSNorm(None, cfg.rms_norm_eps, 0.0)
            return GemmaRMSNorm.load(ckpt, f"{prefix}.{name}.weight", size, cfg.rms_norm_eps, dtype,
                                     g.norm_offset)

        self.q_proj = column("q_proj", q_out)
        self.k_proj = self.v_proj = self.q_norm = self.k_norm = self.v_norm = None
        if not shared:  # a KV-shared layer has no k/v projections or norms
            self.k_proj = column("k_proj", kv_out)
            if not (g.k_eq_v and full):  # else v is the k projection's output, before k_norm
                self.v_proj = column("v_proj", kv_out)
        if g.version >= 3:
            self.q_norm = norm("q_norm", hd)
            if not shared:
                self.k_norm = norm("k_norm", hd)
        if g.version >= 4 and not shared:
            self.v_norm = norm("v_norm", hd, weighted=False)
        rows, _ = plan.linear_spans(r, "self_attn.o_proj", q_out, hidden)
        self.o_proj = RowParallelLinear.load(ckpt, f"{prefix}.o_proj", quant, q_out, hidden, rows,
                                             dtype, comm, bias=bias)
        self.kv_map = torch.tensor(plan.kv_map(r), dtype=torch.long, device=device)

    def forward(self, x, cos, sin, cache: KVCache, index: int, plan: StepPlan) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # (T, heads, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = Rotary.apply(q, cos, sin)
        if self.shared:
            # The producer layer wrote this step's k/v earlier in the step; attention() writes
            # them back unchanged and reads the producer's cache.
            k = torch.cat([cache.k[index][s, a:a + n] for s, a, n in
                           zip(plan.slots, plan.starts, plan.lens)])  # (T, kv_heads, hd)
            v = torch.cat([cache.v[index][s, a:a + n] for s, a, n in
                           zip(plan.slots, plan.starts, plan.lens)])
        else:
            k = self.k_proj(x).view(t, self.num_kv, self.head_dim)  # (T, kv_heads, hd)
            v = k if self.v_proj is None else self.v_proj(x).view(t, self.num_kv, self.head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.v_norm is not None:
                v = self.v_norm(v)
            k = Rotary.apply(k, cos, sin)
        o = attention(q, k, v, cache, index, plan, self.kv_map, self.scale, self.window,
                      self.softcap)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class GemmaDecoderLayer(torch.nn.Module):
    def __init__(self, ckpt, cfg: ModelConfig, quant, plans: dict[str, ShardPlan], comm,
                 layer: int, dtype, device):
        super().__init__()
        g, hidden, eps = cfg.gemma, cfg.hidden_size, cfg.rms_norm_eps
        p, r = f"model.layers.{layer}", comm.rank
        shared = g.kv_producer(cfg, layer) is not None
        self.layer_type = cfg.layer_types[layer]

        def norm(name, size=hidden):
            return GemmaRMSNorm.load(ckpt, f"{p}.{name}.weight", size, eps, dtype, g.norm_offset)

        self.input_layernorm = norm("input_layernorm")
        self.self_attn = GemmaAttention(ckpt, f"{p}.self_attn", cfg, quant, plans[self.layer_type],
                                        comm, layer, dtype, device, shared)
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")
        wide = shared and g.double_wide_mlp
        mlp_plan = plans["wide_mlp" if wide else "base"]
        self.moe = g.num_experts > 0
        # With MoE, the MLP's partial joins the experts' partial in one all-reduce (forward).
        self.comm = comm
        self.mlp = GemmaMLP(ckpt, f"{p}.mlp", hidden, mlp_plan.config.intermediate_size, quant,
                            mlp_plan, _Deferred(r) if self.moe else comm, dtype)
        if self.moe:
            self.router = Router(ckpt, f"{p}.router", cfg, quant, dtype)
            self.experts = Experts(ckpt, f"{p}.experts", cfg, quant, plans["experts"], r, dtype)
            self.post_feedforward_layernorm_1 = norm("post_feedforward_layernorm_1")
            self.pre_feedforward_layernorm_2 = norm("pre_feedforward_layernorm_2")
            self.post_feedforward_layernorm_2 = norm("post_feedforward_layernorm_2")
        self.per_layer_input_gate = self.per_layer_projection = None
        if g.ple_dim:  # replicated: small, and sharding them would cost a third all-reduce
            self.per_layer_input_gate = _replicated(ckpt, f"{p}.per_layer_input_gate", quant,
                                                    hidden, g.ple_dim, dtype)
            self.per_layer_projection = _replicated(ckpt, f"{p}.per_layer_projection", quant,
                                                    g.ple_dim, hidden, dtype)
            self.post_per_layer_input_norm = norm("post_per_layer_input_norm")
        self.layer_scalar = (ckpt.read(f"{p}.layer_scalar", shape=(1,)).to(dtype)
                             if g.version >= 4 else None)

    def forward(self, h, ple, cos, sin, cache, index, plan):
        a = self.self_attn(self.input_layernorm(h), cos, sin, cache, index, plan)
        h = h + self.post_attention_layernorm(a)
        if not self.moe:
            f = self.mlp(self.pre_feedforward_layernorm(h))
        else:
            dense = self.mlp(self.pre_feedforward_layernorm(h))  # partial
            weights, chosen = self.router(h)  # (T, top_k) each
            routed = self.experts(self.pre_feedforward_layernorm_2(h), weights, chosen)  # partial
            both = self.comm.all_reduce(torch.cat([dense, routed], dim=-1))  # (T, 2 x hidden)
            dense, routed = both.chunk(2, dim=-1)
            f = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(routed)
        h = h + self.post_feedforward_layernorm(f)
        if self.per_layer_input_gate is not None:
            x = _gelu_tanh(self.per_layer_input_gate(h)) * ple
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(x))
        return h if self.layer_scalar is None else h * self.layer_scalar


def layer_plans(cfg: ModelConfig, base: ShardPlan) -> dict[str, ShardPlan]:
    """Shard plans by shape: `base` (the config's heads and MLP) serves sliding layers and the MLP;
    full layers get Gemma 4's global head shape; the double-wide MLP and experts their widths."""
    g, tp = cfg.gemma, base.tp
    plans = {"base": base, SLIDING: base, FULL: base}
    if (g.full_head_dim, g.full_kv_heads) != (cfg.head_dim, cfg.num_kv_heads):
        plans[FULL] = ShardPlan.build(
            replace(cfg, head_dim=g.full_head_dim, num_kv_heads=g.full_kv_heads), tp)
    if g.double_wide_mlp:
        plans["wide_mlp"] = ShardPlan.build(
            replace(cfg, intermediate_size=2 * cfg.intermediate_size), tp)
    if g.num_experts:
        plans["experts"] = ShardPlan.build(
            replace(cfg, intermediate_size=g.moe_intermediate_size), tp)
    return plans


class GemmaRankModel(torch.nn.Module):
    """Every Gemma decoder layer's local shard on one rank, plus that rank's KV caches.

    The step input is [h | ple] (see the module docstring); the output is the last layer's h.
    """

    def __init__(self, path, cfg: ModelConfig, quant: QuantConfig | None, plan: ShardPlan, comm,
                 dtype: torch.dtype, device="cpu", num_slots: int = 8, max_len: int | None = None,
                 progress=None):
        super().__init__()
        g = cfg.gemma
        self.cfg, self.comm, self.dtype, self.device = cfg, comm, dtype, torch.device(device)
        self.ckpt = ckpt = Checkpoint(path, device=device)
        plans = layer_plans(cfg, plan)
        layers = []
        for i in range(cfg.num_layers):
            layers.append(GemmaDecoderLayer(ckpt, cfg, quant, plans, comm, i, dtype, device))
            if progress is not None:
                progress(i + 1, cfg.num_layers)
        self.layers = torch.nn.ModuleList(layers)
        types = sorted(set(cfg.layer_types))
        self.rotary = {SLIDING: GemmaRotary(g.rope_sliding, cfg.head_dim, device),
                       FULL: GemmaRotary(cfg.rope, g.full_head_dim, device)}
        # One cache per layer type, holding only the layers that produce k/v.
        owners = {t: [i for i in range(cfg.num_layers) if cfg.layer_types[i] == t and
                      g.kv_producer(cfg, i) is None] for t in types}
        length = max_len or cfg.max_position
        groups = {t: KVCache(len(owners[t]), num_slots, length,
                             plans[t].ranks[comm.rank].num_kv_heads, plans[t].config.head_dim,
                             dtype, device) for t in types}
        where = []
        for i in range(cfg.num_layers):
            src = g.kv_producer(cfg, i)
            src = i if src is None else src
            t = cfg.layer_types[src]
            where.append((groups[t], owners[t].index(src)))
        self.cache = LayerCaches(groups, where)
        self.ple_width = cfg.num_layers * g.ple_dim

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, plan: StepPlan, capture: list | None = None) -> torch.Tensor:
        """[h | ple] [T, hidden + layers x ple_dim] -> the last layer's output [T, hidden].

        `capture`, when given, receives every layer's output (for `tpserve verify`).
        """
        cfg, t = self.cfg, x.shape[0]
        assert x.shape[1] == cfg.hidden_size + self.ple_width, (x.shape, self.ple_width)
        self.cache.check(plan)
        h, ple = x[:, :cfg.hidden_size], None
        if self.ple_width:
            ple = x[:, cfg.hidden_size:].reshape(t, cfg.num_layers, cfg.gemma.ple_dim)
        pos = plan.positions(self.device)
        cos_sin = {k: r.cos_sin(pos, h.dtype) for k, r in self.rotary.items()}
        for i, layer in enumerate(self.layers):
            cache, index = self.cache.where[i]
            cos, sin = cos_sin[layer.layer_type]
            h = layer(h, None if ple is None else ple[:, i], cos, sin, cache, index, plan)
            if capture is not None:
                capture.append(h)
        return h


class PerLayerInputs:
    """Gemma 4's per-layer embedding inputs, at the coordinator: ids + scaled embedding -> [T, L*P].

    As transformers' `get_per_layer_inputs` + `project_per_layer_inputs`:
    (rmsnorm(W_proj @ e * hidden^-0.5) + table[id] * sqrt(P)) * 2^-0.5, per layer's P columns.
    The table stays as stored (the compute dtype): lm_head modes never touch it.
    """

    TABLE, PROJECTION = "model.embed_tokens_per_layer.weight", "model.per_layer_model_projection"
    NORM = "model.per_layer_projection_norm.weight"

    def __init__(self, table: torch.Tensor, projection, norm: GemmaRMSNorm, cfg: ModelConfig,
                 dtype: torch.dtype):
        self.table, self.projection, self.norm = table, projection, norm
        self.layers, self.dim = cfg.num_layers, cfg.gemma.ple_dim
        self.table_scale = torch.tensor(self.dim ** 0.5, dtype=dtype)
        self.projection_scale = cfg.hidden_size ** -0.5

    @classmethod
    def load(cls, ckpt: Checkpoint, cfg: ModelConfig, quant, dtype) -> "PerLayerInputs":
        g, width = cfg.gemma, cfg.num_layers * cfg.gemma.ple_dim
        table = ckpt.read(cls.TABLE, shape=(g.ple_vocab, width)).to(dtype)
        proj = read_linear_weight(ckpt, cls.PROJECTION, quant, cfg.hidden_size, width,
                                  (0, cfg.hidden_size), (0, width), dtype)
        norm = GemmaRMSNorm.load(ckpt, cls.NORM, g.ple_dim, cfg.rms_norm_eps, dtype, g.norm_offset)
        return cls(table, proj, norm, cfg, dtype)

    @property
    def nbytes(self) -> int:
        p = self.projection
        return (self.table.numel() * self.table.element_size() + self.norm.weight.numel() *
                self.norm.weight.element_size() +
                (p.nbytes if isinstance(p, GPTQWeight) else p.numel() * p.element_size()))

    def __call__(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """ids [T], the scaled main embedding [T, hidden] -> [T, layers x ple_dim]."""
        t = ids.shape[0]
        token = (self.table[ids] * self.table_scale).view(t, self.layers, self.dim)
        proj = _mm(embedded, self.projection) * self.projection_scale  # (T, layers x ple_dim)
        proj = self.norm(proj.view(t, self.layers, self.dim))
        return ((proj + token) * 2 ** -0.5).reshape(t, self.layers * self.dim)
