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


def prefill_rows(plan) -> tuple[list[int], list[int]]:
    """A step's tokens as decode rows: (cache slot, position) of each, in plan order. Row i at
    position p attends to its slot's first p + 1 keys: the step writes every row's k/v before
    attention runs, so for a prompt's rows that is causal attention over the prompt."""
    slots, positions = [], []
    for slot, start, n in zip(plan.slots, plan.starts, plan.lens):
        slots += [slot] * n
        positions += range(start, start + n)
    return slots, positions


class _Bucket:
    """One static shape's graphs and their static tensors. `rows` [4, size] int64 holds the plan
    (slots, positions, lens: `DecodeMeta.host`) and the token ids; it is filled by one copy from a
    pinned host buffer per step. A decode bucket's rows are sequences (one token each); a
    prefill bucket's rows are the step's tokens (`prefill_rows`), and its graph ends at their
    hidden rows (the head runs on the rows the step needs, outside it)."""

    def __init__(self, model, size: int, width: int, whole: bool, head, pool,
                 prefill: bool = False):
        self.size, self.whole, self.prefill = size, whole, prefill
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
                if self.prefill:
                    return h, None
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
        """The step's plan (and token ids) into `rows`: one host-to-device copy. A prefill
        bucket takes the plan's tokens as rows (`prefill_rows`)."""
        self.copied.synchronize()  # the previous step's copy has left the staging buffer
        slots, positions = prefill_rows(plan) if self.prefill else (plan.slots, plan.starts)
        self.staging[:3] = DecodeMeta.host(slots, positions, self.size, self.scratch)
        if ids is not None:
            self.staging[3, :len(slots)] = ids
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


def prefill_fits(plan, max_tokens: int, max_positions: int) -> bool:
    """Whether `plan` runs as token rows (`prefill_rows`): at most `max_tokens` tokens, and each
    sequence bringing more than one ends within `max_positions` positions."""
    return plan.num_tokens <= max_tokens and all(
        n == 1 or s + n <= max_positions for s, n in zip(plan.starts, plan.lens))


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts of the captured prefill steps: 16, 32, 64, ... up to max_tokens."""
    sizes, n = [], 16
    while n <= max_tokens:
        sizes.append(n)
        n *= 2
    return sizes


# Steps that prefill (first prompts, prompt chunks, beside decode rows) replay a captured graph
# of their tokens as decode rows where the decode step holds the head: up to PREFILL_GRAPH_TOKENS
# tokens, if each prompt ends within PREFILL_GRAPH_POSITIONS positions. Eagerly a 128-token
# prompt costs ~441 kernel launches from Python (~24 ms of host time on an H200 for ~14 ms of GPU
# work), eight of them in one step ~600 larger ones (41 ms wall for 30 ms of GPU work). The
# rows' attention reads each row's keys in turn: its cost is the sum of the rows' contexts (eight
# 128-token prompts: 66K key reads per head, one 256-token prompt 33K), where the eager path's
# flash attention costs the square of each prompt: a prompt ending past a few hundred positions
# attends faster eagerly, however few tokens the step has.
PREFILL_GRAPH_TOKENS = 1024
PREFILL_GRAPH_POSITIONS = 256


class DecodeGraphs:
    """Every bucket's graphs. With `head` (a `RankHead`: the coordinator's embedding, final norm
    and lm_head on this GPU, or on rank 0 of this group) a whole-step graph runs from token ids to
    fp32 logits and their argmax, and only token ids cross to the host; then a step that
    prefills short prompts (`takes_prefill`) replays a graph of its tokens as decode rows
    (`prefill_rows`) padded to a token bucket (`model.prefill_sizes`)."""

    def __init__(self, model, buckets: list[int], head=None):
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved()
        self.model, self.head = model, head
        width = model.width
        whole = model.comm.capturable
        self.with_head = head is not None and whole
        pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[int, _Bucket] = {}
        self.prefill: dict[int, _Bucket] = {}
        sizes = model.prefill_sizes if self.with_head else []
        with torch.inference_mode():
            for size in sorted(sizes, reverse=True):  # largest first: smaller ones reuse its pool
                self.prefill[size] = _Bucket(model, size, width, True, head, pool, prefill=True)
            for size in sorted(buckets, reverse=True):
                self.buckets[size] = _Bucket(model, size, width, whole,
                                             head if self.with_head else None, pool)
        torch.cuda.synchronize()
        # the graphs' pool and static buffers (the prefill graphs' dequantized weights included)
        self.memory_bytes = torch.cuda.memory_reserved() - reserved
        n = sum(len(b.graphs) for b in [*self.buckets.values(), *self.prefill.values()])
        log.info("captured %d CUDA graphs (%s) for decode batch buckets %s%s in %.1fs, holding "
                 "%.0f MiB of GPU memory", n, "whole step, embedding to argmax" if self.with_head
                 else "whole step" if whole else "one per segment between all-reduces",
                 sorted(self.buckets), f" and prefill steps of {sizes} tokens"
                 if sizes else "", time.perf_counter() - t0, self.memory_bytes / 2**20)

    def takes_prefill(self, plan) -> bool:
        """Whether a captured prefill runs `plan`: a step that is not a decode step, of at most
        the largest bucket's tokens, each of whose prompts (sequences bringing more than one
        token) ends within the model's `prefill_positions` (`prefill_fits`)."""
        return bool(self.prefill) and not plan.is_decode and self.model.prefill_fits(plan)

    def run_prefill(self, ids: torch.Tensor, plan) -> tuple[torch.Tensor | None,
                                                            torch.Tensor | None]:
        """Token ids [T] (host) of a plan `takes_prefill` takes -> (fp32 logits of the rows
        `plan.out_rows`, their argmax) on the device; both None on a rank without the head. The
        head runs after the replay, on those rows only."""
        bucket = self.prefill[bucket_for(self.model.prefill_sizes, plan.num_tokens)]
        bucket.load(plan, ids)
        h = bucket.replay(self.model.comm)[:plan.num_tokens]
        if plan.out_rows is not None:
            h = h.index_select(0, torch.tensor(plan.out_rows).to(h.device, non_blocking=True))
        logits = self.head.logits(h)
        return (None, None) if logits is None else (logits, greedy(logits))

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
