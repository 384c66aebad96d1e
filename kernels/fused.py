"""Fused elementwise kernels of a decode step: RMSNorm (alone, or after the residual add),
SiLU-gated product; the rotary embedding's are in `rotary.py`.

Each replaces a chain of 4-7 torch kernels (a decode step on one GPU is otherwise bound by ~35
tiny launches per layer) with one Triton kernel, beside a torch reference with the same rounding:

- `rms_norm(x, w, eps, offset)`: rows normalised in fp32. offset None (llama family): cast back,
  then multiply by w in x's dtype; a float offset (Gemma): multiply by (offset + w) in fp32, then
  cast; w None: no scale.
- `add_rms_norm(h, r, w, eps, offset)`: the residual add and the next half's RMSNorm in one pass:
  (h + r, rms_norm(h + r)), the sum rounded to the dtype before it is normalised (as torch does).
- `silu_mul(gate, up)`: silu(gate) * up, silu rounded to the dtype first (as torch).

Both norms take `perm`: the normalised row written in the order perm gives (out[j] = norm[perm[j]]),
for an act-order GEMV that would otherwise gather x through its row permutation in every program.

CUDA tensors run the kernels, CPU tensors the references (`use_triton_for`, shared with
`rotary.py`); `use_triton=True` runs a kernel on CPU tensors under TRITON_INTERPRET=1 (the tests:
the interpreter is slow and wrong in bf16, so the model's CPU path never takes it).
`python -m tpserve.kernels.fused` prints each kernel's error against its reference (without CUDA:
`TRITON_INTERPRET=1 python -m tpserve.kernels.fused`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .fixed_sum import is_fixed, load_value, silu_times, take_reference  # noqa: E402
from .pdl import release, step_options, wait  # noqa: E402


def use_triton_for(x: torch.Tensor, use_triton: bool | None) -> bool:
    return x.is_cuda if use_triton is None else use_triton


# ---- RMSNorm -----------------------------------------------------------------------------------

def rms_norm_reference(x, w, eps: float, offset: float | None = None, perm=None):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset is None:
        out = w * xf.to(x.dtype)
    else:
        out = (xf if w is None else xf * (offset + w.float())).to(x.dtype)
    return out if perm is None else out.index_select(-1, perm)


def add_rms_norm_reference(h, r, w, eps: float, offset: float | None = None, perm=None):
    s = h + r
    return s, rms_norm_reference(s, w, eps, offset, perm)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, perm_ptr, out_ptr, n, stride_x, stride_r,
                     stride_s, stride_o, eps, offset, MODE: tl.constexpr, ADD: tl.constexpr,
                     PERM: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK: tl.constexpr):
    """Program (row, c): the row's statistics from the whole row; with PERM it writes output
    columns [c * CHUNK, (c + 1) * CHUNK) only, gathered through perm (the gathers of a row spread
    over n / CHUNK programs: one program gathering a 4096-wide row took 6.9 us against 2.1 for
    the plain norm, bench/README.md); without PERM one program writes the row."""
    release(PDL)  # the GEMV after it may load its weights now (pdl.py)
    wait(PDL)  # launched with PDL: the kernel before it has completed
    row, c = tl.program_id(0), tl.program_id(1)
    if PERM:  # this program's output columns and their sources, loaded before the row arrives
        dst = c * CHUNK + tl.arange(0, CHUNK)
        d_mask = dst < n
        src = tl.load(perm_ptr + dst, mask=d_mask, other=0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = _row(x_ptr + row * stride_x, r_ptr + row * stride_r, cols, mask, ADD)
    if ADD:  # x + r rounded to the dtype (the residual stream), stored, then normalised
        s_mask = mask
        if PERM:
            s_mask = mask & (cols // CHUNK == c)  # each program stores its own columns
        tl.store(sum_ptr + row * stride_s + cols, x, mask=s_mask)
    rstd = _rstd(x, n, eps)
    if PERM:  # the sources again (the same sum, the same rounding), from L1
        xs = _row(x_ptr + row * stride_x, r_ptr + row * stride_r, src, d_mask, ADD)
        tl.store(out_ptr + row * stride_o + dst, _scaled(xs, rstd, w_ptr, src, d_mask, offset, MODE),
                 mask=d_mask)
    else:
        tl.store(out_ptr + row * stride_o + cols, _scaled(x, rstd, w_ptr, cols, mask, offset, MODE),
                 mask=mask)


PERM_CHUNK = 512  # output columns per program of a norm writing in an act-order GEMV's order
# Warps of the kernels that give a decode row one program (the norms, rotary + KV write): that
# program is a whole 4096-wide row on one SM, and more warps keep more of its loads in flight
# (H200, 8B shapes: 4 -> 8 warps took the norm from 3.76 to 3.50 us, bench/README.md)
ROW_WARPS = int(os.environ.get("TPSERVE_ROW_WARPS", "8"))


def _norm_grid(rows: int, n: int, perm, chunk: int):
    """(grid, BLOCK, CHUNK) of `_rms_norm_kernel`."""
    block = triton.next_power_of_2(n)
    if perm is None:
        return (rows, 1), block, block
    chunk = min(block, chunk)
    return (rows, triton.cdiv(n, chunk)), block, chunk


@triton.jit
def _row(x_ptr, r_ptr, cols, mask, ADD: tl.constexpr):
    """x[cols], or x[cols] + r[cols] rounded to the dtype (the residual stream); r may be a
    fixed-point sum (`fixed_sum.py`), taken as it is read."""
    x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if ADD:
        r = load_value(r_ptr, cols, mask, x.dtype)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _scaled(x, rstd, w_ptr, cols, mask, offset, MODE: tl.constexpr):
    """x * rstd scaled by MODE's weight at cols, in x's dtype."""
    y = x.to(tl.float32) * rstd
    if MODE == 0:  # llama: cast, then scale in the input dtype
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = y.to(x.dtype) * w
    elif MODE == 1:  # Gemma: scale by (offset + w) in fp32, then cast
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = (y * (offset + w)).to(x.dtype)
    else:  # no scale
        out = y.to(x.dtype)
    return out


@triton.jit
def _rstd(x, n, eps):
    """1 / rms of row x (0 where masked) over its n columns, in fp32."""
    xf = x.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)


@triton.jit
def _normalised(x, w_ptr, cols, mask, n, eps, offset, MODE: tl.constexpr):
    """The RMSNorm of row x (0 where masked), scaled by MODE's weight, in x's dtype."""
    return _scaled(x, _rstd(x, n, eps), w_ptr, cols, mask, offset, MODE)


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, offset: float | None = None,
             use_triton: bool | None = None, perm: torch.Tensor | None = None,
             chunk: int = PERM_CHUNK):
    if not use_triton_for(x, use_triton) or (offset is None and w is not None and w.dtype != x.dtype):
        return rms_norm_reference(x, w, eps, offset, perm)
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    mode = 2 if w is None else (0 if offset is None else 1)
    if x2.shape[0]:
        grid, block, chunk = _norm_grid(x2.shape[0], n, perm, chunk)
        _rms_norm_kernel[grid](x2, x2, x2, x2 if w is None else w, x2 if perm is None else perm, out,
                               n, x2.stride(0), 0, 0, out.stride(0), eps, float(offset or 0.0),
                               MODE=mode, ADD=False, PERM=perm is not None, BLOCK=block,
                               CHUNK=chunk, num_warps=ROW_WARPS, **step_options(x2))
    return out.view(shape)


def add_rms_norm(h: torch.Tensor, r: torch.Tensor, w: torch.Tensor | None, eps: float,
                 offset: float | None = None, use_triton: bool | None = None,
                 perm: torch.Tensor | None = None, chunk: int = PERM_CHUNK):
    """(h + r, its RMSNorm), both [T, n]: a residual add and the next half's norm in one kernel.
    r may be a fixed-point sum (int64, `fixed_sum.py`): taken (converted, its buffer zeroed)."""
    ok = (use_triton_for(h, use_triton) and h.dim() == 2 and r.shape == h.shape
          and r.dtype in (h.dtype, torch.int64) and h.stride(-1) == 1 and r.stride(-1) == 1
          and not (offset is None and w is not None and w.dtype != h.dtype))
    if is_fixed(r) and (perm is not None or not ok):
        r = take_reference(r, h.dtype)  # (the permuted norm's programs each read the whole row)
    if not ok:
        return add_rms_norm_reference(h, r, w, eps, offset, perm)
    t, n = h.shape
    total = torch.empty_like(h, memory_format=torch.contiguous_format)
    out = torch.empty_like(total)
    mode = 2 if w is None else (0 if offset is None else 1)
    if t:
        grid, block, chunk = _norm_grid(t, n, perm, chunk)
        _rms_norm_kernel[grid](h, r, total, h if w is None else w, h if perm is None else perm, out,
                               n, h.stride(0), r.stride(0), total.stride(0), out.stride(0), eps,
                               float(offset or 0.0), MODE=mode, ADD=True, PERM=perm is not None,
                               BLOCK=block, CHUNK=chunk, num_warps=ROW_WARPS, **step_options(h))
    return total, out


# ---- SiLU-gated product ------------------------------------------------------------------------

def silu_mul_reference(gate, up):
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, PDL: tl.constexpr,
                     BLOCK: tl.constexpr):
    release(PDL)  # the down projection's GEMV may load its weights now (pdl.py)
    wait(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype: tl.constexpr = out_ptr.dtype.element_ty  # gate/up may be fixed-point sums (fixed_sum.py)
    g = load_value(g_ptr + row * stride_g, cols, mask, dtype)
    u = load_value(u_ptr + row * stride_u, cols, mask, dtype)
    tl.store(out_ptr + row * n + cols, silu_times(g, u, dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, use_triton: bool | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """gate/up [T, N] (row strides may differ, e.g. halves of one merged projection); both may be
    fixed-point sums (int64, `fixed_sum.py`, taken), the output then in `dtype`."""
    assert dtype is not None or not is_fixed(gate), "fixed-point gate/up: give the output dtype"
    dtype = dtype or gate.dtype
    if not use_triton_for(gate, use_triton) or gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        if is_fixed(gate):
            gate, up = take_reference(gate, dtype), take_reference(up, dtype)
        return silu_mul_reference(gate, up)
    t, n = gate.shape
    out = torch.empty((t, n), dtype=dtype, device=gate.device)
    block = 1024
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0),
                                                     up.stride(0), BLOCK=block, num_warps=4,
                                                     **step_options(gate))
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
        gu = torch.randn(5, 2 * 14336, device=dev, dtype=dtype)
        g, u = gu.split(14336, dim=-1)
        errs.append((silu_mul(g, u, use_triton=True) - silu_mul_reference(g, u)).abs().max())
        perm = torch.randperm(4096, device=dev)  # written in an act-order GEMV's row order
        errs.append((rms_norm(x, w, 1e-6, use_triton=True, perm=perm)
                     - rms_norm_reference(x, w, 1e-6, perm=perm)).abs().max())
        got, want = (add_rms_norm(x, r, w, 1e-6, use_triton=True, perm=perm),
                     add_rms_norm_reference(x, r, w, 1e-6, perm=perm))
        errs.append(max((got[0] - want[0]).abs().max(), (got[1] - want[1]).abs().max()))
        print(f"{dtype}: max |kernel - reference| norm/gemma-norm/add-norm/silu_mul/perm-norm/perm-add-norm "
              f"{' '.join(f'{float(e):.2e}' for e in errs)}")
