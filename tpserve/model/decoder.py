"""One rank's part of a decoder, as a loop over layer halves with every all-reduce in sight.

The residual stream h [T, hidden] is replicated on every rank. Each half (attention, MLP) computes
this rank's partial product of its row-parallel output; the loop sums the partials across ranks
(`comm.all_reduce`) and the half adds the sum to h. After each all-reduce every rank holds the same
h again. These halves are the segments a captured step replays between all-reduces. The
embedding, the final norm and the lm_head live at the coordinator (`tpserve.model.head`), or on
rank 0 where the coordinator places them there (`tpserve.model.rank_head`).

`llama.py` and `gemma.py` only assemble `DecoderLayer`s (`layers.py`) from the shared layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tpserve.kernels import GPTQWeight, fixed_sum
from tpserve.model import gemma, llama
from tpserve.model.checkpoint import Checkpoint
from tpserve.model.graphs import (PREFILL_GRAPH_POSITIONS, PREFILL_GRAPH_TOKENS, DecodeGraphs,
                                  bucket_for, buckets_for, prefill_buckets, prefill_fits,
                                  prefill_rows)
from tpserve.model.kv_cache import DecodeMeta, LayerCaches, StepPlan
from tpserve.model.layers import DecoderLayer, LayerLoader
from tpserve.model.rope import Rotary

log = logging.getLogger(__name__)


@dataclass
class StepState:
    """What every half of one step reads besides h: rope tables by layer type, the per-layer
    inputs, the plan (eager steps) or its device form (decode steps)."""
    cos_sin: dict
    ple: torch.Tensor | None
    plan: StepPlan | None
    decode: DecodeMeta | None
    normed: torch.Tensor | None = None  # the next half's normed input, from a fused residual add


class RankModel(torch.nn.Module):
    """Every decoder layer's local shard on one rank, its rotaries and its KV caches.

    The step input is h [T, hidden], or [h | ple] [T, hidden + layers x ple_dim] when the model has
    per-layer inputs (the coordinator ships them as extra columns of the one step tensor).
    A decode step (one token per sequence) runs the static-shape path: the same halves with the
    plan as device tensors, replayed from CUDA graphs when `capture_graphs` has run.
    """

    def __init__(self, cfg, comm, layers: list[DecoderLayer], rotary: dict[str, Rotary],
                 cache: LayerCaches, ple_dim: int, ckpt, device):
        super().__init__()
        self.cfg, self.comm, self.ckpt, self.device = cfg, comm, ckpt, torch.device(device)
        self.layers = torch.nn.ModuleList(layers)
        self.rotary, self.cache, self.ple_dim = rotary, cache, ple_dim
        self.num_halves = 2 * len(layers)
        self.batched_decode = all(layer.self_attn.batched_decode for layer in layers)
        # Why the steps cannot be captured (None: they can, on a GPU): routed experts read their
        # routing on the host to pick the experts a step runs (`moe.Experts`), which a CUDA
        # graph cannot do.
        self.not_capturable = ("its routed experts (MoE) pick the experts each step runs on the "
                               "host" if any(layer.moe is not None for layer in layers) else None)
        self.buckets = buckets_for(cache.num_slots)  # decode batch sizes a GPU step runs at
        # token buckets of the prefill steps a GPU rank runs as decode rows (`run_prefill_rows`),
        # captured where the decode step holds the head, for prompts ending within
        # `prefill_positions` (`graphs.prefill_fits`)
        self.prefill_positions = min(PREFILL_GRAPH_POSITIONS, cache.max_len)
        self.prefill_sizes = (prefill_buckets(min(PREFILL_GRAPH_TOKENS,
                                                  cache.num_slots * self.prefill_positions))
                              if self.device.type == "cuda" and self.batched_decode else [])
        self.graphs = None
        self.use_fixed_sums(comm.world_size == 1 and getattr(comm, "capturable", False))

    def use_fixed_sums(self, on: bool) -> None:
        """Decode GEMVs' outputs as fixed-point sums taken by their readers (`fixed_sum.py`),
        where `on` and `fixed_sum.enabled` for the group's size: `on` with one rank in the
        process (ranks sharing a GPU in one process interleave their kernels on its stream), the
        step one captured graph and, at tp > 1, the one-shot all-reduce taking the row-parallel
        partials (the rank worker says so once its group is set up). The buffers are this
        model's (their roles named after it)."""
        on = on and fixed_sum.enabled(self.comm.world_size)
        self.fixed_sums = f"model{id(self):x}" if on else None
        for layer in self.layers:
            for part in (layer.self_attn, layer.mlp):
                if hasattr(part, "fixed_sums"):
                    part.fixed_sums = self.fixed_sums
                if hasattr(part, "gated_roles"):
                    part.gated_roles = None
        gated = [layer.mlp for layer in self.layers if on and reads_gated(layer.mlp)]
        widths = {mlp.gate_up_proj.joined.weight.out_features for mlp in gated}
        # (a gate/up GEMV clears as much of the previous one's buffer as it writes of its own)
        if len(widths) == 1 and fixed_sum.gated_enabled(self.comm.world_size):
            for mlp, roles in zip(gated, gated_roles(len(gated), self.fixed_sums)):
                mlp.gated_roles = roles

    @property
    def width(self) -> int:
        """Columns of the step tensor: hidden, plus the per-layer inputs where the model has them."""
        return self.cfg.hidden_size + self.cfg.num_layers * self.ple_dim

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, plan: StepPlan, capture: list | None = None) -> torch.Tensor:
        """-> the last layer's output [T, hidden] (before the final norm).

        `capture`, when given, receives every layer's output (for `tpserve verify`).
        """
        self.cache.check(plan)
        if plan.is_decode and capture is None and self.batched_decode:
            if self.graphs is not None:
                return self.graphs.run(x, plan)
            if self.device.type == "cuda":
                return self.run_padded(x, plan)
            return self.run(x, None, plan.decode_meta(self.device))
        if capture is None and self.prefill_fits(plan):
            return self.run_prefill_rows(x, plan)
        return self.run(x, plan, None, capture)

    def prefill_fits(self, plan: StepPlan) -> bool:
        """Whether `plan` runs as token rows in a prefill bucket (`graphs.prefill_fits`)."""
        return bool(self.prefill_sizes) and prefill_fits(plan, self.prefill_sizes[-1],
                                                         self.prefill_positions)

    def run(self, x, plan: StepPlan | None, decode: DecodeMeta | None, capture=None):
        """The step as a loop over layer halves, each all-reduce at its call site."""
        state = self.begin(x, plan, decode)
        h = x[:, :self.cfg.hidden_size]
        try:
            for j in range(self.num_halves):
                h = self.reduce_residual(j, h, self.partial(j, h, state), state)
                if capture is not None and j % 2:
                    capture.append(h)
        except BaseException:
            # a GEMV's sum may be waiting for a reader that did not run (a failed capture ran
            # nothing: no reset queued into it)
            if self.fixed_sums is not None and not (self.device.type == "cuda"
                                        and torch.cuda.is_current_stream_capturing()):
                fixed_sum.reset(self.device)
            raise
        return h

    def run_padded(self, x: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The eager decode step at its batch bucket's shape, as the captured step runs it: kernel
        choices (split-K, attention splits) depend on the batch size, so eager and captured steps
        give the same numbers only at the same shape."""
        return self._run_rows(x, plan.slots, plan.starts, self.buckets)

    def run_prefill_rows(self, x: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """A prefill step as a captured one runs it (`graphs.prefill_rows`): its tokens as
        decode rows, padded to the prefill bucket. The eager step of a GPU rank whose graphs
        prefill takes this path too, so eager and captured steps give the same numbers."""
        return self._run_rows(x, *prefill_rows(plan), self.prefill_sizes)

    def _run_rows(self, x: torch.Tensor, slots: list[int], positions: list[int],
                  buckets: list[int]) -> torch.Tensor:
        """x's rows as decode rows at (slot, position), padded to the smallest of `buckets` that
        holds them, the padding aimed at the scratch slot -> the real rows' output."""
        n = x.shape[0]
        size = bucket_for(buckets, n)
        padded = x.new_zeros(size, x.shape[1])
        padded[:n] = x
        meta = DecodeMeta.build(slots, positions, self.device, size,
                                scratch_slot=self.cache.num_slots)
        return self.run(padded, None, meta)[:n]

    def begin(self, x, plan: StepPlan | None, decode: DecodeMeta | None) -> StepState:
        cfg, t = self.cfg, x.shape[0]
        assert x.shape[1] == self.width, x.shape
        ple = None
        if self.ple_dim:
            ple = x[:, cfg.hidden_size:].reshape(t, cfg.num_layers, self.ple_dim)
        pos = decode.positions if decode is not None else plan.positions(self.device)
        cos_sin = {kind: r.cos_sin(pos, x.dtype) for kind, r in self.rotary.items()}
        return StepState(cos_sin, ple, plan, decode)

    def partial(self, j: int, h: torch.Tensor, s: StepState) -> torch.Tensor:
        """This rank's partial product of half j (attention for even j, MLP for odd j)."""
        layer = self.layers[j // 2]
        normed, s.normed = s.normed, None  # h's norm, where the residual add computed it
        fixed = self.takes_fixed(j)
        if j % 2:
            return layer.mlp_partial(h, normed, fixed)
        cache, index = self.cache.where[j // 2]
        cos, sin = s.cos_sin[layer.layer_type]
        return layer.attn_partial(h, cos, sin, cache, index, s.plan, s.decode, normed, fixed)

    def takes_fixed(self, j: int) -> bool:
        """Whether half j's partial may come as a fixed-point sum (`fixed_sum.py`): where
        the next half's residual add + RMSNorm (one program per row, no output order) is its
        only reader."""
        norm = self._next_norm(j)
        return (self.fixed_sums is not None and norm is not None
                and getattr(norm, "out_perm", None) is None
                and self.layers[j // 2].plain_residual(j % 2))

    def reduce_residual(self, j: int, h: torch.Tensor, part: torch.Tensor, s: StepState):
        """h after half j, from this rank's partial: the all-reduce, then `residual`; where the
        group's data path fuses the all-reduce with a plain residual add and the next half's
        RMSNorm (the one-shot GPU path), one kernel."""
        norm = self._next_norm(j)
        if norm is not None and self.layers[j // 2].plain_residual(j % 2):
            fused = getattr(self.comm, "all_reduce_add_norm", None)
            got = None if fused is None else fused(part, h, norm)
            if got is not None:
                h, s.normed = got
                return h
        if fixed_sum.is_fixed(part) and self.comm.world_size > 1:  # a data path without the
            part = fixed_sum.take_reference(part, h.dtype)  # fused kernel (one rank: the norm's)
        return self.residual(j, h, self.comm.all_reduce(part), s)

    def residual(self, j: int, h: torch.Tensor, reduced: torch.Tensor, s: StepState):
        """h after half j. Where the half's residual is a plain add and another half follows, the
        add and that half's RMSNorm run as one kernel (its output waits in `s.normed`)."""
        layer = self.layers[j // 2]
        norm = self._next_norm(j)
        if norm is not None and layer.plain_residual(j % 2):
            h, s.normed = norm.after_add(h, reduced)
            return h
        if j % 2 == 0:
            return layer.attn_residual(h, reduced)
        return layer.mlp_residual(h, reduced, None if s.ple is None else s.ple[:, j // 2])

    def _next_norm(self, j: int):
        """The RMSNorm half j + 1 starts with (None after the last half)."""
        if j % 2 == 0:
            return self.layers[j // 2].mlp_norm
        return self.layers[j // 2 + 1].attn_norm if j + 1 < self.num_halves else None

    def capture_graphs(self, head=None) -> None:
        """Record the decode step of every batch bucket as CUDA graphs (see `graphs.py`); with
        `head` (a `RankHead`, where the group's all-reduce is capturable) from token ids to
        logits."""
        self.graphs = None
        if self.device.type == "cuda" and self.batched_decode:
            if self.not_capturable:
                log.info("no CUDA graphs: the model's steps run eagerly, since %s",
                         self.not_capturable)
                return
            self.graphs = DecodeGraphs(self, self.buckets, head)


def reads_gated(mlp) -> bool:
    """Whether `mlp`'s down projection can read silu(gate) * up from its gate/up GEMV's
    fixed-point sum (`fixed_sum.gated`): a SiLU-gated MLP of 4/8-bit GPTQ linears without biases,
    gate/up one GEMV of two equal parts, down's rows unpadded."""
    gate_up, down = getattr(getattr(mlp, "gate_up_proj", None), "joined", None), getattr(
        mlp, "down_proj", None)
    if getattr(mlp, "act", None) is not torch.nn.functional.silu or gate_up is None or down is None:
        return False
    w, d = gate_up.weight, down.weight
    return (isinstance(w, GPTQWeight) and isinstance(d, GPTQWeight) and w.bits in (4, 8)
            and d.bits in (4, 8) and gate_up.bias is None and down.bias is None
            and d.x_features in (None, d.in_features) and w.out_features == 2 * d.in_features)


def gated_roles(n: int, prefix: str) -> list[tuple[str, str]]:
    """(the buffer role gate/up GEMV i adds into, the role it clears) for the n gate/up GEMVs a
    step runs in order, every step alike. Down projection i reads buffer i (many programs share
    each row, so none can take it), and the next gate/up GEMV clears it once that down GEMV has
    completed: gate/up GEMV i clears the buffer of i - 1 (the last one's, cyclically: the step
    before's) and needs its own clear, so consecutive GEMVs (cyclically) use different buffers:
    0, 1, 0, 1, ..., and a third for the last where n is odd. n = 1 has no such assignment: []."""
    if n < 2:
        return []
    colors = [i % 2 for i in range(n - 1)] + [2 if n % 2 else 1]
    return [(f"{prefix}.gate_up{colors[i]}", f"{prefix}.gate_up{colors[i - 1]}")
            for i in range(n)]


def build_rank_model(path, cfg, quant, plan, comm, dtype: torch.dtype, device="cpu",
                     num_slots: int = 8, max_len: int | None = None, progress=None) -> RankModel:
    """The rank-side model for the checkpoint's architecture."""

    arch = gemma if cfg.gemma is not None else llama
    load = LayerLoader(Checkpoint(path, device=device), cfg, quant, plan, comm.rank, dtype,
                       device, arch.norm_offset(cfg))
    layers = []
    for i in range(cfg.num_layers):
        layers.append(arch.layer(load, i))
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    producer = arch.kv_producer(cfg)

    def heads_of(layer):
        split = plan.head_split(layer)
        return split.kv_heads[comm.rank][1] - split.kv_heads[comm.rank][0], split.head_dim

    cache = LayerCaches.build(cfg, heads_of, producer, num_slots, max_len or cfg.max_position,
                              dtype, device)
    return RankModel(cfg, comm, layers, arch.rotaries(cfg, device), cache,
                     cfg.gemma.ple_dim if cfg.gemma is not None else 0, load.ckpt, device)
