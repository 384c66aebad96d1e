"""Sampling on rank 0, where the ranks' step holds the head (`tpserve.model.rank_head`).

Without it a step with a sampled request (temperature, penalties, logprobs) makes rank 0 send the
step's fp32 logits to the coordinator, whose sampler picks the tokens: batch x vocab x 4 bytes a
step (4 MB at batch 8 with a 128K vocabulary), and a sort of each row on the host for top-p. Here
rank 0 runs the same batched sampler (`sampling.sample`) on its device and sends back the tokens
and the logprobs asked for:

- the coordinator (`sample_sync.SampleSync`) sends rank 0 the parameters of the step's new requests (`op:
  params` messages of at most PARAMS_BYTES each, ahead of the step on the same socket), then the
  step with, per request, its id and the output tokens rank 0 has not seen yet (usually the one
  sampled last step);
- rank 0 (`RankSampler`) keeps a `SampleRow` per request between steps, so a seeded request's
  generator and a penalized one's token counts live where its logits are; a request absent from
  a sampling step is dropped (every running request is in every step). A request is new to rank 0
  at its prefill (the step's token ids are its prompt), or, when it decoded by the argmax alone
  so far, in the first step a neighbour samples (then its prompt is not needed);
- rank 0 answers [tokens [B] (-1: this row could not be sampled), the chosen tokens' logprobs [B],
  the top ids [B, K] and their logprobs [B, K]] (K: the most logprobs a row asked for), and where a
  request echoes its prompt's logprobs, the step's logits as before (the coordinator computes
  those; no generator is involved);
- a sampled burst is one decode step message with `steps: S` (no logits) and the same entries:
  rank 0 feeds each step's tokens to the next (`SampledBurst`) and answers the same four tensors
  with a leading [S].

A single in-process rank (tp=1, `LocalExecutor`), whose step holds the head too, samples the same
way: the same `SampleSync` and `RankSampler`, without the wire.
"""

from __future__ import annotations

import logging

import torch

from tpserve.errors import TpserveError, client_message
from tpserve.runtime.wire import WireError
from tpserve.serve.sample_sync import params_from_wire
from tpserve.serve.sampling import SampleRow, sample, sample_tensors
from tpserve.serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
MAX_PENDING = 1 << 16  # parameters rank 0 holds for requests not stepped yet


def sample_each(logits: torch.Tensor | None, rows: list[SampleRow],
                argmax: torch.Tensor | None = None) -> list[tuple]:
    """(token, logprob) per row; (None, message) for a row that cannot be sampled. `argmax`: the
    logits' argmax where the step computed it with the head (greedy rows take it; `logits` may
    then be None, see `needs_logits`). Parameters are validated before they get here; should one
    row still break the batched sampler, the rows are redone one by one so only that row fails,
    never the step."""
    try:
        return list(zip(*sample(logits, rows, argmax)))
    except Exception as e:
        log.error("batched sampling failed (%s: %s); sampling row by row", type(e).__name__, e)
    return one_by_one(logits, rows, argmax)


def one_by_one(logits: torch.Tensor | None, rows: list[SampleRow],
               argmax: torch.Tensor | None = None) -> list[tuple]:
    """`sample_each` after the batched sampler failed: each row alone."""
    out = []
    for i, row in enumerate(rows):
        try:
            toks, lps = (sample(None, [row], argmax[i:i + 1]) if logits is None
                         else sample(logits[i:i + 1], [row]))
            out.append((toks[0], lps[0]))
        except Exception as e:
            out.append((None, client_message("sampling this request failed", e, log)))
    return out


class RankSampler:
    """Rank 0's side: a `SampleRow` per running request, kept between steps."""

    def __init__(self, eos_token_ids, vocab: int):
        self.eos, self.vocab = tuple(eos_token_ids), vocab
        self.rows: dict[int, SampleRow] = {}
        self.pending: dict[int, SamplingParams] = {}  # from `params` messages, for the next step

    def take(self, params) -> None:
        """A `params` message: [[request id, parameters], ...] (WireError if malformed)."""
        if not isinstance(params, list) or len(self.pending) + len(params) > MAX_PENDING:
            raise WireError("a params message is a list of [request id, parameters]")
        for e in params:
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], int)):
                raise WireError("a params entry is [request id, parameters]")
            p = params_from_wire(e[1])
            if any(t >= self.vocab for t, _ in p.logit_bias):  # an index on the device
                raise WireError(f"logit_bias names a token outside the {self.vocab}-token "
                                f"vocabulary")
            self.pending[e[0]] = p

    def check(self, entries, sequences: int) -> None:
        """A step's sampling entries (WireError: the step is dropped unrun, never stopped halfway,
        which a burst's later steps could not be): by shape, and each request once, known here
        or with its parameters sent ahead."""
        if not isinstance(entries, list) or len(entries) != sequences or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], int)
                and isinstance(e[1], list)
                and all(isinstance(t, int) and 0 <= t < self.vocab for t in e[1])
                for e in entries):
            raise WireError(f"a sampling step of {sequences} sequences needs [request id, output "
                            f"token ids] for each")
        ids = [e[0] for e in entries]
        if len(set(ids)) != len(ids):
            raise WireError("a sampling step names a request twice")
        unknown = [i for i in ids if i not in self.rows and i not in self.pending]
        if unknown:
            raise WireError(f"request {unknown[0]} is new to rank 0 but came without its sampling "
                            f"parameters")

    def _rows(self, entries, ids: torch.Tensor, lens: list[int]) -> list[SampleRow]:
        rows, kept, start = [], {}, 0
        pending, self.pending = self.pending, {}
        for (rid, new), n in zip(entries, lens):
            row = self.rows.get(rid)
            if row is None:
                if rid not in pending:
                    raise TpserveError(f"request {rid} is new to rank 0 but came without its "
                                       f"sampling parameters")
                # At its prefill (no output yet) the step's token ids are its prompt. A request
                # new here later decoded greedily by the argmax alone so far (one that samples,
                # is penalized or wants logprobs comes here from its prefill on): its prompt,
                # which only a repetition penalty reads, is not needed.
                prompt = [] if new else ids[start:start + n].tolist()
                row = SampleRow(pending[rid], prompt, [], self.eos)
            if rid in kept:
                raise TpserveError(f"request {rid} appears twice in one step")
            row.output.extend(new)
            kept[rid] = row
            rows.append(row)
            start += n
        self.rows = kept
        return rows

    def sample(self, logits: torch.Tensor, argmax: torch.Tensor | None, ids: torch.Tensor,
               plan, entries) -> list[torch.Tensor]:
        """The step's logits (rows `plan.out_rows`) -> [tokens, logprobs, top ids, top logprobs]
        of each sequence's last row (the module docstring), on the logits' device."""
        rows = self._rows(entries, ids, list(plan.lens))
        out_rows = plan.out_rows if plan.out_rows is not None else range(plan.num_tokens)
        ends, start, j = [], 0, 0
        for n in plan.lens:  # each sequence's last out row, in the order the rows were laid
            start += n
            while j < len(out_rows) and out_rows[j] < start:
                j += 1
            if j == 0 or ends and ends[-1] == j - 1:
                raise TpserveError("a sampling step needs an output row in every sequence")
            ends.append(j - 1)
        if ends != list(range(len(out_rows))):  # a prefill's, or a step with extra rows
            last = torch.as_tensor(ends, device=logits.device)
            logits, argmax = logits[last], None if argmax is None else argmax[last]
        return self.sample_rows(logits, argmax, rows, [rid for rid, _ in entries])[0]

    def sample_rows(self, logits: torch.Tensor, argmax: torch.Tensor | None,
                    rows: list[SampleRow], rids: list[int]) -> tuple[list[torch.Tensor], bool]:
        """One logits row per sampled row -> ([tokens, logprobs, top ids, top logprobs], whether
        they are on the host): on the logits' device without waiting for it, or, where the
        batched sampler fails, row by row on the host, -1 for a row that cannot be sampled."""
        k = max((r.params.logprobs or 0 for r in rows), default=0)
        try:
            s = sample_tensors(logits, rows, argmax)
            return [s.tokens, s.chosen, s.top_ids, s.top_vals], False
        except Exception as e:
            log.error("batched sampling failed (%s: %s); sampling row by row",
                      type(e).__name__, e)
        res = one_by_one(logits, rows, argmax)
        for (tok, p), rid in zip(res, rids):
            if tok is None:
                log.error("rank 0 could not sample request %s: %s", rid, p)
        lps = [p if tok is not None else None for tok, p in res]
        tops = [[] if p is None else p.top[:k] for p in lps]
        pad = [(-1, 0.0)] * k
        return [torch.tensor([-1 if tok is None else tok for tok, _ in res], dtype=torch.int64),
                torch.tensor([0.0 if p is None else p.logprob for p in lps], dtype=torch.float32),
                torch.tensor([[t for t, _ in (top + pad)[:k]] for top in tops],
                             dtype=torch.int64).view(len(rows), k),
                torch.tensor([[v for _, v in (top + pad)[:k]] for top in tops],
                             dtype=torch.float32).view(len(rows), k)], True

    def reset(self) -> None:
        """A rebuilt group, a failed step, or a step that samples nothing (all its rows greedy,
        so none has state worth keeping): no request is known here any more."""
        self.rows, self.pending = {}, {}

    def burst(self, ids: torch.Tensor, plan, entries) -> "SampledBurst":
        """The `pick` of a sampled decode burst (`rank_head.decode_ids`) over this sampler."""
        return SampledBurst(self, ids, plan, entries)


class SampledBurst:
    """Rank 0's side of a sampled decode burst: each step's rows sampled as one step of
    `RankSampler.sample`, each token it picked handed to its row as the next step's new output,
    as the coordinator hands it in step-by-step decoding (so the seeded streams and penalty
    counts are those of single steps). The picks stay on the device (`SampleRow.feed`) and the
    next step reads them there, so the host queues the burst's steps without waiting for any;
    the rows' `output` lists catch up at `result`. A row that could not be sampled (-1, only
    where the batched sampler failed and the rows were sampled one by one on the host) feeds
    token 0 on and gets no output; the coordinator fails its request there."""

    def __init__(self, sampler: RankSampler, ids: torch.Tensor, plan, entries):
        self.sampler, self.ids, self.plan, self.entries = sampler, ids, plan, entries
        self.rids = [rid for rid, _ in entries]
        self.rows: list[SampleRow] | None = None
        self.steps: list[list[torch.Tensor]] = []
        self.failed: list[int] = []  # rows the last step could not sample (host-known)
        params = [sampler.rows[rid].params if rid in sampler.rows else sampler.pending.get(rid)
                  for rid in self.rids]
        self.k = max((p.logprobs or 0 for p in params if p is not None), default=0)  # as `sample`

    def __call__(self, logits: torch.Tensor, argmax: torch.Tensor | None) -> torch.Tensor:
        try:
            if self.rows is None:
                self.rows = self.sampler._rows(self.entries, self.ids, list(self.plan.lens))
            else:
                last = self.steps[-1][0]
                for i, row in enumerate(self.rows):
                    if i not in self.failed:
                        row.feed(last, i)
            out, on_host = self.sampler.sample_rows(logits, argmax, self.rows, self.rids)
            self.failed = [i for i, t in enumerate(out[0].tolist()) if t < 0] if on_host else []
        except Exception as e:  # every rank runs the burst's steps: fail its rows, not the ranks
            log.error("rank 0 could not sample step %d of a burst (%s: %s); its requests fail",
                      len(self.steps), type(e).__name__, e)
            b, k = len(self.entries), self.k
            out = [torch.full((b,), -1, dtype=torch.int64), torch.zeros(b),
                   torch.full((b, k), -1, dtype=torch.int64), torch.zeros(b, k)]
            self.failed = list(range(b))
        self.steps.append(out)
        return out[0].clamp(min=0)

    def result(self) -> list[torch.Tensor]:
        """[tokens, logprobs, top ids, top logprobs], each with a leading [steps] dimension, on
        the host; each row's `output` takes the tokens it was fed (all but the last step's)."""
        out = [torch.stack([t.cpu() for t in col]) for col in zip(*self.steps)]
        toks = out[0][:-1].T.tolist()
        for row, fed in zip(self.rows or [], toks):
            n = 0
            for t in fed:
                if t >= 0 and n < row.lag:
                    row.output.append(t)
                    n += 1
            row.lag = 0
        return out
