"""The coordinator: one ZMQ ROUTER in the driver that drives every step and owns every all-reduce.

It is the driver half of the comm interface (`comm.CommDriver`) for rank processes. After the
ranks' hellos it sets up the chosen data path (`setup` -> `ready`): `zmq`, where it carries the
bytes itself; `shm`, a shared-memory segment it creates (`shm.ShmDriver`); `cuda`/`nccl`/`gloo`,
a torch.distributed rendezvous it hosts (`torch_dist.DistDriver`; on `cuda` the ranks also map each
other's receive buffers through it for the one-shot kernel). Per step it sends `{op: step, plan}`
+ h to each rank and waits for rank 0's final hidden rows (`op: result`), or, where rank 0 holds
the head (`tpserve.model.rank_head`), `{op: step, ids: true, logits}` + token ids and waits for
the argmax (and the fp32 logits, in row chunks where large), or, for a step rank 0 samples,
`{op: params}` messages with the new requests' sampling parameters, then the step with `sample`
entries (and `steps: S` for a sampled burst), and waits for the sampled tokens
(`tpserve.serve.rank_sampling`); on the zmq path it meanwhile collects the tp partials of
reduction `seq`, sums them (`comm.reduce_sum`) and sends the sum back to every rank. On the other
paths the result header carries the step's reduction count and time. Every receive has a deadline
(re-armed while the ranks make progress): a rank that stops answering, or whose connection
closed, is a `RankFailure`, never a hang, and a failed step aborts the data path so no rank stays
blocked in it. Messages that fail validation, come from an unknown peer, or belong to another
step are logged, dropped and counted.

Only this job's ranks get in: secret per-rank identities, CurveZMQ over TCP, a private unix socket
on one host (`tpserve.runtime.admission`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time

import torch
import zmq

from tpserve.runtime.admission import CurveKeys, bind, curve_server, rank_identities
from tpserve.runtime.comm import reduce_sum
from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan
from tpserve.model.rank_head import MAX_DECODE_STEPS
from tpserve.runtime.executor import CommStats
from tpserve.runtime.wire import WireError, decode, encode, uint

log = logging.getLogger(__name__)


class RankFailure(TpserveError):
    """A rank died, timed out or reported an error; in-flight requests fail with this message.
    `detail`: what the rank reported (its exception's text), for the server's log only."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


class Coordinator:
    def __init__(self, tp: int, bind_host: str = "127.0.0.1", timeout_s: float = 60.0,
                 curve: bool = True, transport: str = "tcp", allreduce: str = "zmq"):
        self.tp, self.timeout_s, self.path = tp, timeout_s, allreduce
        self.carry = allreduce  # what carries small sums, as the ranks report it at setup
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished rank raises
        curve = curve and transport == "tcp"
        self.keys = CurveKeys.mint(tp) if curve else None
        self.rank_ids = rank_identities(tp)
        self.auth = curve_server(self.ctx, self.sock, self.keys) if curve else None
        self.address, self._ipc_dir = bind(self.sock, transport, bind_host)
        self.identities: list[bytes | None] = [None] * tp
        self.step_id = 0
        self.stats = CommStats()
        self.health_check = None  # called while waiting; raises RankFailure for a dead rank
        self._deadline = self._progress = 0
        self.data = _data_driver(allreduce, tp, bind_host, timeout_s)  # None: the zmq star

    def client_keys(self, rank: int) -> dict:
        """What rank `rank` needs to connect (handed over through Ray, never through ZMQ)."""
        keys = {"identity": self.rank_ids[rank]}
        if self.keys is not None:
            pub, sec = self.keys.clients[rank]
            keys.update(server_public=self.keys.server_public, public=pub, secret=sec)
        return keys

    def _send(self, rank: int, frames: list, copy: bool = True) -> None:
        """Frames to rank `rank`; a rank whose connection is gone is a `RankFailure`."""
        try:
            self.sock.send_multipart([self.identities[rank], *frames], copy=copy)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            raise RankFailure(f"rank {rank} is unreachable: its connection to the coordinator "
                              f"closed (its process exited or was killed)") from None

    # ---- receiving -----------------------------------------------------------------------
    def _recv(self, waiting_for: str):
        while True:
            left = self._deadline - time.monotonic()
            # Wait in short slices so a rank the monitor saw die fails the step at once.
            if left <= 0 or not self.sock.poll(int(min(left, 0.25) * 1000) + 1):
                if self.data is not None and self.data.progress() != self._progress:
                    self._progress = self.data.progress()  # reductions advance without us
                    self._deadline = time.monotonic() + self.timeout_s
                if time.monotonic() >= self._deadline:
                    raise RankFailure(f"{waiting_for} did not arrive within {self.timeout_s:.0f}s; "
                                      f"a rank is dead or stuck (see its log)")
                if self.health_check is not None:
                    self.health_check()
                continue
            ident, *frames = self.sock.recv_multipart(copy=False)
            ident = bytes(ident.bytes)
            try:
                header, tensors = decode(frames)
            except WireError as e:
                self.stats.dropped_messages += 1
                log.error("dropped a malformed message from %r: %s", ident[:32], e)
                continue
            rank = header.get("rank", 0)
            if rank >= self.tp or ident != self.rank_ids[rank]:
                self.stats.dropped_messages += 1
                log.error("dropped a message claiming rank %s from an unknown peer", rank)
                continue
            return ident, header, tensors

    def wait_for_ranks(self, timeout_s: float | None = None) -> None:
        """Collect every rank's hello (its ZMQ identity), then set up the all-reduce data path."""
        self._deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while None in self.identities:
            missing = [r for r, i in enumerate(self.identities) if i is None]
            ident, h, _ = self._recv(f"hello from ranks {missing}")
            if h["op"] == "hello" and self.identities[h["rank"]] is None:
                self.identities[h["rank"]] = ident
            else:
                log.error("dropped %r from rank %s while waiting for hellos", h["op"], h["rank"])
        if self.data is None:
            return  # the zmq star is every rank's default path
        for r in range(self.tp):
            self._send(r, encode({"op": "setup", "path": self.path, "comm": self.data.setup(r)}))
        ready = [False] * self.tp
        carries = set()
        while not all(ready):
            _, h, _ = self._recv(f"{self.path} all-reduce setup of ranks "
                                 f"{[r for r in range(self.tp) if not ready[r]]}")
            if h["op"] == "error" and h["step"] == 0:
                raise RankFailure(f"rank {h['rank']} could not join the {self.path} all-reduce: "
                                  f"{h.get('message', '?')}")
            if h["op"] == "ready":
                ready[h["rank"]] = True
                carries.add(str(h.get("carry", self.path)))
        self.carry = ", ".join(sorted(carries))
        log.info("all-reduce %s joined by %d ranks; small sums carried by %s", self.path, self.tp,
                 self.carry)
        self.data.joined()

    # ---- one step ------------------------------------------------------------------------
    def step(self, h: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """h [T, width] -> rank 0's final hidden rows `plan.out_rows`."""
        out = self._step({}, h, plan)
        if len(out) != 1:
            raise RankFailure(f"rank 0 answered step {self.step_id} with {len(out)} tensors, not 1")
        return out[0]

    def step_ids(self, ids: torch.Tensor, plan: StepPlan, logits: bool, steps: int = 1
                 ) -> list[torch.Tensor]:
        """Token ids [T] -> [argmax] or [argmax, fp32 logits] of the rows `plan.out_rows`, from
        ranks that hold the head (`tpserve.model.rank_head`). steps > 1: that many greedy decode
        steps in one message (`rank_head.decode_ids`) -> [argmax [steps, T]]."""
        if steps > 1:
            if steps > MAX_DECODE_STEPS:
                raise TpserveError(f"{steps} decode steps in one message exceed {MAX_DECODE_STEPS}")
            out = self._step({"ids": True, "logits": False, "steps": steps}, ids, plan)
            if len(out) != 1 or out[0].dim() != 2 or out[0].dtype != torch.int64:
                raise RankFailure(f"rank 0 answered {steps} decode steps ({self.step_id}) with "
                                  f"{len(out)} tensors, not the argmax of each")
            return out
        out = self._step({"ids": True, "logits": logits}, ids, plan)
        shaped = len(out) >= 2 if logits else len(out) == 1
        if not shaped or out[0].dim() != 1 or out[0].dtype != torch.int64:
            raise RankFailure(f"rank 0 answered step {self.step_id} with {len(out)} tensors, not "
                              f"the argmax{' and the logits' if logits else ''}")
        if logits:  # the logits came in row chunks where they exceed one frame
            return [out[0], out[1] if len(out) == 2 else torch.cat(out[1:])]
        return out

    def sample_ids(self, ids: torch.Tensor, plan: StepPlan, entries: list, params: list[list],
                   logits: bool, steps: int = 1) -> list[torch.Tensor]:
        """Token ids [T] -> rank 0's sampled [tokens, logprobs, top ids, top logprobs] of each
        sequence (`tpserve.serve.rank_sampling`), and the fp32 logits of `plan.out_rows` where
        `logits`. `params`: the new requests' parameters, sent to rank 0 ahead of the step.
        steps > 1: a sampled decode burst (no logits); each tensor gains a leading [steps]."""
        if steps > MAX_DECODE_STEPS or steps > 1 and logits:
            raise TpserveError(f"a sampled burst of {steps} decode steps with logits={logits}: "
                               f"at most {MAX_DECODE_STEPS} steps, never with logits")
        for chunk in params:
            self._send(0, encode({"op": "params", "params": chunk}))
        flags = {"ids": True, "logits": logits, "sample": entries}
        out = self._step(flags if steps == 1 else {**flags, "steps": steps}, ids, plan)
        if len(out) < 4 + logits or not logits and len(out) != 4:
            raise RankFailure(f"rank 0 answered sampling step {self.step_id} with {len(out)} "
                              f"tensors")
        if logits:  # the logits came in row chunks where they exceed one frame
            return out[:4] + [out[4] if len(out) == 5 else torch.cat(out[4:])]
        return out

    def _step(self, flags: dict, x: torch.Tensor, plan: StepPlan) -> list[torch.Tensor]:
        self.step_id += 1
        step = self.step_id
        msg = encode({"op": "step", "step": step, "plan": plan.to_wire(), **flags}, [x])
        try:
            for r in range(self.tp):
                self._send(r, msg, copy=False)
            return self._serve(step, uint(flags, "steps") or 1)
        except RankFailure:
            if self.data is not None:
                self.data.abort()  # no rank stays blocked in the path; recover() rebuilds it
            raise

    def _serve(self, step: int, steps: int = 1) -> list[torch.Tensor]:
        """Wait for step `step`'s result (`steps` decode steps' worth of time where the ranks
        run several); on the zmq path, serve its reductions meanwhile."""
        partials: dict[int, list] = {}
        started: dict[int, float] = {}
        self._deadline = time.monotonic() + self.timeout_s * steps
        while True:
            ident, hdr, tensors = self._recv(f"step {step} traffic")
            op, rank = hdr["op"], hdr["rank"]
            if hdr["step"] != step:
                self.stats.dropped_messages += 1
                log.error("dropped %r for step %s from rank %s during step %s", op, hdr["step"],
                          rank, step)
                continue
            if op == "error":
                message = str(hdr.get("message", "?"))[:2000]
                if hdr.get("public") is True:  # a tpserve error on the rank: its own sentence
                    raise RankFailure(f"rank {rank} failed in step {step}: {message}")
                raise RankFailure(f"rank {rank} failed in step {step}; its error is in the "
                                  f"server's log", detail=message)
            if op == "result" and rank == 0 and tensors:
                self.stats.steps += 1
                if self.data is not None:  # reductions the ranks ran among themselves
                    self.stats.allreduce_count += uint(hdr, "reductions")
                    self.stats.allreduce_seconds += uint(hdr, "reduce_ns") * 1e-9
                return tensors
            if op != "reduce" or len(tensors) != 1 or self.data is not None:
                self.stats.dropped_messages += 1
                log.error("dropped unexpected %r from rank %s in step %s", op, rank, step)
                continue
            seq = hdr["seq"]
            parts = partials.setdefault(seq, [None] * self.tp)
            started.setdefault(seq, time.perf_counter())
            if parts[rank] is not None:
                self.stats.dropped_messages += 1
                log.error("dropped a replayed partial %s of rank %s in step %s", seq, rank, step)
                continue
            if parts[0] is not None and tensors[0].shape != parts[0].shape:
                raise RankFailure(f"rank {rank} sent a partial of shape {list(tensors[0].shape)} "
                                  f"for reduction {seq}, rank 0 sent {list(parts[0].shape)}")
            parts[rank] = tensors[0]
            self._deadline = time.monotonic() + self.timeout_s  # progress: re-arm the deadline
            if all(p is not None for p in parts):
                out = encode({"op": "sum", "step": step, "seq": seq}, [reduce_sum(parts)])
                for r in range(self.tp):
                    self._send(r, out, copy=False)
                del partials[seq]
                self.stats.allreduce_count += 1
                self.stats.allreduce_seconds += time.perf_counter() - started.pop(seq)

    def abort(self) -> None:
        if self.data is not None:
            self.data.abort()

    def stop(self) -> None:
        self.abort()  # ranks blocked in a shared-memory wait see it at once
        msg = encode({"op": "stop", "step": self.step_id})
        for ident in self.identities:
            with contextlib.suppress(zmq.ZMQError):  # a rank already gone
                if ident is not None:
                    self.sock.send_multipart([ident, *msg])

    def close(self) -> None:
        self.stop()
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        if self.data is not None:
            self.data.close()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _data_driver(path: str, tp: int, host: str, timeout_s: float):
    """The driver half of a data path the ranks run among themselves; None for the zmq star."""
    if path == "shm":
        from tpserve.runtime.shm import ShmDriver
        return ShmDriver(tp)
    if path in ("cuda", "nccl", "gloo"):
        from tpserve.runtime.torch_dist import DistDriver
        return DistDriver(path, host, timeout_s)
    assert path == "zmq", path
    return None
