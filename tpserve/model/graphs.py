"""The decode step of each batch bucket, captured as CUDA graphs and replayed from static buffers.

A decode step's shapes depend only on its batch size, so each bucket (1, 2, 4, 8, ... up to the
KV slots) is recorded once at start-up; a step of b sequences replays the smallest bucket >= b, its
padding rows aimed at the cache's scratch slot with length 0. Input values (hidden states, slots,
positions, lengths) are copied into the bucket's static tensors before the replay.

Where the all-reduce is a no-op or itself capturable (tp=1), the whole step is one graph. Where it
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
    def __init__(self, model, size: int, width: int, whole: bool, pool):
        self.size, self.whole, self.reductions = size, whole, model.num_halves
        dev, dtype = model.device, model.layers[0].attn_norm.weight.dtype
        self.x = torch.zeros(size, width, dtype=dtype, device=dev)
        self.meta = DecodeMeta.build([0] * size, [0] * size, dev)
        self.meta.slots.fill_(model.cache.num_slots)  # scratch slot while warming up
        self.meta.lens.zero_()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.reduced: list[torch.Tensor] = []  # static all-reduce results, one per half
        self.partials: list[torch.Tensor] = []
        self._record(model, pool)

    def _record(self, model, pool) -> None:
        if self.whole:
            self.out = self._capture(pool, lambda: model.run(self.x, None, self.meta))
            return
        state_box, h = {}, None
        for seg in range(model.num_halves + 1):
            def segment(seg=seg, h=h):
                if seg == 0:
                    state_box["s"] = model.begin(self.x, None, self.meta)
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
    def __init__(self, model, buckets: list[int]):
        t0 = time.perf_counter()
        self.model = model
        width = model.cfg.hidden_size + model.cfg.num_layers * model.ple_dim
        whole = model.comm.capturable
        pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[int, _Bucket] = {}
        with torch.inference_mode():
            for size in sorted(buckets, reverse=True):  # largest first: smaller ones reuse its pool
                self.buckets[size] = _Bucket(model, size, width, whole, pool)
        torch.cuda.synchronize()
        n = sum(len(b.graphs) for b in self.buckets.values())
        log.info("captured %d CUDA graphs (%s) for decode batch buckets %s in %.1fs",
                 n, "whole step" if whole else "one per segment between all-reduces",
                 sorted(self.buckets), time.perf_counter() - t0)

    def run(self, x: torch.Tensor, plan) -> torch.Tensor:
        b = len(plan.slots)
        bucket = self.buckets[bucket_for(self.model.buckets, b)]
        bucket.x[:b].copy_(x)
        bucket.meta.copy_(self.model.padded_meta(plan, bucket.size))
        return bucket.replay(self.model.comm)[:b]
