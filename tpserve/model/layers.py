"""The layers every decoder is assembled from, one class per concept, each differing by parameters:
RMSNorm (llama's or Gemma's (offset + w) form), attention (GQA, window, soft-cap, q/k/v norms, KV
sharing), the gated MLP (its activation), the decoder layer as two halves, and `LayerLoader`,
which reads one rank's part of each linear as the shard plan says.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tpserve.kernels import fixed_sum
from tpserve.kernels.attention import decode_attention
from tpserve.kernels.fused import add_rms_norm, rms_norm, silu_mul
from tpserve.kernels.rotary import rotary, rotary_store
from tpserve.model.cache_attention import attention, fresh_attention
from tpserve.model.kv_cache import DecodeMeta, KVCache, StepPlan
from tpserve.model.gptq_shard import group_order
from tpserve.model.linear import Linear, MergedLinear

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(torch.nn.Module):
    """x / rms(x), normalised in fp32, then scaled.

    offset None (llama family, as transformers): cast back, then multiply by w. A float offset
    (Gemma): multiply by (offset + w) in fp32, then cast back; Gemma 2/3 store w as an offset from
    1, Gemma 4 as is (offset 0). weight None: no scale at all (Gemma 4's v norm).

    `out_perm`: the output's columns in this order (the act-order GEMV it feeds reads x so,
    `DecoderLayer.fold_input_orders`).
    """

    def __init__(self, weight: torch.Tensor | None, eps: float, offset: float | None = None):
        super().__init__()
        self.weight, self.eps, self.offset = weight, eps, offset
        self.out_perm: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, perm=self.out_perm)

    def after_add(self, h: torch.Tensor, r: torch.Tensor):
        """(h + r, norm(h + r)) in one kernel on a GPU."""
        return add_rms_norm(h, r, self.weight, self.eps, self.offset, perm=self.out_perm)


class LayerLoader:
    """Reads this rank's part of decoder layer weights; every split comes from the shard plan."""

    def __init__(self, ckpt, cfg, quant, plan, rank: int, dtype: torch.dtype, device,
                 norm_offset: float | None = None):
        self.ckpt, self.cfg, self.quant, self.plan, self.rank = ckpt, cfg, quant, plan, rank
        self.dtype, self.device, self.norm_offset = dtype, device, norm_offset

    def linear(self, layer: int, name: str, in_features: int, out_features: int,
               bias: bool = False, prefix: str | None = None, rows=None) -> Linear:
        """`rows` (an index tensor) replaces the plan's row span (an MLP's channels)."""
        span, cols = self.plan.linear_spans(self.rank, name, in_features, out_features, layer)
        rows = span if rows is None else rows
        return Linear.load(self.ckpt, prefix or f"model.layers.{layer}.{name}", self.quant,
                           in_features, out_features, rows, cols, self.dtype, bias, self.rank)

    def merged(self, layer: int, names: list[str], in_features: int, outs: list[int],
               bias: bool = False, cols=None) -> MergedLinear:
        """`cols` (an index tensor) replaces every part's column span (an MLP's channels)."""
        spans = [self.plan.linear_spans(self.rank, n, in_features, o, layer)[1] if cols is None
                 else cols for n, o in zip(names, outs)]
        return MergedLinear.load(self.ckpt, [f"model.layers.{layer}.{n}" for n in names],
                                 self.quant, in_features, list(zip(outs, spans)), self.dtype, bias)

    def mlp_channels(self, layer: int, prefix: str, inter: int, hidden: int):
        """This rank's intermediate channels in down_proj's group order (an index tensor), or None
        (the plan's span in checkpoint order) where down_proj is not act-order
        (`gptq_shard.group_order`). TPSERVE_MLP_GROUP_ORDER=0 keeps the checkpoint's order (A/B)."""
        if os.environ.get("TPSERVE_MLP_GROUP_ORDER", "1") == "0":
            return None
        order = group_order(self.ckpt, f"model.layers.{layer}.{prefix}.down_proj", inter)
        if order is None:
            return None
        k0, k1 = self.plan.linear_spans(self.rank, f"{prefix}.down_proj", inter, hidden, layer)[0]
        return order[k0:k1]

    def norm(self, name: str, size: int, weighted: bool = True) -> RMSNorm:
        w = self.ckpt.read(name, shape=(size,)).to(self.dtype) if weighted else None
        return RMSNorm(w, self.cfg.rms_norm_eps, self.norm_offset if weighted else 0.0)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.ckpt.read(name, shape=shape).to(self.dtype)


class Attention(torch.nn.Module):
    """This rank's heads: q/k/v as one GEMV, norms, rope, attention over the slot cache, o_proj.

    forward returns o_proj's partial product (summed across ranks by the decoder). A KV-sharing
    layer has no k/v projections: it reads what its producer layer wrote to the cache this step.
    """

    def __init__(self, load: LayerLoader, layer: int, *, scale: float, shares_kv: bool = False,
                 k_is_v: bool = False, q_norm=None, k_norm=None, v_norm=None,
                 softcap: float | None = None, o_bias: bool | None = None):
        super().__init__()
        cfg, hidden, bias = load.cfg, load.cfg.hidden_size, load.cfg.attention_bias
        split = load.plan.head_split(layer)
        hd, r = split.head_dim, load.rank
        self.num_heads = split.q_heads[r][1] - split.q_heads[r][0]
        self.num_kv = split.kv_heads[r][1] - split.kv_heads[r][0]
        self.head_dim, self.scale, self.softcap = hd, scale, softcap
        self.window, self.shares_kv = cfg.window_of(layer), shares_kv
        q_out, kv_out = cfg.num_heads * hd, split.num_kv_heads * hd
        names = ["self_attn.q_proj"] + ([] if shares_kv else
                                        ["self_attn.k_proj"] + ([] if k_is_v else ["self_attn.v_proj"]))
        outs = [q_out] + [kv_out] * (len(names) - 1)
        self.qkv_proj = load.merged(layer, names, hidden, outs, bias)
        self.proj_names = names
        self.o_proj = load.linear(layer, "self_attn.o_proj", q_out, hidden,
                                  bias if o_bias is None else o_bias)
        self.q_norm, self.k_norm, self.v_norm = q_norm, k_norm, v_norm
        kv_map = split.kv_map(r)
        self.kv_map = torch.tensor(kv_map, dtype=torch.long, device=load.device)
        # The decode kernel reads kv head h // group for local q head h; a rank whose replicated
        # kv heads do not line up that way (rare uneven GQA splits) decodes through the loop.
        self.kv_group = self.num_heads // self.num_kv
        self.batched_decode = kv_map == [h // self.kv_group for h in range(self.num_heads)]
        self.fixed_sums = None  # whose fixed-point buffers q/k/v and o use (`RankModel`)

    def forward(self, x, cos, sin, cache: KVCache, index: int, plan: StepPlan,
                decode: DecodeMeta | None = None, fixed_out: bool = False) -> torch.Tensor:
        """`fixed_out`: o_proj may return a fixed-point sum (`fixed_sum.py`) for the caller's
        consumer; q/k/v take that form on their own where rotary_store is their only reader."""
        t = x.shape[0]
        fixed = (self.fixed_sums is not None and decode is not None and self.batched_decode
                 and len(self.proj_names) == 3
                 and self.q_norm is None and self.k_norm is None and self.v_norm is None)
        proj = self.qkv_proj(x, f"{self.fixed_sums}.qkv" if fixed else None)
        q = proj[0].view(t, self.num_heads, self.head_dim)  # (T, heads, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k_cache, v_cache = cache.k[index], cache.v[index]
        if decode is not None and self.batched_decode:
            # One token per sequence, static shapes, no host sync: the graph-captured path.
            if self.shares_kv:  # a KV-sharing layer reads what its producer wrote this step
                q = rotary(q, cos, sin)
            else:
                k, v = self._kv(proj, t)
                q = rotary_store(q, k, v, cos, sin, k_cache, v_cache, decode.slots,
                                 decode.positions)
            o = decode_attention(q, k_cache, v_cache, decode.slots, decode.lens, self.kv_group,
                                 self.scale, self.window, self.softcap)
        elif plan.is_fresh and len(plan.slots) == 1 and not self.shares_kv:
            # One sequence's first prefill: rope on q and k and the cache write in one kernel,
            # then attention on its rows of the cache (views: its keys are this step's own).
            k, v = self._kv(proj, t)
            slot, dev = plan.slots[0], q.device
            q = rotary_store(q, k, v, cos, sin, k_cache, v_cache, plan.row_slots(dev),
                             plan.positions(dev))
            o = fresh_attention(q, k_cache[slot, :t], v_cache[slot, :t], plan, self.kv_map,
                                self.scale, self.window, self.softcap,
                                self.kv_group if self.batched_decode else None)
        else:
            q = rotary(q, cos, sin)
            if self.shares_kv:
                # The producer layer wrote this step's k/v earlier in the step; attention()
                # writes them back unchanged and reads the producer's cache.
                spans = list(zip(plan.slots, plan.starts, plan.lens))
                k = torch.cat([k_cache[s, a:a + n] for s, a, n in spans])  # (T, kv_heads, hd)
                v = torch.cat([v_cache[s, a:a + n] for s, a, n in spans])
            else:
                k, v = self._kv(proj, t)
                k = rotary(k, cos, sin)
            o = attention(q, k, v, cache, index, plan, self.kv_map, self.scale, self.window,
                          self.softcap, self.kv_group if self.batched_decode else None)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim),
                           f"{self.fixed_sums}.o" if fixed_out else None)

    def _kv(self, proj, t: int):
        """This step's k (normed, before rope) and v, (T, kv_heads, hd) each."""
        k = proj[1].view(t, self.num_kv, self.head_dim)
        v = k if len(proj) == 2 else proj[2].view(t, self.num_kv, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return k, v

    def linears(self) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
        """Linear name -> (module whose input is its input, W fp32 [K, N]), for verify."""
        parts = dict(zip(self.proj_names, self.qkv_proj.dense_parts()))
        if "self_attn.v_proj" not in parts and not self.shares_kv:
            parts["self_attn.v_proj"] = parts["self_attn.k_proj"]
        out = {n: (self.qkv_proj, w) for n, w in parts.items()}
        out["self_attn.o_proj"] = (self.o_proj, self.o_proj.dense())
        return out


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)); gate/up as one GEMV; returns down's partial product.

    The intermediate channels are free to reorder (gate/up's columns and down's rows alike): with
    an act-order down_proj they are taken in its group order, so that each rank's down shard holds
    whole groups and runs the aligned kernels, at any tp (`LayerLoader.mlp_channels`)."""

    def __init__(self, load: LayerLoader, layer: int, activation: str, prefix: str = "mlp",
                 width: int | None = None):
        super().__init__()
        hidden, inter = load.cfg.hidden_size, width or load.cfg.intermediate_size
        self.prefix, self.act = prefix, ACTIVATIONS[activation]
        self.channels = load.mlp_channels(layer, prefix, inter, hidden)
        self.gate_up_proj = load.merged(layer, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], hidden,
                                        [inter, inter], load.cfg.mlp_bias, cols=self.channels)
        self.down_proj = load.linear(layer, f"{prefix}.down_proj", inter, hidden, load.cfg.mlp_bias,
                                     rows=self.channels)
        # whose fixed-point buffers gate/up and down use; (gate/up's, the one it clears): RankModel
        self.fixed_sums = self.gated_roles = None

    def forward(self, x: torch.Tensor, fixed_out: bool = False) -> torch.Tensor:
        """`fixed_out`: down_proj may return a fixed-point sum (`fixed_sum.py`); gate/up do for
        silu_mul, or (`gated_roles`: one fp16 GPU row, no hooks) for down_proj's GEMV to read."""
        out = f"{self.fixed_sums}.down" if fixed_out else None
        if self.gated_roles and x.is_cuda and x.shape[0] == 1 and fixed_sum.fits(x.dtype) and not (
                self.gate_up_proj._forward_pre_hooks or self.down_proj._forward_pre_hooks):
            return self.down_proj(self.gate_up_proj.joined(x, *self.gated_roles), out)
        fixed = (silu := self.act is F.silu) and self.fixed_sums is not None
        gate, up = self.gate_up_proj(x, f"{self.fixed_sums}.gate_up" if fixed else None)
        act = silu_mul(gate, up, dtype=x.dtype) if silu else self.act(gate) * up
        return self.down_proj(act, out)

    def linears(self) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
        (gate, up), p = self.gate_up_proj.dense_parts(), self.prefix
        return {f"{p}.gate_proj": (self.gate_up_proj, gate), f"{p}.up_proj": (self.gate_up_proj, up),
                f"{p}.down_proj": (self.down_proj, self.down_proj.dense())}


class DecoderLayer(torch.nn.Module):
    """h += attn_out(all_reduce(attn(attn_norm(h)))); h += mlp_out(all_reduce(mlp(mlp_norm(h)))).

    attn_out / mlp_out are Gemma's sandwich norms (None: identity). `moe` (Gemma 4) adds a routed
    expert block whose partial joins the MLP's in the same all-reduce; `per_layer` (Gemma 4's
    per-layer inputs) and `layer_scalar` finish the layer without communication.
    """

    def __init__(self, attn_norm, self_attn, mlp_norm, mlp, attn_out=None, mlp_out=None,
                 moe=None, per_layer=None, layer_scalar: torch.Tensor | None = None,
                 layer_type: str = ""):
        super().__init__()
        self.attn_norm, self.self_attn, self.attn_out = attn_norm, self_attn, attn_out
        self.mlp_norm, self.mlp, self.mlp_out = mlp_norm, mlp, mlp_out
        self.moe, self.per_layer, self.layer_scalar = moe, per_layer, layer_scalar
        self.layer_type = layer_type
        self.fold_input_orders()

    def fold_input_orders(self) -> None:
        """An act-order q/k/v or gate/up GEMV reads x through its rows' permutation, gathered in
        every program of the kernel; its norm (the only producer of its input) writes x in that
        order instead: one gather in the norm kernel, aligned reads in the GEMV."""
        for norm, merged in ((self.attn_norm, getattr(self.self_attn, "qkv_proj", None)),
                             (self.mlp_norm, getattr(self.mlp, "gate_up_proj", None))):
            linear = getattr(merged, "joined", None)
            if isinstance(norm, RMSNorm) and norm.out_perm is None and linear is not None:
                norm.out_perm = linear.take_input_order()

    def attn_partial(self, h, cos, sin, cache, index: int, plan, decode, normed=None,
                     fixed_out: bool = False):
        """`normed`: attn_norm(h) where the caller already has it; `fixed_out`: the partial may
        be a fixed-point sum (`fixed_sum.py`), which the caller's residual add + norm takes."""
        x = self.attn_norm(h) if normed is None else normed
        return self.self_attn(x, cos, sin, cache, index, plan, decode, fixed_out)

    def attn_residual(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return h + (attn if self.attn_out is None else self.attn_out(attn))

    def mlp_partial(self, h: torch.Tensor, normed: torch.Tensor | None = None,
                    fixed_out: bool = False) -> torch.Tensor:
        """`fixed_out`: as `attn_partial` (not with experts: their partial joins the MLP's)."""
        x = self.mlp_norm(h) if normed is None else normed
        if self.moe is not None:
            return self.moe.partial(h, self.mlp(x))
        return self.mlp(x, fixed_out)

    def plain_residual(self, mlp_half: int) -> bool:
        """Whether the half's residual is h + sum alone (no sandwich norm, experts, per-layer
        input or scalar), so it can be fused with the next half's norm."""
        if not mlp_half:
            return self.attn_out is None
        return (self.mlp_out is None and self.moe is None and self.per_layer is None
                and self.layer_scalar is None)

    def mlp_residual(self, h: torch.Tensor, f: torch.Tensor, ple: torch.Tensor | None):
        if self.moe is not None:
            f = self.moe.combine(f)
        h = h + (f if self.mlp_out is None else self.mlp_out(f))
        if self.per_layer is not None:
            h = self.per_layer(h, ple)
        return h if self.layer_scalar is None else h * self.layer_scalar

    def linears(self) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
        """Linear name (as in the shard plan) -> (module fed its input, W fp32 [K, N])."""
        return {**self.self_attn.linears(), **self.mlp.linears()}
