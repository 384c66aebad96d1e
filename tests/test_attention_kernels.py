"""Attention kernels: the Triton decode kernel against its torch reference (TRITON_INTERPRET=1), the
reference against a naive per-head softmax loop, batched prefill against per-sequence SDPA.

Run: python -m pytest tests/test_attention_kernels.py -q   (the module sets TRITON_INTERPRET=1)
Tiny shapes (the interpreter is slow); fp32 and fp16 only (bf16 is wrong in the interpreter). Every
cache position a sequence must not see (beyond its length, before its window, other slots) holds
NaN, so a kernel that reads one leaks NaN into the output and fails.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module decorates its @triton.jit

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from tpserve.kernels.prefill_attention import prefill_attention  # noqa: E402

att = importlib.import_module("tpserve.kernels.attention")
if not isinstance(att._decode_kernel, InterpretedFunction):  # imported earlier without the flag
    att = importlib.reload(att)

SLOTS, MAX_LEN = 6, 40
# name: (H, KVH, D); kv_group = H // KVH
HEADS = {"gqa4": (8, 2, 32), "mha": (4, 4, 16), "gqa3-d48": (6, 2, 48)}
# 20 query heads on one kv head: a group wider than one 16-row tl.dot tile (one test only)
WIDE = {"mqa20": (20, 1, 16)}
LENS = [0, 1, MAX_LEN, 7, 23, 16]  # empty padding row, first token, full cache, partial blocks


def _problem(heads, dtype, window, seed=0):
    """q, caches poisoned outside each sequence's visible keys, slots (shuffled), lens."""
    h, kvh, d = {**HEADS, **WIDE}[heads]
    gen = torch.Generator().manual_seed(seed)
    b = len(LENS)
    q = torch.randn(b, h, d, generator=gen).to(dtype)
    kc = torch.randn(SLOTS, MAX_LEN, kvh, d, generator=gen).to(dtype)
    vc = torch.randn(SLOTS, MAX_LEN, kvh, d, generator=gen).to(dtype)
    slots = torch.randperm(SLOTS, generator=gen)[:b]
    lens = torch.tensor(LENS, dtype=torch.int32)
    visible = torch.zeros(SLOTS, MAX_LEN, dtype=torch.bool)
    for slot, n in zip(slots.tolist(), LENS):
        visible[slot, max(0, n - window) if window else 0:n] = True
    kc[~visible] = float("nan")
    vc[~visible] = float("nan")
    return q, kc, vc, slots, lens, h // kvh


def _naive(q, kc, vc, slots, lens, kv_group, scale, window, softcap):
    """Per sequence, per head: explicit scores, max-subtracted exp, normalised sum, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, (slot, n) in enumerate(zip(slots.tolist(), lens.tolist())):
        lo = max(0, n - window) if window else 0
        for head in range(q.shape[1]):
            keys = kc[slot, lo:n, head // kv_group].double()
            vals = vc[slot, lo:n, head // kv_group].double()
            if n == 0:
                continue
            s = keys @ q[i, head].double() * scale
            if softcap:
                s = torch.tensor([math.tanh(x / softcap) * softcap for x in s.tolist()],
                                 dtype=torch.float64)
            e = torch.exp(s - s.max())
            out[i, head] = (e[:, None] * vals).sum(0) / e.sum()
    return out


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 2.0), (17, 5.0)])
def test_reference_matches_naive_loop(heads, window, softcap):
    q, kc, vc, slots, lens, group = _problem(heads, torch.float32, window)
    scale = q.shape[-1] ** -0.5 * 3  # sharper softmax than 1/sqrt(d), and softcap 2 bites
    ref = att.decode_attention_reference(q, kc, vc, slots, lens, group, scale, window, softcap)
    naive = _naive(q, kc, vc, slots, lens, group, scale, window, softcap)
    # fp32 einsum/softmax vs float64 loop: summation order and rounding only.
    assert (ref.double() - naive).abs().max().item() < 1e-5
    assert ref[0].eq(0).all(), "a lens == 0 row must be exactly zero"


def _check_kernel(heads, dtype, window, softcap, num_splits, block_n, slot_dtype=torch.int64,
                  one_keys=0):
    """one_keys 0: every split with a key block is used (the merge, on this 40-position cache)."""
    q, kc, vc, slots, lens, group = _problem(heads, dtype, window)
    scale = q.shape[-1] ** -0.5
    out = att.decode_attention_triton(q, kc, vc, slots.to(slot_dtype), lens, group, scale, window,
                                      softcap, num_splits=num_splits, block_n=block_n,
                                      one_keys=one_keys)
    ref = att.decode_attention_reference(q.float(), kc.float(), vc.float(), slots, lens, group,
                                         scale, window, softcap)
    assert out.dtype == dtype and out.shape == q.shape
    assert out[0].eq(0).all(), "a lens == 0 row must be exactly zero"
    tickets = importlib.import_module("tpserve.kernels.gptq_launch")._workspaces.get(q.device)
    assert tickets is None or not tickets[1].any()  # the merge's tickets are left zeroed
    # fp32: summation order only. fp16: the output rounds to fp16 (2**-11 relative) and the
    # probabilities are rounded to fp16 before the p @ V dot, each error bounded by max|v| * 2**-11.
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    err = (out.float() - ref).abs().max().item()
    assert err <= tol * 4, f"max |err| {err:.3g} > {tol * 4:.3g}"  # |v| <= ~4 (randn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (17, 2.0)])
def test_decode_kernel_matches_reference(dtype, heads, window, softcap):
    # block_n 16 on a 40-position cache: 3 key blocks, a partial last one; 3 splits of them.
    _check_kernel(heads, dtype, window, softcap, num_splits=3, block_n=16)


@pytest.mark.parametrize("num_splits", [1, 2, 5])  # no merge; even shares; empty splits
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_decode_kernel_splits(num_splits, slot_dtype):
    _check_kernel("gqa4", torch.float32, 9, None, num_splits, 16, slot_dtype)


@pytest.mark.parametrize("one_keys", [0, 16])
def test_decode_kernel_merges_only_what_the_splits_wrote(monkeypatch, one_keys):
    """Every scratch row the merge reads was written by its split: the scratch is poisoned here
    (NaN), and 8 splits share 3 key blocks (rows of one block run in one split with one_keys 16)."""
    empty = torch.empty

    def poisoned(*shape, **kw):
        return empty(*shape, **kw).fill_(float("nan")) if kw.get("dtype") == torch.float32 else \
            empty(*shape, **kw)
    monkeypatch.setattr(torch, "empty", poisoned)
    _check_kernel("gqa4", torch.float16, None, None, num_splits=8, block_n=16, one_keys=one_keys)


def test_short_contexts_write_no_partials(monkeypatch):
    """With every row's keys within one_keys, no split writes a partial (the scratch stays as
    poisoned); with one_keys 0 the merging rows do write theirs."""
    empty, scratch = torch.empty, []

    def poisoned(*shape, **kw):
        t = empty(*shape, **kw)
        if kw.get("dtype") == torch.float32:
            scratch.append(t.fill_(float("nan")))
        return t
    monkeypatch.setattr(torch, "empty", poisoned)
    _check_kernel("gqa4", torch.float16, None, None, num_splits=4, block_n=16, one_keys=1000)
    assert scratch and all(t.isnan().all() for t in scratch)
    scratch.clear()
    _check_kernel("gqa4", torch.float16, None, None, num_splits=4, block_n=16, one_keys=0)
    assert scratch and not all(t.isnan().all() for t in scratch)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("one_keys", [16, 32, 1000])
def test_decode_kernel_runs_short_contexts_in_one_split(window, one_keys):
    """A sequence of at most one_keys keys (whole blocks) runs in one split that writes the output
    itself: in one batch, such rows beside rows whose splits merge; 1000 keys: every row."""
    _check_kernel("gqa4", torch.float32, window, None, num_splits=4, block_n=16, one_keys=one_keys)
    _check_kernel("mha", torch.float16, window, 2.0, num_splits=3, block_n=8, one_keys=one_keys)


def test_decode_kernel_wide_group():
    _check_kernel("mqa20", torch.float16, None, 2.0, num_splits=2, block_n=16)


def test_decode_kernel_default_config():
    """The heuristics' own block size and split count (what CUDA runs), fp16 GQA."""
    _check_kernel("gqa4", torch.float16, None, None, num_splits=None, block_n=None)


def test_decode_attention_on_cpu_tensors_runs_the_reference_even_under_the_interpreter():
    # The model's CPU path must not pick up TRITON_INTERPRET from a test module: the interpreter is
    # slow and wrong in bf16. Each path gives bit-identical results only when it is the one that ran.
    q, kc, vc, slots, lens, group = _problem("mha", torch.float32, None)
    got = att.decode_attention(q, kc, vc, slots, lens, group, 0.25)
    assert torch.equal(got, att.decode_attention_reference(q, kc, vc, slots, lens, group, 0.25))


def _sdpa_per_sequence(q, k, v, cu, scale, window, group):
    out = torch.empty_like(q)
    for s, e in zip(cu.tolist(), cu.tolist()[1:]):
        n = e - s
        pos = torch.arange(n)
        mask = pos[None, :] <= pos[:, None]
        if window is not None:
            mask &= pos[None, :] > pos[:, None] - window
        keys = k[s:e].repeat_interleave(group, dim=1).transpose(0, 1)  # (H, n, D)
        vals = v[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), keys, vals, attn_mask=mask,
                                           scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


# ragged (padded to the longest), and of one length (viewed as [B, len] without padding)
PREFILL_LENS = {"ragged": [5, 1, 12, 8], "even": [6, 6, 6]}


def _prefill_problem(dtype, heads="gqa4", lens="ragged"):
    h, kvh, d = HEADS[heads]
    lens = PREFILL_LENS[lens]
    gen = torch.Generator().manual_seed(1)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, d, generator=gen).to(dtype) for n in (h, kvh, kvh))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return q, k, v, cu, h // kvh


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", ["gqa4", "mha"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("lens", PREFILL_LENS)
def test_prefill_matches_per_sequence_sdpa(dtype, heads, window, lens):
    q, k, v, cu, group = _prefill_problem(dtype, heads, lens)
    scale = q.shape[-1] ** -0.5
    got = prefill_attention(q, k, v, cu, scale, window, kv_group=group)
    ref = _sdpa_per_sequence(q.float(), k.float(), v.float(), cu, scale, window, group)
    tol = 2e-5 if dtype == torch.float32 else 8e-3  # fp16: SDPA's fp16 math on CPU, output rounding
    assert got.dtype == dtype and (got.float() - ref).abs().max().item() < tol


@pytest.mark.parametrize("window,softcap", [(None, 2.0), (4, 3.0), (None, None)])
@pytest.mark.parametrize("lens", PREFILL_LENS)
def test_prefill_matches_decode_reference_per_position(window, softcap, lens):
    """Each prefill query equals a decode step over a cache holding its sequence's keys so far:
    covers the soft-cap path, which SDPA cannot express."""
    q, k, v, cu, group = _prefill_problem(torch.float32, lens=lens)
    scale = q.shape[-1] ** -0.5 * 3
    got = prefill_attention(q, k, v, cu, scale, window, softcap, kv_group=group)
    b, kvh, d = len(cu) - 1, k.shape[1], k.shape[2]
    kc = torch.zeros(b, int((cu[1:] - cu[:-1]).max()), kvh, d)
    vc = torch.zeros_like(kc)
    slots, lens = [], []
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        kc[i, :e - s], vc[i, :e - s] = k[s:e], v[s:e]
        slots += [i] * (e - s)
        lens += list(range(1, e - s + 1))
    ref = att.decode_attention_reference(q, kc, vc, torch.tensor(slots), torch.tensor(lens),
                                         group, scale, window, softcap)
    assert (got - ref).abs().max().item() < 1e-5


def test_prefill_empty_batch():
    q = torch.zeros(0, 4, 16)
    k = torch.zeros(0, 2, 16)
    assert prefill_attention(q, k, k, torch.tensor([0]), 1.0, kv_group=2).shape == (0, 4, 16)
