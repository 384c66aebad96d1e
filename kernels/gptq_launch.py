"""The host side of the GPTQ Triton kernels (their shared device pieces are `gptq_common.py`):
configs and the pruning that keeps those reaching the shard's best group mode, the tuning key,
launching with a fixed or tuned config, the arguments every kernel takes, the output, and the
split-K workspace with its tickets."""

from __future__ import annotations

import torch
import triton

from .fixed_sum import is_fixed, reads_as
from .gptq_common import mode_of
from .tuning import autotuned

# Autotuning. Configs are few on purpose (each is a compile); `_prune` keeps those that fit the
# shape and reach the best group mode for the shard.
MAX_SPLIT_K = 32  # the workspace holds this many partial slices


def cfg(bn, bk, sk=None, warps=4, stages=2, bm=None, group_m=None):
    assert sk is None or sk <= MAX_SPLIT_K, sk
    kw = dict(BLOCK_N=bn, BLOCK_K=bk)
    kw |= {k: v for k, v in dict(SPLIT_K=sk, BLOCK_M=bm, GROUP_M=group_m).items() if v is not None}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# The prefill kernel's split-K partials (SPLIT_K x M x N fp32) are bounded: 64 MB. Splitting pays
# where the output grid is small (few tiles for the SMs); a large M x N has tiles enough.
PREFILL_WS_FLOATS = 1 << 24


def prefill_split_fits(m_key: int, n: int, split_k: int) -> bool:
    return split_k == 1 or m_key * n * split_k <= PREFILL_WS_FLOATS


def _fill(c: dict, a: dict) -> dict:
    """The compile-time constants a config implies for the shard: MODE, and EVEN_K for split-K."""
    c = {**c, "MODE": mode_of(c["BLOCK_K"], a["GROUP_SIZE"], a["GROUP_OFFSET"], a["HAS_GIDX"])}
    if "SPLIT_K" in c:  # the split-K kernels skip row masks when tiles divide K (never for
        # g_idx shards: their config serves every layer's K, `KEY`)
        c["EVEN_K"] = a["K"] % c["BLOCK_K"] == 0 and not a["HAS_GIDX"]
    return c


def _prune(configs, named_args, **kwargs):
    """Configs that fit the shape and reach its best group mode, each with its constants filled."""
    a = {**named_args, **kwargs}
    p = 32 // a["BITS"]

    def fits(c):
        kw = c.kwargs
        bk, sk = kw["BLOCK_K"], kw.get("SPLIT_K", 1)
        prefill = "GROUP_M" in kw
        if prefill and not prefill_split_fits(a["M_KEY"], a["N"], sk):
            return False
        # the batched decode kernel's tl.dot per field: K >= 16 words
        min_words = 16 if "SPLIT_K" in kw and "BLOCK_M" in kw and not prefill else 1
        return bk // p >= min_words and (sk == 1 or a["K"] >= sk * bk)  # a tile per split

    ok = [(c, _fill(c.kwargs, a)) for c in [c for c in configs if fits(c)] or configs]
    best = min(kw["MODE"] for _, kw in ok)
    return [triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)
            for c, kw in ok if kw["MODE"] == best]


# Tuned per K_KEY, not K: a row-parallel act-order shard is padded per group at load, so each
# layer's K differs by a few rows while the best config does not (tuning each layer's shard took
# most of an act-order model's start-up); K_KEY is the unpadded width (`gptq_args`).
KEY = ["N", "K_KEY", "BITS", "GROUP_SIZE", "GROUP_OFFSET", "HAS_GIDX"]


TUNED: list = []  # (kernel, key) of every tuned GPTQ kernel (a test checks the key's names)


def tuned(kernel, configs, key, reset_to_zero=None):
    """The autotuned kernel, configs pruned to the shard's best group mode (None under the
    interpreter, where fixed configs are used)."""
    TUNED.append((kernel, key))
    return autotuned(kernel, configs, key, _prune, reset_to_zero)


def launch(kernel, autotuned, args: dict, grid, config: dict | None, default: dict):
    """Run `kernel` with a fixed config (tests, the interpreter) or autotuned."""
    if config is None and autotuned is not None:
        autotuned[grid](**args)
        return
    c = _fill(dict(config or default), args)
    extra = {k: c.pop(k) for k in ("num_warps", "num_stages") if k in c}
    kernel[grid(c)](**args, **c, **extra)


def gptq_args(x: torch.Tensor, w, out: torch.Tensor) -> dict:
    """The arguments every GPTQ kernel takes (w: a GPTQWeight)."""
    return dict(x_ptr=x, qw_ptr=w.qweight, qz_ptr=w.qzeros, s_ptr=w.scales,
                gidx_ptr=w.qweight if w.g_idx is None else w.g_idx, out_ptr=out, N=w.out_features,
                K=w.in_features, G=w.scales.shape[0], K_KEY=w.x_features or w.in_features,
                stride_xk=x.stride(1),
                stride_qw=w.qweight.stride(0), stride_qz=w.qzeros.stride(0),
                stride_s=w.scales.stride(0), BITS=w.bits, GROUP_SIZE=w.group_size,
                GROUP_OFFSET=w.group_offset, HAS_GIDX=w.g_idx is not None)


GATHER_X = False  # act-order: x[:, perm] in one torch op before the kernel, not in it (A/B)


def through_perm(x: torch.Tensor, perm: torch.Tensor | None):
    """(x, perm) as the kernel reads them: with GATHER_X, x gathered once and no perm."""
    if perm is None or not GATHER_X:
        return x, perm
    return x.index_select(1, perm), None


def new_out(x: torch.Tensor, w, out: torch.Tensor | None) -> torch.Tensor:
    if w.bits not in (4, 8):
        raise ValueError(f"the Triton GPTQ kernels handle bits 4 and 8, not {w.bits}; "
                         f"use gptq_matmul, which falls back to the torch reference")
    m, k = x.shape
    gated = is_fixed(x)  # a fixed-point gate/up sum [gate | up] (fixed_sum.gated)
    assert k == (2 * w.in_features if gated else w.x_features or w.in_features), (
        x.shape, x.dtype, w.in_features, w.x_features)
    dtype = reads_as(x)
    if out is None:
        out = torch.empty(m, w.out_features, dtype=dtype, device=x.device)
    assert out.shape == (m, w.out_features) and out.stride(1) == 1 and out.dtype in (
        dtype, torch.int64), (out.shape, out.dtype)  # int64: a fixed-point sum (fixed_sum.py)
    return out


_workspaces: dict = {}
_retired: list = []  # outgrown workspaces: captured CUDA graphs may still point at them


def workspace(device: torch.device, n_out: int, n_cnt: int):
    """fp32 split-K partials (MAX_SPLIT_K slices of n_out) and zeroed int32 tickets (the kernels
    leave the tickets zeroed). A larger call gets a larger pair (at least twice the size); the old
    pair is kept alive, since a graph captured with it replays with its addresses."""
    n_acc = MAX_SPLIT_K * n_out
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < n_acc or cnt.numel() < n_cnt:
        n_acc, n_cnt = max(n_acc, 1 << 16), max(n_cnt, 1 << 12)
        if ws is not None:
            _retired.append((ws, cnt))
            n_acc, n_cnt = max(n_acc, 2 * ws.numel()), max(n_cnt, 2 * cnt.numel())
        ws = torch.zeros(n_acc, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_cnt, dtype=torch.int32, device=device)
        _workspaces[device] = (ws, cnt)
    return ws, cnt
