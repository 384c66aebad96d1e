"""The coordinator's side of sampling on rank 0 (`tpserve.serve.rank_sampling` has the protocol
and rank 0's side): what rank 0's sampler holds of each request, the `params` messages that
bring it new requests' parameters, and rank 0's answers read back into (token, logprob) pairs."""

from __future__ import annotations

import dataclasses

import msgpack
import torch

from tpserve.runtime.wire import WireError
from tpserve.serve.sampling import TokenLogprob
from tpserve.serve.sampling_params import SamplingParams

_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {"stop"}
PARAMS_BYTES = 256 << 10  # the parameters one `params` message carries (a header is <= 1 MiB)


def params_to_wire(p: SamplingParams) -> dict:
    """What rank 0 needs of a request's parameters (stop strings are text: the coordinator's)."""
    d = {name: getattr(p, name) for name in _FIELDS}
    d["stop_token_ids"] = list(p.stop_token_ids)
    d["logit_bias"] = [[t, b] for t, b in p.logit_bias]
    return d


def wire_problem(p: SamplingParams) -> str | None:
    """Why `p` could not travel to rank 0 in a `params` message, or None. The engine asks when a
    request arrives: a parameter that failed to serialize inside a step would fail every request
    of that step, not only its own."""
    try:
        n = len(msgpack.packb([0, params_to_wire(p)]))
    except (TypeError, ValueError, OverflowError) as e:
        return f"its sampling parameters cannot be sent to the sampling rank ({e})"
    if n > PARAMS_BYTES:
        return (f"its sampling parameters take {n} bytes on the wire, over the "
                f"{PARAMS_BYTES >> 10} KiB one request may send to the sampling rank; send fewer "
                f"logit_bias or stop_token_ids entries")
    return None


def params_from_wire(d) -> SamplingParams:
    if not isinstance(d, dict) or not set(d) <= _FIELDS:
        raise WireError("sampling parameters must be a map of SamplingParams fields")
    try:
        d = {**d, "stop_token_ids": tuple(d.get("stop_token_ids", ())),
             "logit_bias": tuple((t, b) for t, b in d.get("logit_bias", ()))}
        return SamplingParams(**d)  # checks every value, as at the HTTP boundary
    except Exception as e:
        raise WireError(f"sampling parameters refused: {e}") from None


class SampleSync:
    """The coordinator's side: what rank 0's sampler holds of each request."""

    def __init__(self):
        self.sent: dict[int, int] = {}  # request id -> output tokens rank 0 has

    def entries(self, reqs) -> tuple[list[list], list[list]]:
        """([id, new output tokens] per request (engine `Request`s) of a sampling step, the
        `params` messages' contents for the requests rank 0 has not seen); requests not in the
        step are forgotten, as rank 0 forgets them."""
        out, sent, messages, size = [], {}, [[]], 0
        for r in reqs:
            have = self.sent.get(r.id)
            if have is None:
                p = [r.id, params_to_wire(r.params)]
                n = len(msgpack.packb(p))
                if size + n > PARAMS_BYTES and messages[-1]:
                    messages.append([])
                    size = 0
                messages[-1].append(p)
                size += n
            out.append([r.id, r.output[have or 0:]])
            sent[r.id] = len(r.output)
        self.sent = sent
        return out, [m for m in messages if m]

    def advance(self, reqs, steps: int) -> None:
        """After a sampled burst of `steps` decode steps: rank 0 fed each request the tokens it
        picked but the last, as the coordinator would have (`SampledBurst`); fewer to a request
        whose row failed, which fails there and is not stepped again."""
        for r in reqs:
            if r.id in self.sent:
                self.sent[r.id] += steps - 1

    def burst_results(self, reqs, out: list[torch.Tensor], steps: int) -> list[list[tuple]]:
        """Rank 0's answer to a sampled burst -> per step, (token, logprob) per request; what
        rank 0 holds of each request is advanced past the burst."""
        self.advance(reqs, steps)
        return [self.results(reqs, [t[k] for t in out]) for k in range(steps)]

    def reset(self) -> None:
        """A new rank group: rank 0 holds nothing."""
        self.sent = {}

    @staticmethod
    def results(reqs, out: list[torch.Tensor]) -> list[tuple]:
        """Rank 0's answer -> (token, logprob) per request as `sample_each` gives them."""
        toks, lp, top_ids, top_vals = (t.tolist() for t in out[:4])
        res = []
        for i, r in enumerate(reqs):
            if toks[i] < 0:
                res.append((None, "sampling failed for this request on rank 0 (see its log)"))
                continue
            k = r.params.logprobs
            res.append((toks[i], None if k is None else TokenLogprob(
                toks[i], lp[i], list(zip(top_ids[i][:k], top_vals[i][:k])))))
        return res

    @staticmethod
    def malformed(out: list[torch.Tensor], rows: int, vocab: int, steps: int = 1) -> str | None:
        """What is wrong with rank 0's answer to a sampling step of `rows` requests (a sampled
        burst of `steps` > 1 decode steps: each tensor with a leading [steps])."""
        if len(out) < 4:
            return f"{len(out)} tensors"
        toks, lp, top_ids, top_vals = out[:4]
        lead = () if steps == 1 else (steps,)
        k = top_ids.shape[-1] if top_ids.dim() == 2 + len(lead) else -1
        if toks.shape != (*lead, rows) or toks.dtype != torch.int64 or \
                lp.shape != (*lead, rows) or top_ids.shape != (*lead, rows, k) or \
                top_ids.dtype != torch.int64 or top_vals.shape != (*lead, rows, k) or \
                not lp.is_floating_point() or \
                not top_vals.is_floating_point():
            return f"sampled tensors {[list(t.shape) for t in out[:4]]} for {rows} rows"
        if rows and not (-1 <= int(toks.min()) and int(toks.max()) < vocab):
            return "sampled token ids outside the vocabulary"
        if top_ids.numel() and not (-1 <= int(top_ids.min()) and int(top_ids.max()) < vocab):
            return "logprob token ids outside the vocabulary"
        return None
