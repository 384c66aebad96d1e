"""In-process executor: tp ranks as threads of this process, all-reduce through `LocalComm`.

Same `step(h, plan)` contract as the Ray executor, so `tpserve.load(..., backend="local")` and the
tests run the exact per-rank math of the distributed system without processes or sockets.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

from tpserve.runtime.comm import LocalGroup
from tpserve.runtime.executor import CommStats, RankPlacement
from tpserve.model.kv_cache import StepPlan
from tpserve.model.decoder import build_rank_model
from tpserve.model.rank_head import RankHead, decode_ids, step_ids
from tpserve.model.shard_plan import ShardPlan
from tpserve.serve.rank_sampling import RankSampler
from tpserve.serve.sample_sync import SampleSync


class LocalExecutor:
    """An `Executor` whose ranks are threads of this process (they fail together, never alone)."""

    backend = "local"
    failures = 0

    def __init__(self, path, cfg, quant, tp: int, dtype: torch.dtype, device="cpu",
                 num_slots: int = 8, max_len: int | None = None, cuda_graphs: bool = True,
                 head=None):
        self.plan = ShardPlan.build(cfg, tp)
        self.group = LocalGroup(tp)
        self.ranks = [build_rank_model(path, cfg, quant, self.plan, self.group.comm(r), dtype, device,
                                       num_slots, max_len) for r in range(tp)]
        self.rank_head = self.sampler = None
        if tp == 1 and head is not None:
            # At tp=1 the coordinator's head joins the rank's step (`step_ids` below) and, on a
            # GPU, its graphs; the step's sampling too (`sample_ids`, `sample_burst`), as on rank
            # 0 of Ray ranks that hold the head.
            r0 = self.ranks[0]
            self.rank_head = RankHead(head, r0.comm, r0.width, dtype, r0.device)
            self.sampler = RankSampler(cfg.eos_token_ids, cfg.vocab_size)
        self._sync = SampleSync()
        if cuda_graphs and str(device).startswith("cuda"):
            # One rank after the other, before any step: tuning and capture never run concurrently.
            for rank in self.ranks:
                rank.capture_graphs(self.rank_head)
        self.pool = ThreadPoolExecutor(tp, thread_name_prefix="tpserve-rank")
        self.tp, self.num_slots = tp, num_slots
        self.max_len = self.ranks[0].cache.max_len

    def step(self, h: torch.Tensor, plan: StepPlan, capture: list | None = None) -> torch.Tensor:
        """Run one step on every rank; returns rank 0's final hidden rows `plan.out_rows`.

        `capture`, when given, receives rank 0's output of every layer (after each layer's
        all-reduce every rank holds the same h).
        """
        self._copy(plan)
        out = self.ranks[0](h, plan, capture) if self.tp == 1 else self._step_all(h, plan, capture)
        return out if plan.out_rows is None else out[plan.out_rows]

    head_bytes = 0  # the head is the caller's (rank 0's copy at tp=1 is the same tables)

    @property
    def ranks_sample(self) -> bool:
        """Whether the head is in the rank's step (tp=1), which samples too."""
        return self.rank_head is not None

    def step_ids(self, ids: torch.Tensor, plan: StepPlan, need_logits: bool = True):
        """A step from token ids to (fp32 logits, argmax) where the head is in the rank's step
        (tp=1): on a GPU, decode steps replay its captured graph; else None."""
        if self.rank_head is None:
            return None
        self._forget()
        self._copy(plan)
        return step_ids(self.ranks[0], self.rank_head, ids, plan)

    def decode_ids(self, ids: torch.Tensor, plan: StepPlan, steps: int) -> torch.Tensor | None:
        """`steps` greedy decode steps in the step with the head (tp=1; captured on a GPU), each
        step's argmax fed to the next on the device -> [steps, b] on the host; else None."""
        if self.rank_head is None:
            return None
        self._forget()
        return decode_ids(self.ranks[0], self.rank_head, ids, plan, steps).cpu()

    def _forget(self) -> None:
        """A step that samples nothing (every running request is in it, and none samples): the
        sampler lets go of its rows, finished requests' ones among them, as rank 0 does."""
        self._sync.reset()
        self.sampler.reset()

    def sample_ids(self, ids: torch.Tensor, plan: StepPlan, reqs, need_logits: bool):
        """A step of token ids sampled where its logits are (tp=1: `RankSampler`, as on rank 0 of
        Ray ranks) -> ((token, logprob) per request, the logits of `plan.out_rows` where
        need_logits); None where the head is not in the step."""
        if self.rank_head is None:
            return None
        entries = self._entries(reqs)
        self._copy(plan)
        logits, argmax = step_ids(self.ranks[0], self.rank_head, ids, plan)
        out = self.sampler.sample(logits, argmax, ids, plan, entries)
        return SampleSync.results(reqs, out), (logits if need_logits else None)

    def sample_burst(self, ids: torch.Tensor, plan: StepPlan, reqs, steps: int):
        """`steps` sampled decode steps, each step's tokens fed to the next
        (`rank_sampling.SampledBurst`) -> per step, (token, logprob) per request; else None."""
        if self.rank_head is None:
            return None
        burst = self.sampler.burst(ids, plan, self._entries(reqs))
        decode_ids(self.ranks[0], self.rank_head, ids, plan, steps, burst)
        return self._sync.burst_results(reqs, burst.result(), steps)

    def _copy(self, plan: StepPlan) -> None:
        """The plan's KV copies (`StepPlan.copies`) on every rank, before its step."""
        if plan.copies:
            for rank in self.ranks:
                rank.cache.copy_prefixes(plan.copies)

    def _entries(self, reqs) -> list[list]:
        entries, params = self._sync.entries(reqs)
        for chunk in params:
            self.sampler.take(chunk)
        return entries

    def _step_all(self, h: torch.Tensor, plan: StepPlan, capture: list | None) -> torch.Tensor:
        """Every rank on its thread (they meet in each all-reduce); rank 0's output."""
        futures = [self.pool.submit(rank, h, plan, capture if r == 0 else None)
                   for r, rank in enumerate(self.ranks)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            # A failed rank never reaches the barrier: release the others, then re-arm it.
            self.group.abort()
            wait(futures)
            self.group.reset()
            errors = [f.exception() for f in futures if f.exception() is not None]
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                       errors[0])
        return futures[0].result()

    @property
    def stats(self) -> CommStats:
        return CommStats(allreduce_count=self.group.reductions)

    def health(self) -> str | None:
        return None

    def placement(self) -> list[RankPlacement]:
        return [RankPlacement(r, "local", str(m.device)) for r, m in enumerate(self.ranks)]

    def recover(self) -> None:
        """After a failed step (the engine failed its requests): the sampler starts clean."""
        self._sync.reset()
        if self.sampler is not None:
            self.sampler.reset()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

