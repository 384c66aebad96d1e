"""Fused elementwise kernels of a decode step: RMSNorm, rotary embedding (alone, or with the KV
cache write), SiLU-gated product.

Each replaces a chain of 4-7 torch kernels (a decode step on one GPU is otherwise bound by ~35
tiny launches per layer) with one Triton kernel, beside a torch reference with the same rounding:

- `rms_norm(x, w, eps, offset)`: rows normalised in fp32. offset None (llama family): cast back,
  then multiply by w in x's dtype; a float offset (Gemma): multiply by (offset + w) in fp32, then
  cast; w None: no scale.
- `add_rms_norm(h, r, w, eps, offset)`: the residual add and the next half's RMSNorm in one pass:
  (h + r, rms_norm(h + r)), the sum rounded to the dtype before it is normalised (as torch does).
- `rotary(x, cos, sin)`: x (T, heads, hd) * cos + rotate_half(x) * sin, cos/sin (T, hd), each
  product rounded to x's dtype as torch rounds it.
- `rotary_store(q, k, v, cos, sin, k_cache, v_cache, slots, positions)`: a decode step's q rotated,
  its k rotated and v copied into each sequence's cache row (slot, position).
- `silu_mul(gate, up)`: silu(gate) * up, silu rounded to the dtype first (as torch).

CUDA tensors run the kernels, CPU tensors the references; `use_triton=True` runs a kernel on CPU tensors
under TRITON_INTERPRET=1 (the tests: the interpreter is slow and wrong in bf16, so the model's CPU
path never takes it).
`python -m tpserve.kernels.fused` prints each kernel's error against its reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .pdl import flag as pdl_flag, release  # noqa: E402


def _use_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    return x.is_cuda if use_triton is None else use_triton


# ---- RMSNorm -----------------------------------------------------------------------------------

def rms_norm_reference(x, w, eps: float, offset: float | None = None):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset is None:
        return w * xf.to(x.dtype)
    return (xf if w is None else xf * (offset + w.float())).to(x.dtype)


def add_rms_norm_reference(h, r, w, eps: float, offset: float | None = None):
    s = h + r
    return s, rms_norm_reference(s, w, eps, offset)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, out_ptr, n, stride_x, stride_r, stride_s,
                     stride_o, eps, offset, MODE: tl.constexpr, ADD: tl.constexpr,
                     PDL: tl.constexpr, BLOCK: tl.constexpr):
    release(PDL)  # the GEMV after it may load its weights now (pdl.py)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:  # x + r rounded to the dtype (the residual stream), stored, then normalised
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    tl.store(out_ptr + row * stride_o + cols, _normalised(x, w_ptr, cols, mask, n, eps, offset, MODE),
             mask=mask)


@triton.jit
def _normalised(x, w_ptr, cols, mask, n, eps, offset, MODE: tl.constexpr):
    """The RMSNorm of row x (0 where masked), scaled by MODE's weight, in x's dtype."""
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = xf * r
    if MODE == 0:  # llama: cast, then scale in the input dtype
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = y.to(x.dtype) * w
    elif MODE == 1:  # Gemma: scale by (offset + w) in fp32, then cast
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = (y * (offset + w)).to(x.dtype)
    else:  # no scale
        out = y.to(x.dtype)
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, offset: float | None = None,
             use_triton: bool | None = None):
    if not _use_triton(x, use_triton) or (offset is None and w is not None and w.dtype != x.dtype):
        return rms_norm_reference(x, w, eps, offset)
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    mode = 2 if w is None else (0 if offset is None else 1)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, x2, x2 if w is None else w, out, n, x2.stride(0),
                                         0, 0, out.stride(0), eps, float(offset or 0.0), MODE=mode,
                                         ADD=False, PDL=pdl_flag(x2), BLOCK=triton.next_power_of_2(n), num_warps=4)
    return out.view(shape)


def add_rms_norm(h: torch.Tensor, r: torch.Tensor, w: torch.Tensor | None, eps: float,
                 offset: float | None = None, use_triton: bool | None = None):
    """(h + r, its RMSNorm), both [T, n]: a residual add and the next half's norm in one kernel."""
    if (not _use_triton(h, use_triton) or h.dim() != 2 or r.shape != h.shape or r.dtype != h.dtype
            or h.stride(-1) != 1 or r.stride(-1) != 1
            or (offset is None and w is not None and w.dtype != h.dtype)):
        return add_rms_norm_reference(h, r, w, eps, offset)
    t, n = h.shape
    total = torch.empty_like(h, memory_format=torch.contiguous_format)
    out = torch.empty_like(total)
    mode = 2 if w is None else (0 if offset is None else 1)
    if t:
        _rms_norm_kernel[(t,)](h, r, total, h if w is None else w, out, n, h.stride(0), r.stride(0),
                               total.stride(0), out.stride(0), eps, float(offset or 0.0), MODE=mode,
                               ADD=True, PDL=pdl_flag(h), BLOCK=triton.next_power_of_2(n), num_warps=4)
    return total, out


# ---- rotary ------------------------------------------------------------------------------------

def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@triton.jit
def _rotate(src, dst, cos_row, sin_row, h, d, mask, HALF: tl.constexpr):
    """dst[h, :] = rotary(src[h, :]) for the heads h (pointer offsets by head: src + h, dst + h)."""
    x1 = tl.load(src + d, mask=mask, other=0.0)
    x2 = tl.load(src + d + HALF, mask=mask, other=0.0)
    dmask = d < HALF
    c1 = tl.load(cos_row + d, mask=dmask, other=0.0)
    c2 = tl.load(cos_row + d + HALF, mask=dmask, other=0.0)
    s1 = tl.load(sin_row + d, mask=dmask, other=0.0)
    s2 = tl.load(sin_row + d + HALF, mask=dmask, other=0.0)
    # Each product rounded to the dtype, then the sum: torch's three roundings.
    dt = x1.dtype
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
    if not _use_triton(x, use_triton) or x.stride(-1) != 1 or cos.stride(-1) != 1 or cos.dtype != x.dtype:
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
                         BLOCK_D: tl.constexpr):
    """Program (t, 0): q rotated into qo; (t, 1): k rotated into its cache row; (t, 2): v copied."""
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
        x = tl.load(v_ptr + t * stride_vt + h * stride_vh + dd, mask=mask)
        tl.store(vc_ptr + cache_row + h * stride_ch + dd, x, mask=mask)


def rotary_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor, positions: torch.Tensor, use_triton: bool | None = None):
    """One token per row (a decode step): k_cache[slots, positions] = rotary(k), v_cache[...] = v,
    and rotary(q) returned; one launch instead of four. q (T, heads, hd), k/v (T, kv_heads, hd),
    caches (slots, max_len, kv_heads, hd), slots/positions int64 (T,)."""
    ok = (_use_triton(q, use_triton) and cos.dtype == q.dtype == k_cache.dtype == v.dtype
          and all(x.stride(-1) == 1 for x in (q, k, v, cos, sin)) and k_cache.stride() ==
          v_cache.stride() and k_cache.stride(-1) == 1 and cos.stride() == sin.stride())
    if not ok:
        return rotary_store_reference(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    t, heads, hd = q.shape
    out = torch.empty((t, heads, hd), dtype=q.dtype, device=q.device)
    if t:
        _rotary_store_kernel[(t, 3)](
            q, k, v, cos, sin, out, k_cache, v_cache, slots, positions, heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), HALF=hd // 2, BLOCK_H=triton.next_power_of_2(max(heads, k.shape[1])),
            BLOCK_D=triton.next_power_of_2(hd // 2), num_warps=4)
    return out


# ---- SiLU-gated product ------------------------------------------------------------------------

def silu_mul_reference(gate, up):
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, PDL: tl.constexpr,
                     BLOCK: tl.constexpr):
    release(PDL)  # the down projection's GEMV may load its weights now (pdl.py)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * n + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype),
             mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """gate/up [T, N] (row strides may differ, e.g. halves of one merged projection)."""
    if not _use_triton(gate, use_triton) or gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return silu_mul_reference(gate, up)
    t, n = gate.shape
    out = torch.empty((t, n), dtype=gate.dtype, device=gate.device)
    block = 1024
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0),
                                                     up.stride(0), PDL=pdl_flag(gate), BLOCK=block,
                                                     num_warps=4)
    return out


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if dev == "cuda" else (torch.float16,
                                                                                  torch.float32)
    for dtype in dtypes:
        x = torch.randn(5, 4096, device=dev, dtype=dtype)
        w = torch.randn(4096, device=dev, dtype=dtype)
        errs = [(rms_norm(x, w, 1e-6, off, use_triton=True) - rms_norm_reference(x, w, 1e-6, off)).abs().max()
                for off in (None, 1.0)]
        r = torch.randn(5, 4096, device=dev, dtype=dtype)
        got, want = (add_rms_norm(x, r, w, 1e-6, use_triton=True), add_rms_norm_reference(x, r, w, 1e-6))
        errs.append(max((got[0] - want[0]).abs().max(), (got[1] - want[1]).abs().max()))
        q = torch.randn(5, 32, 128, device=dev, dtype=dtype)
        cos, sin = torch.randn(5, 128, device=dev, dtype=dtype), torch.randn(5, 128, device=dev,
                                                                           dtype=dtype)
        errs.append((rotary(q, cos, sin, use_triton=True) - rotary_reference(q, cos, sin)).abs().max())
        k, v = torch.randn(5, 8, 128, device=dev, dtype=dtype), torch.randn(5, 8, 128, device=dev,
                                                                            dtype=dtype)
        at = (torch.tensor([3, 0, 1, 2, 4], device=dev), torch.tensor([7, 1, 0, 9, 0], device=dev))
        caches = [torch.zeros(5, 10, 8, 128, device=dev, dtype=dtype) for _ in range(4)]
        qr = rotary_store(q, k, v, cos, sin, caches[0], caches[1], *at, use_triton=True)
        qw = rotary_store_reference(q, k, v, cos, sin, caches[2], caches[3], *at)
        errs.append(max((qr - qw).abs().max(), (caches[0] - caches[2]).abs().max(),
                        (caches[1] - caches[3]).abs().max()))
        gu = torch.randn(5, 2 * 14336, device=dev, dtype=dtype)
        g, u = gu.split(14336, dim=-1)
        errs.append((silu_mul(g, u, use_triton=True) - silu_mul_reference(g, u)).abs().max())
        print(f"{dtype}: max |kernel - reference| norm/gemma-norm/add-norm/rotary/rotary_store/silu_mul "
              f"{' '.join(f'{float(e):.2e}' for e in errs)}")
