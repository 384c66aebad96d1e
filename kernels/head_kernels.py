"""Quantized lm_head and embedding: int8 per output channel and Q8_0, Triton kernels beside torch.

Run `python -m tpserve.kernels.head_kernels` to print the error against the torch reference (on a
machine without CUDA run it as `TRITON_INTERPRET=1 python -m ...`: the interpreter runs the kernels
on the CPU).

Formats of a [V, H] weight (V rows = vocabulary, H = hidden size):
  int8  q int8 [V, H], scale [V] (fp32 or fp16): W[v] = q[v] * scale[v], symmetric, |q| <= 127.
        H + 4 bytes per row.
  Q8_0  q int8 [V, H], scales fp16 [V, H / 32]: W[v, h] = q[v, h] * scales[v, h // 32] (GGML's
        Q8_0 block of 32 weights with one fp16 scale: 34 bytes per 32 weights, 8.5 bits each).
        Stored as two planes rather than GGML's interleaved blocks, so both load coalesced.
        H must be a multiple of 32.

Kernels: a GEMV for M == 1 (fp32 FMAs on [BLOCK_V, BLOCK_H] tiles read along H, reduced once at the
end; int8 -> fp32 by bits(2**23 + 128 + q) = (q + 128) | 0x4B000000, no int->float convert), a
tl.dot kernel for M >= 2, and a row gather for the embedding.
"""

from __future__ import annotations

import enum
import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .pdl import release, step_options, wait  # noqa: E402
from .tuning import autotuned  # noqa: E402


class HeadFormat(str, enum.Enum):
    """A vocabulary table's format (the --lm-head values other than `auto`)."""

    DENSE = "dense"  # as stored, in the compute dtype
    INT8 = "int8"  # q int8 [V, H], scale [V]: per output channel, symmetric
    Q8_0 = "q8_0"  # q int8 [V, H], scales fp16 [V, H / 32]: GGML's blocks of 32
    GPTQ = "gptq"  # the checkpoint's own GPTQ head, a GPTQWeight [K=H, N=V]

    def __str__(self) -> str:
        return self.value


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
Q8_BLOCK = 32


# ---- quantize helpers and torch references ----

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [V, H] -> (q int8 [V, H], scale fp32 [V]), symmetric per output row."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [V, H] -> (q int8 [V, H], scales fp16 [V, H / 32]), one scale per 32 weights along H."""
    v, h = w.shape
    if h % Q8_BLOCK:
        raise ValueError(f"Q8_0 needs the hidden size to be a multiple of {Q8_BLOCK}, got H={h}; "
                         f"use the int8 format for this weight")
    blocks = w.float().view(v, h // Q8_BLOCK, Q8_BLOCK)
    scales = (blocks.abs().amax(dim=2) / 127).clamp(min=1e-8).half()
    q = torch.round(blocks / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(v, h), scales


def _dequant(fmt: HeadFormat, q: torch.Tensor, scales: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """q [R, H] with int8 (scales [R]) or Q8_0 (scales [R, H / 32]) scales -> [R, H] in dtype."""
    if fmt == HeadFormat.INT8:
        return (q.float() * scales.float()[:, None]).to(dtype)
    r, h = q.shape
    return (q.float().view(r, -1, Q8_BLOCK) * scales.float()[..., None]).view(r, h).to(dtype)


def dequant_matmul(fmt: HeadFormat, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                   rows=8192) -> torch.Tensor:
    """x [M, H] @ dequant(q).T, dequantizing `rows` vocabulary rows at a time (bounded memory)."""
    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    for v0 in range(0, q.shape[0], rows):
        out[:, v0:v0 + rows] = x @ _dequant(fmt, q[v0:v0 + rows], scales[v0:v0 + rows], x.dtype).T
    return out


def head_matmul_reference(fmt: HeadFormat, x: torch.Tensor, q: torch.Tensor,
                          scales: torch.Tensor) -> torch.Tensor:
    """x [M, H] -> [M, V]. int8 on CPU: torch's fused int8 GEMM (same math, fp32 accumulation)."""
    if fmt == HeadFormat.INT8 and x.device.type == "cpu" and x.dtype in (
            torch.float32, torch.float16, torch.bfloat16):
        return torch._weight_int8pack_mm(x.contiguous(), q.contiguous(), scales.to(x.dtype))
    return dequant_matmul(fmt, x, q, scales)


def dequant_rows_reference(fmt: HeadFormat, ids: torch.Tensor, q: torch.Tensor,
                           scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ids [T] -> [T, H] in dtype (int8: scales [V]; Q8_0: scales [V, H / 32])."""
    return _dequant(fmt, q[ids], scales[ids], dtype)


# ---- Triton ----

@triton.jit
def _int8_to_f32(q):
    """int8 -> fp32 via bits(2**23 + 128 + q), exact."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _head_gemv_kernel(x_ptr, q_ptr, s_ptr, out_ptr, V, H, stride_qv, stride_sv,
                      Q8_0: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    release(PDL)
    wait(PDL)  # x is the final norm's output
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    row = offs_v.to(tl.int64) * stride_qv  # V * H may pass 2**31
    if Q8_0:
        # [BLOCK_V, BLOCK_H / 32, 32] tiles: a block's 32 products are summed, then scaled once
        # (a per-weight scale load would be one scalar load per weight).
        NB: tl.constexpr = BLOCK_H // 32
        offs_b = tl.arange(0, NB)
        acc = tl.zeros([BLOCK_V, NB], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_b[:, None] * 32 + tl.arange(0, 32)[None, :]  # [NB, 32]
            h_mask = hh < H
            q = tl.load(q_ptr + row[:, None, None] + hh[None, :, :],
                        mask=v_mask[:, None, None] & h_mask[None, :, :], other=0)
            xv = tl.load(x_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
            part = tl.sum(_int8_to_f32(q) * xv[None, :, :], axis=2)
            b_mask = v_mask[:, None] & (h0 + offs_b * 32 < H)[None, :]
            d = tl.load(s_ptr + (offs_v * stride_sv)[:, None] + (h0 // 32 + offs_b)[None, :],
                        mask=b_mask, other=0.0)
            acc += part * d.to(tl.float32)
        y = tl.sum(acc, axis=1)
    else:
        acc = tl.zeros([BLOCK_V, BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask = v_mask[:, None] & (offs_h < H)[None, :]
            w = _int8_to_f32(tl.load(q_ptr + row[:, None] + offs_h[None, :], mask=mask, other=0,
                                     eviction_policy=EVICT))  # read once a step
            xv = tl.load(x_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
            acc += w * xv[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_v, y.to(out_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _head_mm_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, V, H, M_KEY, stride_xm, stride_qv, stride_sv,
                    stride_om, Q8_0: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    v_mask, m_mask = offs_v < V, offs_m < M
    row = offs_v.to(tl.int64) * stride_qv
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        if Q8_0:  # one tl.dot per block of 32, scaled per (row, block) after it
            for b in tl.static_range(BLOCK_H // 32):
                offs_h = h0 + b * 32 + tl.arange(0, 32)
                h_mask = offs_h < H
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_h[None, :],
                             mask=m_mask[:, None] & h_mask[None, :], other=0.0)
                q = tl.load(q_ptr + row[:, None] + offs_h[None, :],
                            mask=v_mask[:, None] & h_mask[None, :], other=0)
                blk = tl.minimum(h0 // 32 + b, H // 32 - 1)  # a block past H has q = 0 anyway
                d = tl.load(s_ptr + offs_v * stride_sv + blk, mask=v_mask, other=0.0)
                part = tl.dot(xt, tl.trans(q.to(xt.dtype)), input_precision=DOT_PRECISION)
                acc += part * d.to(tl.float32)[None, :]
        else:
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_h[None, :],
                         mask=m_mask[:, None] & h_mask[None, :], other=0.0)
            q = tl.load(q_ptr + row[:, None] + offs_h[None, :],
                        mask=v_mask[:, None] & h_mask[None, :], other=0)
            acc = tl.dot(xt, tl.trans(q.to(xt.dtype)), acc, input_precision=DOT_PRECISION)  # exact
    if not Q8_0:
        acc = acc * tl.load(s_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_v[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & v_mask[None, :])


@triton.jit
def _rows_kernel(ids_ptr, q_ptr, s_ptr, out_ptr, H, stride_qv, stride_sv, stride_ot,
                 Q8_0: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    v = tl.load(ids_ptr + t).to(tl.int64)
    w = _int8_to_f32(tl.load(q_ptr + v * stride_qv + offs_h, mask=h_mask, other=0))
    if Q8_0:
        d = tl.load(s_ptr + v * stride_sv + offs_h // 32, mask=h_mask, other=0.0)
    else:
        d = tl.load(s_ptr + v)
    tl.store(out_ptr + t * stride_ot + offs_h, (w * d.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=h_mask)


def _cfg(bv, bh, warps=4, stages=2, bm=None):
    kw = dict(BLOCK_V=bv, BLOCK_H=bh) | ({} if bm is None else dict(BLOCK_M=bm))
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# 16 x 256 on 4 warps read the 8B head's table (4096 x 128256) at 92% of copy on an H200, the
# earlier pool's pick (32 x 256) at 86% (bench/head_configs.py, bench/README.md)
_gemv_tuned = autotuned(_head_gemv_kernel, [_cfg(*c) for c in [
    (16, 256), (16, 512, 8), (32, 256), (32, 256, 8), (64, 256), (16, 512), (64, 128),
    (32, 512, 8), (128, 128, 8)]], ["V", "H", "Q8_0"])
_mm_tuned = autotuned(_head_mm_kernel, [_cfg(64, 128, bm=16), _cfg(128, 64, bm=16),
                                     _cfg(64, 256, 4, 3, bm=16), _cfg(128, 128, 8, 3, bm=16),
                                     _cfg(128, 64, 4, 3, bm=64)], ["M_KEY", "V", "H", "Q8_0"])
# the int8 table's loads evict first: 0.5-1 us of ~135 on an H200; TPSERVE_HEAD_EVICT=0: off
EVICT = "" if os.environ.get("TPSERVE_HEAD_EVICT", "1") == "0" else "evict_first"
INTERPRET_CONFIGS = {"gemv": dict(BLOCK_V=16, BLOCK_H=64),
                     "mm": dict(BLOCK_M=16, BLOCK_V=16, BLOCK_H=64)}  # BLOCK_H: a multiple of 32


def head_matmul_triton(fmt: HeadFormat, x, q, scales, out=None, config=None,
                       out_dtype=None) -> torch.Tensor:
    """x [M, H] (fp16/bf16/fp32) @ the int8 or Q8_0 table (q int8 [V, H], scales).T -> [M, V] in
    `out_dtype` (x.dtype or fp32: logits stored from the fp32 accumulators, without a rounding to
    x.dtype and a conversion kernel after it)."""
    q8_0 = fmt == HeadFormat.Q8_0
    assert not q8_0 or (q.shape[1] % Q8_BLOCK == 0 and scales.shape[1] == q.shape[1] // Q8_BLOCK)
    m, h = x.shape
    v = q.shape[0]
    assert q.shape[1] == h and q.stride(1) == 1 and scales.shape[0] == v, (x.shape, q.shape)
    if out is None:
        out = torch.empty(m, v, dtype=out_dtype or x.dtype, device=x.device)
    assert out.shape == (m, v) and out.stride(1) == 1 and out.dtype in (x.dtype, torch.float32)
    s_stride = scales.stride(0)
    if m == 1:
        kernel, tuned, kind = _head_gemv_kernel, _gemv_tuned, "gemv"
        x = x.contiguous()
        args = dict(x_ptr=x, q_ptr=q, s_ptr=scales, out_ptr=out, V=v, H=h, stride_qv=q.stride(0),
                    stride_sv=s_stride, Q8_0=q8_0, EVICT=EVICT) | step_options(x)

        def grid(c):
            return (triton.cdiv(v, c["BLOCK_V"]),)
    else:
        kernel, tuned, kind = _head_mm_kernel, _mm_tuned, "mm"
        x = x if x.stride(1) == 1 else x.contiguous()
        args = dict(x_ptr=x, q_ptr=q, s_ptr=scales, out_ptr=out, M=m, V=v, H=h,
                    M_KEY=triton.next_power_of_2(m), stride_xm=x.stride(0), stride_qv=q.stride(0),
                    stride_sv=s_stride, stride_om=out.stride(0), Q8_0=q8_0,
                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")

        def grid(c):
            return triton.cdiv(v, c["BLOCK_V"]), triton.cdiv(m, c["BLOCK_M"])
    if config is None and tuned is not None:
        tuned[grid](**args)
    else:
        c = dict(config or INTERPRET_CONFIGS[kind])
        launch = {k: c.pop(k) for k in ("num_warps", "num_stages") if k in c}
        kernel[grid(c)](**args, **c, **launch)
    return out


def dequant_rows_triton(fmt: HeadFormat, ids, q, scales, dtype, out=None,
                        block_h=None) -> torch.Tensor:
    """ids [T] -> out [T, H] in dtype: rows of an int8 (scales [V]) or Q8_0 weight."""
    t, h = ids.numel(), q.shape[1]
    if out is None:
        out = torch.empty(t, h, dtype=dtype, device=q.device)
    block_h = block_h or min(1024, triton.next_power_of_2(h))
    if t:
        _rows_kernel[(t, triton.cdiv(h, block_h))](ids, q, scales, out, h, q.stride(0),
                                                  scales.stride(0), out.stride(0),
                                                  Q8_0=fmt == HeadFormat.Q8_0, BLOCK_H=block_h)
    return out


def _main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev}{' (TRITON_INTERPRET=1)' if _INTERPRET else ''}, float16")
    print(f"{'format':>6} {'H':>5} {'V':>5} {'M':>3} {'max|err|':>9} {'max|y|':>8}")
    for h, v in [(64, 100), (96, 257)]:
        w = torch.randn(v, h, device=dev) / h ** 0.5
        for fmt, (q, s) in [(HeadFormat.INT8, quantize_int8(w)), (HeadFormat.Q8_0, quantize_q8_0(w))]:
            for m in (1, 5):
                x = torch.randn(m, h, device=dev, dtype=torch.float16)
                ref = dequant_matmul(fmt, x.float(), q, s)
                err = (head_matmul_triton(fmt, x, q, s).float() - ref).abs().max().item()
                print(f"{fmt:>6} {h:>5} {v:>5} {m:>3} {err:>9.2e} {ref.abs().max().item():>8.2f}")
            ids = torch.randint(0, v, (7,), device=dev)
            err = (dequant_rows_triton(fmt, ids, q, s, torch.float16).float()
                   - dequant_rows_reference(fmt, ids, q, s, torch.float32)).abs().max().item()
            print(f"{fmt:>6} {h:>5} {v:>5} rows {err:>9.2e}")


if __name__ == "__main__":
    _main()
