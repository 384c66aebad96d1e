"""Attention over the slot KV cache: one decode kernel for all sequences of a step; batched prefill.

Run `python -m tpserve.kernels.attention` to print the decode kernel's error against the torch
reference (on a machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter
runs the kernel on the CPU).

Decode (flash-decoding): program (b, kv head, split) loads the kv_group query heads that share one
kv head as a [16, D] tile (padded for tl.dot; the kv tile is read once for the whole group) and
runs an online softmax over its share of the sequence's key blocks. The share is computed in the
kernel from lens[b] (and the window), so the grid depends only on B, the kv heads and the cache's
max length: no host synchronisation, safe to capture in a CUDA graph, and the work is that of the
actual lengths. With more than one split the last program of each (b, kv head) to finish (a
ticket, as the split-K GEMVs take one) merges the splits' (max, sum, acc) for its query heads, in
split order: one launch per step and layer, whatever the split count. A sequence of at most
ONE_SPLIT_KEYS keys (its length, read in the kernel) runs in one program per (b, kv head), which
writes the output itself; the grid's other splits exit.
Prefill attention (torch) is in `prefill_attention.py`.
"""

from __future__ import annotations

import functools
import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .gptq_launch import workspace  # noqa: E402
from .pdl import release, step_options, wait  # noqa: E402
from .prefill_attention import masked_scores  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_GROUP_TILE = 16  # tl.dot needs >= 16 rows: a kv head's query heads are padded to at least this
_MAX_SPLITS = 32
# A context of at most this many keys runs in one program per (b, kv head): the splits' merge
# (partials out, a ticket, the last one reading them back) costs ~4 us on an H200, where a key
# block more in one program costs ~1 us at a batch of one (bench/README.md, "eleventh session").
ONE_SPLIT_KEYS = 256


# ---- torch references ----

def decode_attention_reference(q, k_cache, v_cache, slots, lens, kv_group, scale, window=None,
                               softcap=None):
    """Same contract as decode_attention, in torch (not capturable: it reads max(lens) on the host).

    Gathers each sequence's slot up to the longest length, zeroes the keys/values outside
    [lens - window, lens) so that whatever the cache holds there cannot reach the output, and
    softmaxes in fp32. A row with lens == 0 gives zeros.
    """
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    assert h == kvh * kv_group, f"{h} query heads vs {kvh} kv heads x kv_group {kv_group}"
    n = int(lens.max()) if b else 0
    pos = torch.arange(n, device=q.device)
    lens = lens.to(q.device).long()
    valid = pos[None, :] < lens[:, None]  # (B, n)
    if window is not None:
        valid &= pos[None, :] >= lens[:, None] - window
    keep = valid[:, :, None, None]
    k = k_cache[slots.long(), :n].float().where(keep, 0.0)  # (B, n, KVH, D)
    v = v_cache[slots.long(), :n].float().where(keep, 0.0)
    qg = q.float().view(b, kvh, kv_group, d)
    s = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale
    s = masked_scores(s, valid[:, None, None, :], softcap)
    p = s.softmax(-1).where(valid[:, None, None, :], 0.0)  # a row with no key: NaN -> 0
    return torch.einsum("bkgn,bnkd->bkgd", p, v).reshape(b, h, d).to(q.dtype)


# ---- Triton decode kernel ----

@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, out_ptr, part_ptr, ml_ptr, cnt_ptr,
                   sq_b, sq_h, sk_s, sk_l, sk_h, sv_s, sv_l, sv_h, so_b, so_h,
                   scale, softcap, window, num_heads, one_blocks,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   PRECISION: tl.constexpr, PDL: tl.constexpr, BLOCK_S: tl.constexpr):
    release(PDL)  # the output projection's GEMV may load its weights now (pdl.py)
    wait(PDL)  # q and the cache come from the kernel before it
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    n = tl.load(lens_ptr + b).to(tl.int32)
    lo = n * 0  # first visible key position
    if HAS_WINDOW:
        lo = tl.maximum(n - window, 0)
    first, last = lo // BLOCK_N, tl.cdiv(n, BLOCK_N)
    # this split's contiguous share of the key blocks; a context of at most one_blocks blocks runs
    # in one program, which writes the output itself (the grid's other splits exit)
    nb = last - first
    per = tl.where(nb <= one_blocks, tl.maximum(nb, 1), tl.cdiv(nb, NUM_SPLITS))
    active = tl.maximum(tl.cdiv(nb, per), 1)  # lens 0: split 0 writes the zeros
    if split < active:
        _decode_split(q_ptr, k_ptr + slot * sk_s + kvh * sk_h, v_ptr + slot * sv_s + kvh * sv_h,
                      out_ptr, part_ptr, ml_ptr, cnt_ptr, b, kvh, split, n, lo, first + split * per,
                      tl.minimum(first + (split + 1) * per, last), active, sq_b, sq_h, sk_l, sv_l,
                      so_b, so_h, scale, softcap,
                      num_heads, GROUP, HEAD_DIM, BLOCK_G, BLOCK_N, BLOCK_D, NUM_SPLITS,
                      HAS_SOFTCAP, PRECISION, BLOCK_S)


@triton.jit
def _decode_split(q_ptr, k_base, v_base, out_ptr, part_ptr, ml_ptr, cnt_ptr, b, kvh, split, n, lo,
                  start, end, active, sq_b, sq_h, sk_l, sv_l, so_b, so_h, scale, softcap,
                  num_heads, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
    """Key blocks [start, end) of (b, kv head) for its query heads; the output directly where
    this is the only active split, else a partial, the last active split to finish merging."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + g
    gmask, dmask = g < GROUP, d < HEAD_DIM
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for blk in range(start, end):
        pos = blk * BLOCK_N + j
        valid = (pos >= lo) & (pos < n)  # every block in range holds at least one valid key
        kv_mask = valid[:, None] & dmask[None, :]  # masked loads: poison beyond lens never enters
        k = tl.load(k_base + pos[:, None].to(tl.int64) * sk_l + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G, N) fp32
        if HAS_SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # tanh(s/cap) * cap
        s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + pos[:, None].to(tl.int64) * sv_l + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:  # no scratch exists (its pointers are the output's): nothing else compiled
        _write_out(out_ptr, acc, l_i, b, heads, d, so_b, so_h, omask)
    elif active == 1:
        _write_out(out_ptr, acc, l_i, b, heads, d, so_b, so_h, omask)
    else:
        row = (b * num_heads + heads) * NUM_SPLITS + split  # part [B, H, S, D], ml [2, B, H, S]
        l_at = tl.num_programs(0) * num_heads * NUM_SPLITS  # where ml's sums start
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=omask)
        tl.store(ml_ptr + row, m_i, mask=gmask)
        tl.store(ml_ptr + l_at + row, l_i, mask=gmask)
        tl.debug_barrier()  # every thread's stores are issued before the ticket is taken
        tile = b * tl.num_programs(1) + kvh
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == active - 1:
            _merge(part_ptr, ml_ptr, out_ptr, b, kvh, so_b, so_h, num_heads, l_at, active, GROUP,
                   HEAD_DIM, BLOCK_D, NUM_SPLITS, BLOCK_S)
            tl.store(cnt_ptr + tile, 0)  # left zeroed for the next call


@triton.jit
def _write_out(out_ptr, acc, l_i, b, heads, d, so_b, so_h, omask):
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # lens == 0: acc is 0, so is the output
    tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _merge(part_ptr, ml_ptr, out_ptr, b, kvh, so_b, so_h, num_heads, l_at, active,
           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
           NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[b, h] for the kv head's query heads h from the active splits' (max, sum, acc), in
    split order (read at L2: other programs wrote them)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask, dmask = s < active, d < HEAD_DIM
    for gi in range(GROUP):
        h = kvh * GROUP + gi
        row = (b * num_heads + h) * NUM_SPLITS
        m = tl.load(ml_ptr + row + s, mask=smask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(ml_ptr + l_at + row + s, mask=smask, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, 0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty split: exp2(-inf) = 0
        total = tl.sum(w * l, 0)
        acc = tl.load(part_ptr + (row + s[:, None]) * HEAD_DIM + d[None, :],
                      mask=smask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
        o = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * so_b + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that tests reach the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention_triton(q, k_cache, v_cache, slots, lens, kv_group, scale, window=None,
                            softcap=None, num_splits=None, block_n=None, num_warps=4,
                            one_keys=ONE_SPLIT_KEYS):
    """decode_attention's Triton path; num_splits / block_n / one_keys override the heuristics
    (tests, bench).

    The grid's splits are chosen from static sizes only: enough (b, kv head, split) programs for
    about two waves of the GPU, at most one per key block of the max length. In the kernel a
    sequence whose keys fit `one_keys` (whole key blocks) uses one of them (from its length).
    """
    b, h, d = q.shape
    _, max_len, kvh, d_k = k_cache.shape
    assert h == kvh * kv_group, f"{h} query heads vs {kvh} kv heads x kv_group {kv_group}"
    assert d_k == d and v_cache.shape == k_cache.shape and k_cache.dtype == q.dtype
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty_like(q)
    if b == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_n = block_n or (64 if block_d <= 128 else 32)
    blocks = triton.cdiv(max_len, block_n)
    if num_splits is None:
        num_splits = triton.cdiv(2 * _sm_count(q.device), b * kvh)
    num_splits = max(1, min(num_splits, blocks, _MAX_SPLITS))
    part = ml = cnt = out  # unused with one split
    if num_splits > 1:  # tickets per (b, kv head): the GPTQ kernels', each call leaves them 0
        part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(2, b, h, num_splits, dtype=torch.float32, device=q.device)
        _, cnt = workspace(q.device, 1, b * kvh)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact; fp16/bf16 MMA
    _decode_kernel[(b, kvh, num_splits)](
        q, k_cache, v_cache, slots, lens, out, part, ml, cnt,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1), float(scale), float(softcap or 0.0), int(window or 0), h,
        one_keys // block_n,
        GROUP=kv_group, HEAD_DIM=d, BLOCK_G=max(_GROUP_TILE, triton.next_power_of_2(kv_group)),
        BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=num_splits, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, PRECISION=precision,
        BLOCK_S=triton.next_power_of_2(num_splits), num_warps=num_warps, **step_options(q))
    return out


def decode_attention(q, k_cache, v_cache, slots, lens, kv_group, scale, window=None, softcap=None):
    """One decode token per sequence attends to its slot of the KV cache.

    q        [B, H, D] this step's queries, fp16/bf16/fp32
    k_cache  [S, L, KVH, D], v_cache the same: one layer's cache; this step's k/v are already
             written at position lens[b] - 1 of slot slots[b]
    slots    int32/int64 [B] device tensor: each sequence's cache slot
    lens     int32 [B] device tensor: valid positions of each sequence, this token included;
             lens == 0 (a padding row of a batch bucket) gives zeros
    kv_group query heads per kv head (q head h reads kv head h // kv_group)
    scale    score scale; window: None or keys at positions > lens - 1 - window;
             softcap: None or scores = tanh(s / cap) * cap
    returns  [B, H, D] in q's dtype (softmax in fp32)
    CUDA tensors run the Triton kernel (CUDA-graph capturable); CPU tensors the torch reference
    (tests run the kernel on CPU through `decode_attention_triton` under TRITON_INTERPRET=1; the
    model's CPU path never does, since the interpreter is slow and wrong in bf16).
    """
    if q.device.type == "cpu":
        return decode_attention_reference(q, k_cache, v_cache, slots, lens, kv_group, scale,
                                          window, softcap)
    return decode_attention_triton(q, k_cache, v_cache, slots, lens, kv_group, scale, window,
                                   softcap)


def _main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev}{' (TRITON_INTERPRET=1)' if _INTERPRET else ''}\n"
          f"{'dtype':>8} {'H/KVH':>6} {'D':>4} {'window':>6} {'softcap':>7} {'max|err|':>9}")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        for h, kvh, d, window, softcap in [(8, 2, 64, None, None), (4, 4, 32, 5, 30.0)]:
            q = torch.randn(3, h, d, generator=gen).to(dev, dtype)
            kc, vc = (torch.randn(4, 40, kvh, d, generator=gen).to(dev, dtype) for _ in range(2))
            slots = torch.tensor([2, 0, 3], device=dev)
            lens = torch.tensor([17, 1, 40], dtype=torch.int32, device=dev)  # 40: the whole slot
            args = (q, kc, vc, slots, lens, h // kvh, d ** -0.5, window, softcap)
            err = (decode_attention_triton(*args).float()
                   - decode_attention_reference(*args).float()).abs().max().item()
            print(f"{str(dtype)[6:]:>8} {f'{h}/{kvh}':>6} {d:>4} {str(window):>6} "
                  f"{str(softcap):>7} {err:>9.2e}")


if __name__ == "__main__":
    _main()
