"""The head inside the ranks' step: steps from token ids, with only token ids crossing processes.

Where the ranks' all-reduce runs on the device (GPU ranks on the coordinator's host, NCCL), the
coordinator's round trip per step (its embedding -> every rank, rank 0's hidden rows -> its head)
costs more than the step itself. There the coordinator places its head (embedding, final norm,
lm_head in the head's format: `tpserve.model.head.Head`) on rank 0 instead, still one copy:

- every rank's step starts from the token ids: rank 0 embeds them, the other ranks contribute
  zeros, and one all-reduce of that [T, width] tensor hands every rank the step tensor (adding
  zeros is exact, so this is a broadcast on whatever path the group uses, inside a CUDA graph on
  NCCL);
- rank 0's step ends with the final norm, the lm_head and the argmax; only the argmax goes back to
  the coordinator, or where a request needs more (sampling, penalties, logprobs), rank 0 samples
  the step itself and sends the tokens and logprobs (`tpserve.serve.rank_sampling`); the fp32
  logits travel only for a prompt's echoed logprobs.

At tp=1 in one process the same object puts the head into the rank's captured decode step.
"""

from __future__ import annotations

import torch

from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan

def _chunks(vocab: int) -> int:
    """A divisor of `vocab` near 128 (0 if none in [32, 512]): chunks for `greedy`."""
    for d in sorted(range(32, 513), key=lambda d: abs(d - 128)):
        if vocab % d == 0:
            return d
    return 0


def greedy(logits: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """logits [b, vocab] -> their argmax [b] (int64): torch.argmax's answer (the first maximum; a
    NaN counts as the maximum), in two passes on a GPU: each of `chunks` slices of a row reduced
    to its (max, first index), then the first best slice. torch reduces a row in one thread block:
    ~28 us per decode step for a 128k vocabulary on an H200, in a step of ~2.5 ms."""
    b, v = logits.shape
    c = _chunks(v) if chunks is None else chunks
    if c <= 1 or not (logits.is_cuda or chunks):
        return logits.argmax(-1)
    assert v % c == 0, (v, c)
    vals, idx = logits.reshape(b, c, v // c).max(-1)  # [b, c]: per slice, its first maximum
    best = vals.argmax(-1, keepdim=True)  # the first slice holding the row's maximum
    return (best * (v // c) + idx.gather(1, best)).squeeze(1)


HEAD_AT = ("auto", "coordinator", "rank0")  # where Ray ranks' head runs; auto: rank0 for same-host GPUs
MAX_DECODE_STEPS = 64  # decode steps one message may ask for (`decode_ids`)


class RankHead:
    """`head` on rank 0 (None on the others) plus the group's all-reduce."""

    def __init__(self, head, comm, width: int, dtype: torch.dtype, device):
        self.head, self.comm, self.width = head, comm, width
        self.dtype, self.device = dtype, torch.device(device)
        # An all-reduce precedes the layers' where the step tensor is shared from rank 0.
        self.reductions = 0 if comm.world_size == 1 else 1

    @property
    def nbytes(self) -> int:
        return 0 if self.head is None else self.head.nbytes

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] (on this rank's device) -> the step tensor [T, width] on every rank."""
        if self.head is not None:
            x = self.head.embed(ids).to(self.dtype)
            if x.shape[1] != self.width:  # the other ranks' zeros must meet it in the all-reduce
                raise TpserveError(f"rank 0's step tensor has {x.shape[1]} columns, the ranks "
                                   f"expect {self.width}")
        else:
            x = torch.zeros(ids.shape[0], self.width, dtype=self.dtype, device=self.device)
        return self.comm.all_reduce(x) if self.reductions else x

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """Final hidden rows -> fp32 logits on rank 0; None on the others."""
        return None if self.head is None else self.head.logits(h)


def step_ids(model, head: RankHead, ids: torch.Tensor, plan: StepPlan
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One step of `model` (a `RankModel`) from token ids [T] (host) -> (fp32 logits of the rows
    `plan.out_rows`, their argmax); both None on ranks without the head. A decode step, or a
    short prefill step (`DecodeGraphs.takes_prefill`), replays a captured graph where there is
    one."""
    graphs = model.graphs
    with torch.inference_mode():  # the graphs' static buffers are inference tensors
        if graphs is not None and graphs.with_head and plan.is_decode and (
                plan.out_rows is None or plan.out_rows == list(range(len(plan.slots)))):
            model.cache.check(plan)
            return graphs.run_ids(ids, plan)
        if graphs is not None and graphs.with_head and graphs.takes_prefill(plan):
            model.cache.check(plan)
            return graphs.run_prefill(ids, plan)
        out = model(head.embed(ids.to(model.device)), plan)
        logits = head.logits(out if plan.out_rows is None else out[plan.out_rows])
    return logits, None if logits is None else greedy(logits)


def decode_ids(model, head: RankHead, ids: torch.Tensor, plan: StepPlan, steps: int,
               pick=None) -> torch.Tensor | None:
    """`steps` decode steps of `model` from token ids [b] (host, one per sequence of the decode
    plan `plan`), each one position further (`plan.advanced`). Greedy (`pick` None): each step's
    argmax is the next step's token ids on the device, and the host is not waited on between
    steps, so a captured step's replays queue back to back. Sampled (rank 0 of a sampled burst,
    `rank_sampling.RankSampler.burst`): `pick(logits, argmax)` -> the next step's token ids [b]
    (on the device: then the host queues the next step without waiting for this one).
    -> what each step fed forward [steps, b] (None on ranks without the head). Tokens after a
    sequence's stop are the caller's to drop (their cache rows lie past its end, where nothing
    reads them)."""
    graphs, out = model.graphs, []
    graphed = graphs is not None and graphs.with_head
    cur = ids if graphed else ids.to(model.device)
    with torch.inference_mode():
        for k in range(steps):
            pk = plan.advanced(k)
            if graphed:
                model.cache.check(pk)
                logits, argmax = graphs.run_ids(cur, pk)  # cur None: the last argmax, on device
            else:  # eager (CPU ranks): the same steps, one at a time
                logits = head.logits(model(head.embed(cur), pk))
                argmax = None if logits is None else greedy(logits)
            if argmax is None:  # a rank without the head: its ids are never read
                cur = None if graphed else cur
                continue
            if pick is None:
                out.append(argmax.clone() if graphed else argmax)  # the replay reuses its buffer
                cur = None if graphed else argmax
            else:
                out.append(pick(logits, argmax))
                cur = out[-1] if graphed else out[-1].to(model.device)
    return torch.stack(out) if out else None


def malformed(argmax: torch.Tensor, logits: torch.Tensor | None, plan: StepPlan,
              vocab: int, steps: int = 1) -> str | None:
    """What is wrong with rank 0's answer to a step (or `steps` decode steps) from token ids."""
    rows = plan.num_tokens if plan.out_rows is None else len(plan.out_rows)
    want = (rows,) if steps == 1 else (steps, rows)
    if argmax.shape != want or rows and not 0 <= int(argmax.min()) <= int(argmax.max()) < vocab:
        return f"argmax {list(argmax.shape)} for {list(want)} rows of a {vocab}-token vocabulary"
    return None if logits is None else malformed_logits(logits, plan, vocab)


def malformed_logits(logits: torch.Tensor, plan: StepPlan, vocab: int) -> str | None:
    """What is wrong with the logits rank 0 shipped for a step's rows `plan.out_rows`."""
    rows = plan.num_tokens if plan.out_rows is None else len(plan.out_rows)
    if logits.shape != (rows, vocab) or logits.dtype != torch.float32:
        return f"logits {list(logits.shape)} {logits.dtype} for {rows} rows x {vocab}"
    return None
