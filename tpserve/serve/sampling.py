"""The sampler: one set of tensor operations per step (its parameters: `sampling_params`).

`sample(logits, rows)` takes the step's fp32 logits [B, vocab] (any device) and one `SampleRow`
per sequence. Every per-request knob becomes a [B] tensor (temperature, top-k, top-p, min-p,
penalties) or a sparse index list (logit_bias, tokens banned by min_tokens), so the math is the
same few kernels whatever the batch holds. Only seeded rows draw their noise one row at a time,
from their own `torch.Generator` (torch has no batched per-row generator). Only the chosen ids and
the requested logprobs come back to the host. `sample_tensors` does the same and leaves them on
the device: it never waits for the device (the host lists it needs go up through pinned memory),
so rank 0 queues a sampled decode burst's steps back to back (`rank_sampling.SampledBurst`).

Sampling is the Gumbel-max trick in its exponential form: argmax(p / q), q ~ Exp(1), draws from
p exactly and needs no cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpserve.errors import TpserveError
from tpserve.serve.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs of one sequence this step."""
    params: SamplingParams
    prompt: list[int]
    output: list[int]
    eos_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None  # made on the logits' device at first use
    # A penalized row's token counts, kept on the logits' device and updated with the new output
    # tokens each step (rebuilding them from the lists made every step cost O(context)).
    counts: torch.Tensor | None = None  # [vocab] float: occurrences in the output
    seen: torch.Tensor | None = None  # [vocab] bool: in the prompt (repetition_penalty)
    counted: int = 0  # output tokens in `counts`
    # Output tokens sampled in a burst and fed back on the device (counted there where the row
    # is penalized), not yet in `output`: `rank_sampling.SampledBurst` appends them at its end.
    lag: int = 0

    def length(self) -> int:
        """Output tokens so far, those still on the device included."""
        return len(self.output) + self.lag

    def feed(self, tokens: torch.Tensor, i: int) -> None:
        """tokens[i], the token this row was given last step, still on the device: counted where
        the row is penalized (no host round trip); it joins `output` when the burst settles."""
        if self.params.penalized:
            if self.counts is None or self.counted != self.length():
                raise TpserveError("a penalized row's counts fell behind its output")
            dev = self.counts.device
            self.counts.index_add_(0, tokens[i:i + 1].to(dev), torch.ones(1, device=dev))
            self.counted += 1
        self.lag += 1


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None only for a prompt's first token, which nothing predicts
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


@dataclass
class Sampled:
    """One step's picks on the logits' device."""
    tokens: torch.Tensor  # [B] int64
    chosen: torch.Tensor  # [B] fp32: each token's logprob (0 where no row asked for logprobs)
    top_ids: torch.Tensor  # [B, K] int64: the K most likely tokens (K: the most a row asked for)
    top_vals: torch.Tensor  # [B, K] fp32: their logprobs


def make_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _dev(values, dtype, device) -> torch.Tensor:
    """A host list as a tensor on `device`; onto a GPU through pinned memory, so the host does not
    wait for the device's queue to drain (a plain copy from a list would)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _row_counts(r: SampleRow, vocab: int, device) -> torch.Tensor:
    """r.counts brought up to r.output (only the tokens since the last step are added); the
    prompt's tokens in r.seen, once."""
    if r.counts is None or r.counts.device != device or r.counts.numel() != vocab \
            or r.counted > r.length():
        if r.lag:
            raise TpserveError("a penalized row's counts cannot be rebuilt inside a burst")
        r.counts, r.counted = torch.zeros(vocab, device=device), 0
        r.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        r.seen[_dev(r.prompt, torch.long, device)] = True
    new = r.output[r.counted:]
    if new:
        r.counts.index_add_(0, _dev(new, torch.long, device), torch.ones(len(new), device=device))
        r.counted = len(r.output)
    return r.counts


def _per_row(values, device) -> torch.Tensor:
    return _dev(values, torch.float32, device)[:, None]


def _sparse_add(x: torch.Tensor, triples: list[tuple[int, int, float]]) -> None:
    """x[row, col] += value for each triple, in one indexed add."""
    if triples:
        rows, cols, vals = zip(*triples)
        idx = (_dev(rows, torch.long, x.device), _dev(cols, torch.long, x.device))
        x.index_put_(idx, _dev(vals, x.dtype, x.device), accumulate=True)


def _processed(rows: list[SampleRow]) -> bool:
    """Whether any row asks for a logit bias, a penalty or a banned token (min_tokens)."""
    return any(r.params.logit_bias or r.params.penalized or r.length() < r.params.min_tokens
               for r in rows)


def process(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logit_bias, penalties and min_tokens applied to fp32 logits [B, vocab]: a new tensor, or
    `logits` itself when no row asks for any of them (the common case costs no kernel)."""
    if not _processed(rows):
        return logits
    params = [r.params for r in rows]
    x = logits.float().clone()
    _sparse_add(x, [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias])
    if any(p.penalized for p in params):
        vocab, zero = x.shape[1], x.new_zeros(x.shape[1])
        out = torch.stack([_row_counts(r, vocab, x.device) if r.params.penalized else zero
                           for r in rows])
        if any(p.repetition_penalty != 1 for p in params):
            seen = torch.stack([r.seen if r.params.penalized else zero.bool() for r in rows]) \
                | (out > 0)
            rep = _per_row([p.repetition_penalty for p in params], x.device)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - _per_row([p.frequency_penalty for p in params], x.device) * out
        x = x - _per_row([p.presence_penalty for p in params], x.device) * (out > 0)
    banned = [(i, t) for i, r in enumerate(rows) if r.length() < r.params.min_tokens
              for t in set(r.params.stop_token_ids) | set(
                  () if r.params.ignore_eos else r.eos_token_ids) if t < x.shape[1]]
    if banned:
        i, t = zip(*banned)
        x[_dev(i, torch.long, x.device), _dev(t, torch.long, x.device)] = float("-inf")
    return x


def truncate(y: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p on what top-k kept: [B, vocab] logits with the cut tokens at -inf."""
    vocab = y.shape[1]
    k = _dev([min(p.top_k, vocab) or vocab for p in params], torch.long, y.device)
    top_p = _per_row([p.top_p for p in params], y.device)
    ordered, order = y.sort(-1, descending=True)
    keep = torch.arange(vocab, device=y.device)[None, :] < k[:, None]
    p = ordered.masked_fill(~keep, float("-inf")).softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays,
    # also where top_p underflows to 0 in fp32).
    keep &= (p.cumsum(-1) - p < top_p) | (top_p >= 1)
    keep[:, 0] = True
    return torch.full_like(y, float("-inf")).scatter_(1, order, ordered.masked_fill(~keep,
                                                                                    float("-inf")))


def _draw(probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    q = torch.empty_like(probs).exponential_()
    for i, r in enumerate(rows):  # seeded rows: their own stream, whatever the batch holds
        if r.params.seed is not None and not r.params.greedy:
            if r.generator is None:
                r.generator = make_generator(r.params.seed, probs.device)
            q[i].exponential_(generator=r.generator)
    return (probs / q.clamp_min(1e-30)).argmax(-1)


def needs_logits(rows: list[SampleRow]) -> bool:
    """Whether sampling these rows reads their logits; False when every row takes the argmax as
    it is (greedy, no bias, penalty, min_tokens or logprobs): then the argmax alone will do."""
    return _processed(rows) or any(not r.params.greedy or r.params.logprobs is not None
                                   for r in rows)


def sample_tensors(logits: torch.Tensor | None, rows: list[SampleRow],
                   argmax: torch.Tensor | None = None) -> Sampled:
    """One token per row of fp32 logits [B, vocab] and the logprobs the rows ask for, left on
    the logits' device; the host never waits for the device here. `argmax`, when the caller has
    it (the head ran in the ranks' step), is `logits.argmax(-1)`; logits may be None where
    `needs_logits(rows)` is False and the argmax is given."""
    params = [r.params for r in rows]
    if argmax is not None:  # a captured step's output buffer, which its next replay overwrites
        argmax = argmax.clone()
    if logits is None:  # the caller asked `needs_logits` already: the argmax is every token
        assert argmax is not None
        return Sampled(argmax, *_no_logprobs(argmax))
    x = process(logits, rows)
    if x is not logits:
        # A row whose every logit is now -inf (a hostile bias or penalty) falls back to the raw
        # logits.
        dead = ~torch.isfinite(x).any(-1, keepdim=True)
        x = torch.where(dead, logits.float(), x)
    x = x.float()
    tokens = argmax if argmax is not None and x is logits else x.argmax(-1)
    if not all(p.greedy for p in params):
        temp = _per_row([1.0 if p.greedy else p.temperature for p in params], x.device)
        y = x / temp
        if any(p.top_k or p.top_p < 1 for p in params):
            y = truncate(y, params)
        probs = y.softmax(-1)
        if any(p.min_p for p in params):
            floor = _per_row([p.min_p for p in params], x.device) * probs.amax(-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0)
        greedy = _dev([p.greedy for p in params], torch.bool, x.device)
        tokens = torch.where(greedy, tokens, _draw(probs, rows))
    if all(p.logprobs is None for p in params):
        return Sampled(tokens, *_no_logprobs(tokens))
    return Sampled(tokens, *logprob_tensors(logits, tokens,
                                            max(p.logprobs or 0 for p in params)))


def _no_logprobs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = tokens.shape[0]
    return (torch.zeros(b, device=tokens.device),
            torch.zeros(b, 0, dtype=torch.long, device=tokens.device),
            torch.zeros(b, 0, device=tokens.device))


def sample(logits: torch.Tensor | None, rows: list[SampleRow],
           argmax: torch.Tensor | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """`sample_tensors` on the host: one token per row, and its logprobs where a row asked."""
    s = sample_tensors(logits, rows, argmax)
    return s.tokens.tolist(), token_logprobs(s, [r.params.logprobs for r in rows])


def logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's logprobs (before penalties, temperature and truncation) of `tokens` [B], and
    the top k of each row: ([B], [B, k] ids, [B, k] logprobs), on the logits' device."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return chosen, top_i, top_v


def token_logprobs(s: Sampled, ks: list[int | None]) -> list[TokenLogprob | None]:
    """`Sampled` on the host: row i's logprobs with its top ks[i] (None: it asked for none)."""
    if all(k is None for k in ks):
        return [None] * len(ks)
    chosen, top_i, top_v, tokens = (t.tolist() for t in (s.chosen, s.top_ids, s.top_vals,
                                                           s.tokens))
    return [None if k is None else TokenLogprob(tokens[i], chosen[i],
                                                list(zip(top_i[i][:k], top_v[i][:k])))
            for i, k in enumerate(ks)]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor,
                ks: list[int | None]) -> list[TokenLogprob | None]:
    """The model's logprobs of `tokens` [B] and the top k[i] of each row i (None: no logprobs
    for that row)."""
    kmax = max((k for k in ks if k is not None), default=0)
    return token_logprobs(Sampled(tokens, *logprob_tensors(logits, tokens, kmax)), ks)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob]:
    """Logprobs of each prompt token from the prompt's logits rows [len(prompt), vocab]."""
    first = [TokenLogprob(prompt[0], None, [])]  # nothing predicts a prompt's first token
    if len(prompt) == 1:
        return first
    nxt = torch.as_tensor(prompt[1:], dtype=torch.long, device=logits.device)
    return first + logprobs_of(logits[:-1], nxt, [k] * len(nxt))
