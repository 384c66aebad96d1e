"""Rotary embedding kernels of a decode step, each beside a torch reference with the same
rounding (see `fused.py` for the other fused kernels and how CUDA / CPU tensors choose):

- `rotary(x, cos, sin)`: x (T, heads, hd) * cos + rotate_half(x) * sin, cos/sin (T, hd), each
  product rounded to x's dtype as torch rounds it.
- `rotary_store(q, k, v, cos, sin, k_cache, v_cache, slots, positions)`: a decode step's q rotated,
  its k rotated and v copied into each row's cache entry (slot, position): one launch for four.

`python -m tpserve.kernels.rotary` prints each kernel's error against its reference (without CUDA:
`TRITON_INTERPRET=1 python -m tpserve.kernels.rotary`).
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .fixed_sum import is_fixed, load_value, take_reference  # noqa: E402
from .fused import ROW_WARPS, use_triton_for  # noqa: E402
from .pdl import release, step_options, wait  # noqa: E402


# ---- rotary ------------------------------------------------------------------------------------

def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@triton.jit
def _rotate(src, dst, cos_row, sin_row, h, d, mask, HALF: tl.constexpr):
    """dst[h, :] = rotary(src[h, :]) for the heads h (pointer offsets by head: src + h, dst + h);
    src may be a fixed-point sum (`fixed_sum.py`), taken as it is read."""
    dt: tl.constexpr = dst.dtype.element_ty
    x1 = load_value(src, d, mask, dt)
    x2 = load_value(src, d + HALF, mask, dt)
    dmask = d < HALF
    c1 = tl.load(cos_row + d, mask=dmask, other=0.0)
    c2 = tl.load(cos_row + d + HALF, mask=dmask, other=0.0)
    s1 = tl.load(sin_row + d, mask=dmask, other=0.0)
    s2 = tl.load(sin_row + d + HALF, mask=dmask, other=0.0)
    # Each product rounded to the dtype, then the sum: torch's three roundings.
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt)
    b1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(dt)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt)
    tl.store(dst + d, (a1.to(tl.float32) + b1.to(tl.float32)).to(dt), mask=mask)
    tl.store(dst + d + HALF, (a2.to(tl.float32) + b2.to(tl.float32)).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_ct,
                   stride_ot, stride_oh, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]  # first half
    _rotate(x_ptr + t * stride_xt + h * stride_xh, out_ptr + t * stride_ot + h * stride_oh,
            cos_ptr + t * stride_ct, sin_ptr + t * stride_ct, h, d, (h < heads) & (d < HALF), HALF)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           use_triton: bool | None = None) -> torch.Tensor:
    """x (T, heads, hd); cos/sin (T, hd) in x's dtype."""
    if not use_triton_for(x, use_triton) or x.stride(-1) != 1 or cos.stride(-1) != 1 or cos.dtype != x.dtype:
        return rotary_reference(x, cos, sin)
    t, heads, hd = x.shape
    out = torch.empty((t, heads, hd), dtype=x.dtype, device=x.device)
    if t:
        _rotary_kernel[(t,)](x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0),
                             out.stride(0), out.stride(1), HALF=hd // 2,
                             BLOCK_H=triton.next_power_of_2(heads),
                             BLOCK_D=triton.next_power_of_2(hd // 2), num_warps=4)
    return out


def rotary_store_reference(q, k, v, cos, sin, k_cache, v_cache, slots, positions):
    k_cache[slots, positions] = rotary_reference(k, cos, sin)
    v_cache[slots, positions] = v
    return rotary_reference(q, cos, sin)


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                         pos_ptr, q_heads, kv_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_ct, stride_ot, stride_oh, stride_cs,
                         stride_cp, stride_ch, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Program (t, 0): q rotated into qo; (t, 1): k rotated into its cache row; (t, 2): v copied."""
    release(PDL)  # the decode attention may start (pdl.py)
    wait(PDL)
    t, part = tl.program_id(0), tl.program_id(1)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    cache_row = tl.load(slot_ptr + t) * stride_cs + tl.load(pos_ptr + t) * stride_cp
    if part == 0:
        _rotate(q_ptr + t * stride_qt + h * stride_qh, qo_ptr + t * stride_ot + h * stride_oh,
                cos_ptr + t * stride_ct, sin_ptr + t * stride_ct, h, d,
                (h < q_heads) & (d < HALF), HALF)
    elif part == 1:
        _rotate(k_ptr + t * stride_kt + h * stride_kh, kc_ptr + cache_row + h * stride_ch,
                cos_ptr + t * stride_ct, sin_ptr + t * stride_ct, h, d,
                (h < kv_heads) & (d < HALF), HALF)
    else:
        dd = tl.arange(0, 2 * BLOCK_D)[None, :]
        mask = (h < kv_heads) & (dd < 2 * HALF)
        x = load_value(v_ptr + t * stride_vt + h * stride_vh, dd, mask, vc_ptr.dtype.element_ty)
        tl.store(vc_ptr + cache_row + h * stride_ch + dd, x, mask=mask)


def rotary_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor, positions: torch.Tensor, use_triton: bool | None = None):
    """One token per row (a decode step): k_cache[slots, positions] = rotary(k), v_cache[...] = v,
    and rotary(q) returned; one launch instead of four. q (T, heads, hd), k/v (T, kv_heads, hd),
    caches (slots, max_len, kv_heads, hd), slots/positions int64 (T,). q, k and v may be
    fixed-point sums (int64 views of one buffer, `fixed_sum.py`): taken, q's rotary in the
    cache's dtype."""
    dtype = k_cache.dtype
    fixed = is_fixed(q)
    ok = (use_triton_for(q, use_triton) and cos.dtype == dtype == v_cache.dtype
          and all(x.dtype == (torch.int64 if fixed else dtype) for x in (q, k, v))
          and all(x.stride(-1) == 1 for x in (q, k, v, cos, sin)) and k_cache.stride() ==
          v_cache.stride() and k_cache.stride(-1) == 1 and cos.stride() == sin.stride())
    if not ok:
        if fixed:
            q, k, v = (take_reference(x, dtype) for x in (q, k, v))
        return rotary_store_reference(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    t, heads, hd = q.shape
    out = torch.empty((t, heads, hd), dtype=dtype, device=q.device)
    if t:
        _rotary_store_kernel[(t, 3)](
            q, k, v, cos, sin, out, k_cache, v_cache, slots, positions, heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), HALF=hd // 2, BLOCK_H=triton.next_power_of_2(max(heads, k.shape[1])),
            BLOCK_D=triton.next_power_of_2(hd // 2), num_warps=ROW_WARPS, **step_options(q))
    return out


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if dev == "cuda" else (torch.float16,
                                                                                  torch.float32)
    for dtype in dtypes:
        q = torch.randn(5, 32, 128, device=dev, dtype=dtype)
        cos, sin = torch.randn(5, 128, device=dev, dtype=dtype), torch.randn(5, 128, device=dev,
                                                                           dtype=dtype)
        errs = [(rotary(q, cos, sin, use_triton=True) - rotary_reference(q, cos, sin)).abs().max()]
        k, v = torch.randn(5, 8, 128, device=dev, dtype=dtype), torch.randn(5, 8, 128, device=dev,
                                                                            dtype=dtype)
        at = (torch.tensor([3, 0, 1, 2, 4], device=dev), torch.tensor([7, 1, 0, 9, 0], device=dev))
        caches = [torch.zeros(5, 10, 8, 128, device=dev, dtype=dtype) for _ in range(4)]
        qr = rotary_store(q, k, v, cos, sin, caches[0], caches[1], *at, use_triton=True)
        qw = rotary_store_reference(q, k, v, cos, sin, caches[2], caches[3], *at)
        errs.append(max((qr - qw).abs().max(), (caches[0] - caches[2]).abs().max(),
                        (caches[1] - caches[3]).abs().max()))
        print(f"{dtype}: max |kernel - reference| rotary/rotary_store "
              f"{' '.join(f'{float(e):.2e}' for e in errs)}")
