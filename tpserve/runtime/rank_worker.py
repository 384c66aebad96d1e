"""A TP rank: its own process (a Ray actor), its own shard, its own KV cache, a ZMQ DEALER.

Ray starts, places, monitors and kills the actor; steps and setup travel over ZMQ. `serve()` runs
the step loop in one of the actor's two concurrency slots so `health()` is answered meanwhile.
The model holds a `RankComm` whose data path is the ZMQ star until the coordinator's `setup`
message names another one (shared memory, NCCL, gloo).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import torch
import zmq

from tpserve.kernels import HeadFormat
from tpserve.model.config import load_configs
from tpserve.model.head import Head
from tpserve.model.rank_head import MAX_DECODE_STEPS, RankHead, decode_ids, step_ids
from tpserve.errors import TpserveError
from tpserve.model.decoder import RankModel, build_rank_model
from tpserve.model.shard_plan import ShardPlan
from tpserve.runtime.comm import RankComm
from tpserve.runtime.profiling import StepProfiler
from tpserve.runtime.ray_placement import code_fingerprint, share_threads
from tpserve.runtime.wire import WireError, chunk_rows, decode, encode, plan_from_wire, uint
from tpserve.serve.rank_sampling import RankSampler

log = logging.getLogger(__name__)


class Stopped(Exception):
    pass


class ZmqPath:
    """The zmq path's rank half: send this rank's partial to the coordinator, receive the sum."""

    capturable = False  # the host carries the bytes

    def __init__(self, sock: zmq.Socket, rank: int, timeout_s: float):
        self.sock, self.rank, self.timeout_s = sock, rank, timeout_s

    def reduce(self, x: torch.Tensor, step: int, seq: int) -> torch.Tensor:
        self.sock.send_multipart(encode({"op": "reduce", "step": step, "seq": seq,
                                         "rank": self.rank}, [x]), copy=False)
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise TpserveError(f"rank {self.rank}: the sum of reduction {seq} did not "
                                   f"arrive within {self.timeout_s:.0f}s")
            try:
                h, ts = decode(self.sock.recv_multipart(copy=False))
            except WireError as e:
                log.error("rank %d dropped a malformed message: %s", self.rank, e)
                continue
            if h["op"] == "stop":
                raise Stopped()
            if h["op"] == "sum" and h["step"] == step and h["seq"] == seq and len(ts) == 1:
                return ts[0].to(x.device, x.dtype)
            log.error("rank %d dropped %r (step %s seq %s) while waiting for sum %s/%s", self.rank,
                      h["op"], h["step"], h["seq"], step, seq)


def data_path(name, setup, sock: zmq.Socket, rank: int, tp: int, timeout_s: float):
    """The rank half of the data path the coordinator's setup message names."""
    if not isinstance(setup, dict):
        raise WireError("setup header has no comm map")
    if name == "zmq":
        return ZmqPath(sock, rank, timeout_s)
    if name == "shm":
        from tpserve.runtime.shm import ShmPath
        return ShmPath(setup, rank, tp, timeout_s)
    if name in ("cuda", "nccl", "gloo"):
        from tpserve.runtime.torch_dist import DistPath
        return DistPath(setup, rank, tp, timeout_s)
    raise WireError(f"setup names an unknown all-reduce path {name!r}")


class RankWorker:
    def __init__(self, rank: int, tp: int, path: str, dtype: str, device: str, num_slots: int,
                 max_len: int, timeout_s: float = 60.0, threads: int | None = None,
                 cpu_share: tuple[int, int] | None = None):
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
        self.rank, self.tp, self.path, self.device = rank, tp, path, device
        self.dtype, self.num_slots, self.max_len = getattr(torch, dtype), num_slots, max_len
        self.comm, self.timeout_s = RankComm(rank, tp), timeout_s
        self.gpu = 0  # Ray exposes only this rank's GPU unless `see_gpus` widened the view
        self.model: RankModel | None = None
        self.head: RankHead | None = None  # set where the coordinator places its head here
        self.sampler: RankSampler | None = None  # rank 0's, with the head
        self.steps = 0
        self.last_step = 0
        self.profiler = StepProfiler(rank)  # TPSERVE_PROFILE: a window of steps, else nothing
        if cpu_share:
            threads = share_threads(*cpu_share)
        if threads:
            torch.set_num_threads(threads)

    def node_info(self) -> dict:
        import ray
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "pid": os.getpid(), "path_ok": (Path(self.path) / "config.json").is_file(),
                "threads": torch.get_num_threads(), "code": code_fingerprint(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def see_gpus(self, visible: list[str]) -> None:
        """See every GPU of this node's ranks (before CUDA starts) so NCCL can use P2P/NVLink
        between them; this rank's own GPU becomes device `self.gpu` of that list."""
        import ray
        self.gpu = visible.index(str(ray.get_gpu_ids()[0]))
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible)

    def load(self) -> dict:
        t0 = time.perf_counter()
        self.cfg, self.quant = cfg, quant = load_configs(self.path)
        plan = ShardPlan.build(cfg, self.tp)
        device = self.device
        if device == "cuda":
            torch.cuda.set_device(self.gpu)
        self.model = build_rank_model(self.path, cfg, quant, plan, self.comm, self.dtype, device,
                               self.num_slots, self.max_len)
        return {"rank": self.rank, "seconds": time.perf_counter() - t0,
                "bytes_read": self.model.ckpt.bytes_read, "kv_bytes": self.model.cache.nbytes}

    def load_head(self, lm_head: str) -> dict:
        """Take the coordinator's head: rank 0 loads it (embedding, final norm, lm_head in the
        `lm_head` format), every rank then steps from token ids (`tpserve.model.rank_head`)."""
        head = None
        if self.rank == 0:
            if self.device == "cuda":
                torch.cuda.set_device(self.gpu)
            head = Head.load(self.path, self.cfg, self.quant, self.dtype, self.device, lm_head)
        self.head = RankHead(head, self.comm, self.model.width, self.dtype, self.model.device)
        # rank 0 samples the steps whose requests need more than the argmax (`rank_sampling`)
        self.sampler = None if head is None else RankSampler(self.cfg.eos_token_ids,
                                                             self.cfg.vocab_size)
        return {"nbytes": self.head.nbytes,
                "format": None if head is None else HeadFormat(head.lm_head.mode).value}

    def health(self) -> dict:
        return {"rank": self.rank, "steps": self.steps, "pid": os.getpid()}

    def serve(self, address: str, keys: dict, setup_follows: bool = False) -> int:
        """Connect to the coordinator and run steps until it says stop. Returns the step count.
        `setup_follows`: the coordinator will name another data path than the zmq star before
        the first step (the graphs are captured for that path, not twice)."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, keys["identity"])  # minted by the driver: secret
        if "secret" in keys:
            sock.curve_serverkey = keys["server_public"]
            sock.curve_publickey = keys["public"]
            sock.curve_secretkey = keys["secret"]
        sock.connect(address)
        self.comm.path = ZmqPath(sock, self.rank, self.timeout_s)
        if self.device == "cuda":
            # The current device is per thread, and Ray may run serve() on another thread than
            # load(): tensors made as "cuda" here must land on this rank's GPU.
            torch.cuda.set_device(self.gpu)
            if not setup_follows:  # the zmq star: one graph per segment between all-reduces
                self.model.capture_graphs(self.head)
        sock.send_multipart(encode({"op": "hello", "rank": self.rank}))
        try:
            while True:
                if not sock.poll(1000):
                    continue
                try:
                    h, ts = decode(sock.recv_multipart(copy=False))
                    if h["op"] == "stop":
                        break
                    if h["op"] == "setup":
                        self._join(sock, h)
                        continue
                    if h["op"] == "params":  # sampling parameters for the next step (rank 0)
                        if self.sampler is None:
                            raise WireError("sampling parameters reached a rank without the head")
                        self.sampler.take(h.get("params"))
                        continue
                    ids = h.get("ids") is True
                    if h["op"] != "step" or len(ts) != 1 or ts[0].dim() != 2 - ids:
                        raise WireError(f"expected a step with one {2 - ids}-D tensor, got "
                                        f"{h['op']!r}")
                    if h["step"] <= self.last_step:
                        raise WireError(f"step {h['step']} is not after step {self.last_step}")
                    if ids:
                        self._check_ids(ts[0])
                    plan = plan_from_wire(h.get("plan"), ts[0].shape[0])
                    if h.get("sample") is not None and self.sampler is not None:
                        if not ids:
                            raise WireError("a sampling step must be a step of token ids")
                        self.sampler.check(h["sample"], len(plan.slots))
                    steps = uint(h, "steps") or 1
                    if steps > MAX_DECODE_STEPS:
                        raise WireError(f"{steps} decode steps exceed {MAX_DECODE_STEPS}")
                    if plan.copies:
                        if steps > 1:
                            raise WireError("a decode burst cannot carry KV copies")
                        try:
                            self.model.cache.check_copies(plan.copies)
                        except TpserveError as e:
                            raise WireError(str(e)) from None
                    if steps > 1:
                        if not (ids and plan.is_decode and h.get("logits") is False and
                                plan.out_rows in (None, list(range(len(plan.slots))))):
                            raise WireError(f"{steps} steps in one message need a decode step "
                                            f"of token ids with no logits")
                        try:  # the burst's last step must fit too: refused whole, never half run
                            self.model.cache.check(plan.advanced(steps - 1))
                        except TpserveError as e:
                            raise WireError(str(e)) from None
                except WireError as e:
                    log.error("rank %d dropped a message: %s", self.rank, e)
                    continue
                self.last_step = self.comm.step = h["step"]
                self.comm.seq = 0
                if ids and h.get("sample") is None and self.sampler is not None:
                    # a step that samples nothing holds every running request and none samples:
                    # the rows go (finished requests' ones too), as the coordinator's do
                    self.sampler.reset()
                self.profiler.before(self.steps)
                try:
                    if plan.copies:
                        self.model.cache.copy_prefixes(plan.copies)
                    if steps > 1:  # a decode burst: greedy, or sampled on rank 0
                        burst = (self.sampler.burst(ts[0], plan, h["sample"])
                                 if h.get("sample") is not None and self.sampler is not None
                                 else None)
                        toks = decode_ids(self.model, self.head, ts[0], plan, steps, burst)
                        out = (burst.result() if burst is not None and toks is not None
                               else [] if toks is None else [toks])
                    elif ids:
                        logits, argmax = step_ids(self.model, self.head, ts[0], plan)
                        shipped = (chunk_rows(logits) if logits is not None and
                                   h.get("logits") is not False else [])
                        if h.get("sample") is not None and logits is not None:  # rank 0
                            out = self.sampler.sample(logits, argmax, ts[0], plan,
                                                      h["sample"]) + shipped
                        else:
                            out = [argmax] + shipped
                    else:
                        out = self.model(ts[0].to(self.device, self.dtype), plan)
                        out = [out if plan.out_rows is None else out[plan.out_rows]]
                    counts = self.comm.take_counts()
                    if self.rank == 0:
                        sock.send_multipart(encode({"op": "result", "step": h["step"], "rank": 0,
                                                    **counts}, out), copy=False)
                except Stopped:
                    break
                except Exception as e:  # report, keep serving: the coordinator decides
                    log.exception("rank %d failed in step %d", self.rank, h["step"])
                    # a tpserve error's sentence is for users; any other text for the log only
                    public = isinstance(e, TpserveError)
                    sock.send_multipart(encode({"op": "error", "step": h["step"], "rank": self.rank,
                                                "message": str(e) if public else
                                                f"{type(e).__name__}: {e}", "public": public}))
                self.profiler.after(self.steps)
                self.steps += 1
        finally:
            sock.close(0)
            ctx.term()
        return self.steps

    def _check_ids(self, ids: torch.Tensor) -> None:
        if self.head is None:
            raise WireError("a step of token ids reached a rank that holds no part of the head")
        if ids.dtype != torch.int64 or ids.numel() == 0 or int(ids.min()) < 0 or \
                int(ids.max()) >= self.cfg.vocab_size:
            raise WireError(f"token ids must be int64 in [0, {self.cfg.vocab_size})")

    def _join(self, sock: zmq.Socket, h: dict) -> None:
        """Switch to the data path the coordinator set up; answer ready, or why not."""
        old, self.comm.path = self.comm.path, ZmqPath(sock, self.rank, self.timeout_s)
        if hasattr(old, "close"):  # a segment or process group of an earlier setup
            old.close()
        try:
            self.comm.path = data_path(h.get("path"), h.get("comm"), sock, self.rank, self.tp,
                                       self.timeout_s)
        except Exception as e:  # the coordinator turns it into a clear failure
            log.error("rank %d could not join the %r all-reduce: %s", self.rank, h.get("path"), e)
            sock.send_multipart(encode({"op": "error", "rank": self.rank,
                                        "message": f"{type(e).__name__}: {e}"}))
            return
        self.comm.capturable = self.tp == 1 or self.comm.path.capturable
        # fixed-point GEMV sums where the one-shot all-reduce takes the row-parallel ones
        if self.model is not None:
            one_shot = getattr(self.comm.path, "one_shot", None)
            self.model.use_fixed_sums(self.tp == 1 or one_shot is not None)
        if self.device == "cuda" and self.comm.capturable:  # now the whole step is one graph
            self.model.capture_graphs(self.head)
        sock.send_multipart(encode({"op": "ready", "rank": self.rank,
                                    "carry": getattr(self.comm.path, "kind", h.get("path"))}))
