"""Ray glue: the executor that drives tp RankWorker actors through the coordinator.

Ray does lifecycle only (start, place, monitor, kill); tensors go over ZMQ. The cluster (a private
local one, or the one at `address`) and the actors' placement, ranks ordered by node, come from
`tpserve.runtime.ray_placement`; here the ranks are loaded, wired to the coordinator, watched, and
rebuilt after a failure.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import torch

from tpserve.runtime.comm import choose_path
from tpserve.runtime.coordinator import Coordinator, RankFailure
from tpserve.runtime.executor import CommStats, RankPlacement
from tpserve.runtime.profiling import StepProfiler
from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan
from tpserve.model.rank_head import HEAD_AT, malformed, malformed_logits
from tpserve.serve.sample_sync import SampleSync
from tpserve.runtime.ray_placement import (PLACEMENTS, check_nodes, code_fingerprint, ensure_ray,
                                           load_ranks, rank_order, reserve, start_ranks)

log = logging.getLogger(__name__)


class RayExecutor:
    """An `Executor`: tp RankWorker actors in one placement group, driven by a `Coordinator`.

    A monitor thread watches the actors: a dead one (actor killed, process killed, node gone)
    turns the step in flight into a `RankFailure` within about a second, naming the rank and node;
    a rank that stops answering (e.g. SIGSTOP) fails the step after `timeout_s`. `recover()` then
    rebuilds the group: fresh placement, shards reloaded, new keys.
    """

    def __init__(self, path, cfg, quant, tp: int, dtype: torch.dtype, device: str = "cpu",
                 num_slots: int = 8, max_len: int | None = None, address: str | None = None,
                 placement: str = "strict_pack", timeout_s: float = 60.0,
                 placement_timeout_s: float = 60.0, curve: bool = True, progress: bool = False,
                 allreduce: str = "auto", lm_head: str = "auto", head_at: str = "auto"):
        choose_path(allreduce, tp, device, True, None)  # refuse a wrong name or device up front
        if head_at not in HEAD_AT:
            raise TpserveError(f"head_at={head_at!r} is not known; use one of {list(HEAD_AT)}")
        if placement not in PLACEMENTS:
            raise TpserveError(f"placement={placement!r} is not known; use one of {list(PLACEMENTS)}")
        if device not in ("cpu", "cuda"):
            raise TpserveError(f"device={device!r} is not supported; use cpu or cuda")
        StepProfiler(0)  # a malformed TPSERVE_PROFILE is refused here, not in every rank
        self.backend, self.path, self.tp, self.num_slots = "ray", path, tp, num_slots
        self.max_len, self.vocab = max_len or cfg.max_position, cfg.vocab_size
        self.dtype, self.device, self.placement, self.timeout_s = dtype, device, placement, timeout_s
        self.placement_timeout_s, self.curve, self.allreduce = placement_timeout_s, curve, allreduce
        self.lm_head, self.head_at = lm_head, head_at
        self.head_bytes, self.head_format = 0, None  # the head's, where rank 0 holds it
        self._sync = SampleSync()  # what rank 0's sampler holds, where it holds the head
        self.started_ray = ensure_ray(address, tp, device)
        self.actors, self.pg, self.coord, self.serving, self.nodes = [], None, None, [], []
        self.failures = self.recoveries = 0
        self._comm_stats = CommStats()
        self._dead: str | None = None
        self._monitor_stop = threading.Event()
        try:
            self._start(progress)
        except BaseException:
            self.close()
            raise
        self._monitor = threading.Thread(target=self._watch, name="tpserve-rank-monitor",
                                         daemon=True)
        self._monitor.start()

    def _start(self, progress: bool) -> None:
        import ray
        tp, device, tag = self.tp, self.device, f"{os.getpid()}-{self.recoveries}"
        self.pg = reserve(tp, device, self.placement, tag)
        order = rank_order(self.pg, tp, device, self.placement, self.placement_timeout_s)
        start_ranks(self.actors, self.pg, order, tag, str(self.path),
                    str(self.dtype).replace("torch.", ""), device, self.num_slots, self.max_len,
                    self.timeout_s)
        try:
            self.nodes = ray.get([a.node_info.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            if not re.search(r"RankWorker\.__init__\(\) (got an unexpected|missing|takes)", str(e)):
                raise
            raise TpserveError(  # its RankWorker takes other arguments: another tpserve
                f"a rank process could not start tpserve's RankWorker "
                f"({str(e).strip().splitlines()[-1]}); "
                f"it imported another tpserve than the driver's in {code_fingerprint()[1]}: launch "
                f"from a folder that holds no other tpserve checkout (Ray puts the launch folder "
                f"on the ranks' Python path)") from None
        check_nodes(self.actors, self.nodes, self.path, device)
        driver_node = ray.get_runtime_context().get_node_id()
        local = all(i["node_id"] == driver_node for i in self.nodes)
        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        # Same host: unix-domain sockets, unless the user pinned the coordinator's address.
        transport = "ipc" if local and "TPSERVE_COORDINATOR_HOST" not in os.environ else "tcp"
        from tpserve.runtime.shm import supported
        path, why = choose_path(self.allreduce, tp, device, local, supported())
        log.info("all-reduce path %s (--allreduce %s): %s", path, self.allreduce, why)
        self.coord = Coordinator(tp, host, self.timeout_s, curve=self.curve, transport=transport,
                                 allreduce=path)
        self.coord.stats = self._comm_stats  # counters survive a rebuilt rank group
        self.coord.health_check = self._raise_if_dead
        self.load_info = load_ranks(self.actors, progress)
        # auto: rank 0 where its whole step is one graph (GPU ranks on this host, NCCL or tp=1),
        # and for CPU ranks on this host, where rank 0's decode bursts measured as fast or faster
        # than the coordinator's head (bench/README.md, "Head placement, CPU ranks")
        self._place_head(local and (device == "cpu" or path in ("cuda", "nccl") or tp == 1))
        self.serving = [a.serve.remote(self.coord.address, self.coord.client_keys(r),
                                       path != "zmq") for r, a in enumerate(self.actors)]
        self.coord.wait_for_ranks()
        self._dead = None
        log.info("%d ranks serving on %s via %s, all-reduce %s%s", tp,
                 sorted({i["ip"] for i in self.nodes}), self.coord.address, path,
                 f", torch threads per rank {[i['threads'] for i in self.nodes]} (their node's "
                 f"cores less TPSERVE_CPU_RESERVED_CORES, shared)" if device == "cpu" else "")

    # ---- failure detection and recovery --------------------------------------------------
    def _watch(self) -> None:
        import ray
        while not self._monitor_stop.wait(0.5):
            refs = list(self.serving)
            if not refs or self._dead:
                continue
            try:
                done, _ = ray.wait(refs, timeout=0)
            except Exception:  # Ray itself is going away (shutdown)
                continue
            if done and refs == self.serving:
                self._dead = self.describe_dead()
                self.failures += 1
                log.error("rank failure detected: %s", self._dead)

    def _raise_if_dead(self) -> None:
        if self._dead:
            raise RankFailure(f"a rank died: {self._dead}")

    def recover(self) -> None:
        """Replace the whole rank group: fresh placement, shards reloaded, new keys."""
        t0 = time.perf_counter()
        log.warning("rebuilding the rank group after: %s", self._dead or "a failed step")
        self._release()
        self._sync.reset()  # the new rank 0 holds no request's sampling state
        self.recoveries += 1
        self._start(progress=False)
        log.warning("rank group rebuilt in %.1fs; serving again", time.perf_counter() - t0)

    def _place_head(self, auto_rank0: bool) -> None:
        """The head on rank 0 where `head_at` says (`auto`: see the caller),
        decided at the first start and kept by a rebuilt group (the caller holds no head then)."""
        import ray
        if self.head_at == "auto":
            self.head_at = "rank0" if auto_rank0 else "coordinator"
        if self.head_at == "coordinator":
            self.head_bytes, self.head_format = 0, None
            return
        infos = ray.get([a.load_head.remote(self.lm_head) for a in self.actors])
        self.head_bytes, self.head_format = infos[0]["nbytes"], infos[0]["format"]
        log.info("the head (embedding + lm_head, %s, %.1f MB) is on rank 0: steps send token "
                 "ids and receive the argmax", self.head_format, self.head_bytes / 1e6)

    @property
    def stats(self) -> CommStats:
        return self._comm_stats

    def step_ids(self, ids: torch.Tensor, plan: StepPlan, need_logits: bool = True):
        if not self.head_bytes:
            return None  # the head runs at the coordinator
        self._sync.reset()  # a step that samples nothing: rank 0 lets go of its rows too
        out = self._guarded(self.coord.step_ids, ids, plan, need_logits)
        argmax, logits = out[0], (out[1] if need_logits else None)
        wrong = malformed(argmax, logits, plan, self.vocab)
        if wrong:
            self.failures += 1  # a rank that answers garbage is rebuilt like a dead one
            raise RankFailure(f"rank 0 answered step {self.coord.step_id} with {wrong}")
        return logits, argmax

    def sample_ids(self, ids: torch.Tensor, plan: StepPlan, reqs, need_logits: bool):
        """A step of token ids whose requests rank 0 samples (`tpserve.serve.rank_sampling`) ->
        ((token, logprob) per request, the fp32 logits of `plan.out_rows` where need_logits);
        None where the head runs at the coordinator."""
        if not self.head_bytes:
            return None
        entries, params = self._sync.entries(reqs)
        out = self._guarded(self.coord.sample_ids, ids, plan, entries, params, need_logits)
        wrong = SampleSync.malformed(out, len(reqs), self.vocab) or (
            malformed_logits(out[4], plan, self.vocab) if need_logits else None)
        if wrong:
            self.failures += 1
            raise RankFailure(f"rank 0 answered sampling step {self.coord.step_id} with {wrong}")
        return SampleSync.results(reqs, out), (out[4] if need_logits else None)

    @property
    def ranks_sample(self) -> bool:
        """Whether rank 0 holds the head, and samples."""
        return bool(self.head_bytes)

    def sample_burst(self, ids: torch.Tensor, plan: StepPlan, reqs, steps: int
                     ) -> list[list[tuple]] | None:
        """`steps` decode steps of `reqs` that rank 0 samples in one message, each step's tokens
        feeding the next on rank 0 (`rank_sampling.SampledBurst`) -> per step, (token, logprob)
        per request; None where the head runs at the coordinator."""
        if not self.head_bytes:
            return None
        entries, params = self._sync.entries(reqs)
        out = self._guarded(self.coord.sample_ids, ids, plan, entries, params, False, steps)
        wrong = SampleSync.malformed(out, len(reqs), self.vocab, steps)
        if wrong:
            self.failures += 1
            raise RankFailure(f"rank 0 answered sampled burst {self.coord.step_id} with {wrong}")
        return self._sync.burst_results(reqs, out, steps)

    def decode_ids(self, ids: torch.Tensor, plan: StepPlan, steps: int) -> torch.Tensor | None:
        if not self.head_bytes:
            return None
        if steps == 1:
            return self.step_ids(ids, plan, False)[1].view(1, -1)
        self._sync.reset()  # as `step_ids`
        toks = self._guarded(self.coord.step_ids, ids, plan, False, steps)[0]
        wrong = malformed(toks, None, plan, self.vocab, steps)
        if wrong:
            self.failures += 1
            raise RankFailure(f"rank 0 answered decode steps {self.coord.step_id} with {wrong}")
        return toks

    def health(self) -> str | None:
        return self._dead

    def placement(self) -> list[RankPlacement]:
        return [RankPlacement(i["rank"], i["node_id"], self.device) for i in self.nodes]

    def step(self, h: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        return self._guarded(self.coord.step, h, plan)

    def _guarded(self, step, *args):
        """A coordinator step; a failure names the dead or stuck rank."""
        self._raise_if_dead()
        try:
            return step(*args)
        except RankFailure as e:
            if self._dead and self._dead in str(e):  # the monitor's own report: already named
                raise
            if not self._dead:
                self.failures += 1
                self._dead = self.describe_dead()
            raise RankFailure(f"{e} [{self._dead}]") from None

    def describe_dead(self) -> str:
        """Which actors Ray reports dead, by rank and node (for error messages)."""
        import ray
        dead = []
        for r, ref in enumerate(self.serving):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    ray.get(ref)
                    dead.append(f"rank {r} stopped")
                except Exception as e:
                    dead.append(f"rank {r} on node {self.nodes[r]['node_id'][:12]} died "
                                f"({type(e).__name__})")
        return "; ".join(dead) or "every rank actor is alive but one stopped answering"

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop the ranks, free the placement group, stop a private Ray cluster. Never hangs:
        after Ctrl-C the signal also reached Ray's own processes, which may no longer answer."""
        import ray
        self._monitor_stop.set()
        worker = threading.Thread(target=self._release, daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("Ray did not answer within %.0fs while releasing the ranks; forcing it "
                        "down", timeout_s)
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False

    def _release(self) -> None:
        import ray
        if self.coord is not None:
            self.coord.stop()
            refs, self.serving = self.serving, []
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=5)
            self.coord.close()
            self.coord = None
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
            self.pg = None
