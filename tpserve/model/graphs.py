"""The decode step of each batch bucket, captured as CUDA graphs and replayed from static buffers.

A decode step's shapes depend only on its batch size, so each bucket (1, 2, 4, 8, ... up to the
KV slots) is recorded once at start-up; a step of b sequences replays the smallest bucket >= b, its
padding rows aimed at the cache's scratch slot with length 0. Input values (hidden states, slots,
positions, lengths) are copied into the bucket's static tensors before the replay.

Where the all-reduce is a no-op or itself capturable (tp=1, or NCCL), the whole step is one graph
(from token ids to the argmax where the head is in it: `tpserve.model.rank_head`). Where it
leaves the GPU (threads in one process, the ZMQ coordinator), each segment between two all-reduces
is a graph: segment j finishes half j-1 (residual add) and computes half j's partial; the host runs
`comm.all_reduce` on the partial and copies the sum into segment j+1's static input. These are the
same `RankModel.begin / partial / residual` functions the eager step runs.
"""

from __future__ import annotations

import logging
import time

import torch

from tpserve.model.kv_cache import DecodeMeta
from tpserve.model.rank_head import greedy

log = logging.getLogger(__name__)


def buckets_for(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to 32, then every multiple of 16, up to max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 32 else 16)
    return sizes + [max_batch]


def bucket_for(buckets: list[int], batch: int) -> int:
    """The smallest bucket that holds `batch` rows (the KV slots bound every batch)."""
    return next(s for s in buckets if s >= batch)


class _Bucket:
    """One batch size's graphs and their static tensors. `rows` [4, size] int64 holds the plan
    (slots, positions, lens: `DecodeMeta.host`) and the token ids; it is filled by one copy from a
    pinned host buffer per step."""

    def __init__(self, model, size: int, width: int, whole: bool, head, pool):
        self.size, self.whole = size, whole
        self.reductions = model.num_halves + (0 if head is None else head.reductions)
        self.scratch = model.cache.num_slots
        dev, dtype = model.device, model.layers[0].attn_norm.weight.dtype
        # the step's input rows (a graph with the head reads token ids from `rows` instead)
        self.x = torch.zeros(size, width, dtype=dtype, device=dev) if head is None else None
        self.rows = torch.zeros(4, size, dtype=torch.int64, device=dev)
        self.rows[0].fill_(self.scratch)  # warm-up and capture write to the scratch slot only
        self.staging = torch.zeros(4, size, dtype=torch.int64, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.reduced: list[torch.Tensor] = []  # static all-reduce results, one per half
        self.partials: list[torch.Tensor] = []
        self.tokens = None  # the argmax of a graph with the head
        self._record(model, head, pool)

    def _record(self, model, head, pool) -> None:
        if self.whole:
            def step():
                meta = DecodeMeta.of(self.rows[:3])
                if head is None:
                    return model.run(self.x, None, meta), None
                h = model.run(head.embed(self.rows[3]), None, meta)
                logits = head.logits(h)  # None on a rank without the head
                return (h, None) if logits is None else (logits, greedy(logits))
            self.out, self.tokens = self._capture(pool, step)  # with the head, out is the logits
            return
        state_box, h = {}, None
        for seg in range(model.num_halves + 1):
            def segment(seg=seg, h=h):
                if seg == 0:
                    state_box["s"] = model.begin(self.x, None, DecodeMeta.of(self.rows[:3]))
                    h = self.x[:, :model.cfg.hidden_size]
                else:
                    h = model.residual(seg - 1, h, self.reduced[seg - 1], state_box["s"])
                if seg == model.num_halves:
                    return h, None
                return h, model.partial(seg, h, state_box["s"])
            h, partial = self._capture(pool, segment)
            if partial is not None:
                self.partials.append(partial)
                self.reduced.append(torch.empty_like(partial))
        self.out = h
        self.state = state_box["s"]  # keeps the step's rope tables alive for later segments

    def _capture(self, pool, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up: compiles and tunes kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        self.graphs.append(graph)
        return out

    def load(self, plan, ids: torch.Tensor | None = None) -> None:
        """The step's plan (and token ids) into `rows`: one host-to-device copy."""
        self.copied.synchronize()  # the previous step's copy has left the staging buffer
        b = len(plan.slots)
        self.staging[:3] = DecodeMeta.host(plan.slots, plan.starts, self.size, self.scratch)
        if ids is not None:
            self.staging[3, :b] = ids
        self.rows.copy_(self.staging, non_blocking=True)
        self.copied.record()

    def replay(self, comm) -> torch.Tensor:
        if self.whole:
            self.graphs[0].replay()
            if comm.world_size > 1:  # the step's all-reduces ran inside the graph
                comm.replayed(self.reductions)
            return self.out
        for seg, graph in enumerate(self.graphs):
            graph.replay()
            if seg < len(self.partials):
                self.reduced[seg].copy_(comm.all_reduce(self.partials[seg]))
        return self.out


class DecodeGraphs:
    """Every bucket's graphs. With `head` (a `RankHead`: the coordinator's embedding, final norm
    and lm_head on this GPU, or on rank 0 of this group) a whole-step graph runs from token ids to
    fp32 logits and their argmax, and only token ids cross to the host."""

    def __init__(self, model, buckets: list[int], head=None):
        t0 = time.perf_counter()
        self.model = model
        width = model.width
        whole = model.comm.capturable
        self.with_head = head is not None and whole
        pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[int, _Bucket] = {}
        with torch.inference_mode():
            for size in sorted(buckets, reverse=True):  # largest first: smaller ones reuse its pool
                self.buckets[size] = _Bucket(model, size, width, whole,
                                             head if self.with_head else None, pool)
        torch.cuda.synchronize()
        n = sum(len(b.graphs) for b in self.buckets.values())
        log.info("captured %d CUDA graphs (%s) for decode batch buckets %s in %.1fs",
                 n, "whole step, embedding to argmax" if self.with_head else
                 "whole step" if whole else "one per segment between all-reduces",
                 sorted(self.buckets), time.perf_counter() - t0)

    def bucket(self, plan) -> _Bucket:
        return self.buckets[bucket_for(self.model.buckets, len(plan.slots))]

    def run(self, x: torch.Tensor, plan) -> torch.Tensor:
        """x [b, width] -> the last layer's output [b, hidden]."""
        if self.with_head:  # these graphs end in logits: a step from hidden states runs eagerly
            return self.model.run_padded(x, plan)
        bucket = self.bucket(plan)
        bucket.x[:x.shape[0]].copy_(x)
        bucket.load(plan)
        return bucket.replay(self.model.comm)[:x.shape[0]]

    def run_ids(self, ids: torch.Tensor | None, plan
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token ids [b] (host) -> (fp32 logits [b, vocab], their argmax [b]) on the device; both
        None on a rank without the head. ids None: the step after the last one of the same
        batch, fed that step's argmax on the device (no host round trip); ids on the device (a
        sampled burst's picks): copied from there, likewise."""
        bucket, b = self.bucket(plan), len(plan.slots)
        on_device = ids is not None and ids.device.type != "cpu"
        bucket.load(plan, None if on_device else ids)
        if on_device:
            bucket.rows[3, :b].copy_(ids)  # stream-ordered after the step that picked them
        elif ids is None and bucket.tokens is not None:
            bucket.rows[3, :b].copy_(bucket.tokens[:b])  # stream-ordered after the last replay
        bucket.replay(self.model.comm)
        if bucket.tokens is None:
            return None, None
        return bucket.out[:b], bucket.tokens[:b]
