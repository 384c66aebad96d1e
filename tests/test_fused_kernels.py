"""Fused decode-step kernels (RMSNorm, rotary, SiLU-gated product) against their torch references,
under the Triton interpreter (fp16/fp32 only: bf16 is wrong there), the references against
independent formulas, and CPU tensors taking the reference unless a kernel is asked for."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tpserve.kernels.fused import (add_rms_norm, rms_norm, rms_norm_reference,  # noqa: E402
                                   silu_mul, silu_mul_reference)
from tpserve.kernels.rotary import rotary, rotary_reference, rotary_store  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [None, 1.0, 0.0])
def test_rms_norm_matches_reference_and_transformers(dtype, offset):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, dtype=dtype) * 3
    w = torch.randn(48, dtype=dtype)
    got = rms_norm(x, w, 1e-6, offset, use_triton=True)
    want = rms_norm_reference(x, w, 1e-6, offset)
    # one rounding of the output apart at most (fp32 sums in another order)
    assert torch.allclose(got.float(), want.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5,
                          atol=1e-3 if dtype == torch.float16 else 1e-6)
    xf = x.double()
    normed = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    independent = normed * (w.double() if offset is None else offset + w.double())
    assert torch.allclose(want.double(), independent, rtol=2e-2 if dtype == torch.float16 else 1e-5,
                          atol=2e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [None, 1.0])
def test_add_rms_norm_is_the_residual_add_then_the_norm(dtype, offset):
    torch.manual_seed(1)
    h = torch.randn(4, 2 * 48, dtype=dtype)[:, :48] * 2  # strided rows, as the step's h may be
    r = torch.randn(4, 48, dtype=dtype)
    w = torch.randn(48, dtype=dtype)
    total, normed = add_rms_norm(h, r, w, 1e-6, offset, use_triton=True)
    assert torch.equal(total, h + r)  # the residual stream rounds exactly as torch's add
    want = rms_norm_reference(h + r, w, 1e-6, offset)
    assert torch.allclose(normed.float(), want.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5,
                          atol=1e-3 if dtype == torch.float16 else 1e-6)
    assert total.data_ptr() != h.data_ptr()  # h itself is left as it was


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [None, 1.0])
@pytest.mark.parametrize("chunk", [512, 16])
def test_norms_write_their_output_in_a_given_column_order(dtype, offset, chunk):
    """perm (an act-order GEMV's row order): out[:, j] = norm(x)[:, perm[j]], alone and after the
    residual add, the row's statistics unchanged; 40 columns in a 64-wide block (masked lanes), in
    one program per row or in three (chunk 16: each writes 16 output columns, the last 8, and
    stores its own columns of the residual sum)."""
    torch.manual_seed(2)
    h, r = torch.randn(3, 40, dtype=dtype) * 2, torch.randn(3, 40, dtype=dtype)
    w = torch.randn(40, dtype=dtype)
    perm = torch.randperm(40)
    tol = dict(rtol=2e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    plain = rms_norm(h, w, 1e-6, offset, use_triton=True)
    got = rms_norm(h, w, 1e-6, offset, use_triton=True, perm=perm, chunk=chunk)
    assert torch.equal(got, plain[:, perm])
    assert torch.allclose(rms_norm(h, w, 1e-6, offset, perm=perm).float(), plain[:, perm].float(), **tol)
    total, normed = add_rms_norm(h, r, w, 1e-6, offset, use_triton=True, perm=perm, chunk=chunk)
    assert torch.equal(total, h + r)  # the residual stream itself is not permuted
    want = rms_norm_reference(h + r, w, 1e-6, offset)[:, perm]
    assert torch.allclose(normed.float(), want.float(), **tol)
    assert torch.equal(add_rms_norm(h, r, w, 1e-6, offset, perm=perm)[1],
                       rms_norm_reference(h + r, w, 1e-6, offset, perm))


def test_rms_norm_without_weight_and_on_strided_rows():
    x = torch.randn(4, 2 * 32)[:, :32]  # a column slice: rows are not contiguous
    assert torch.allclose(rms_norm(x, None, 1e-6, 0.0, use_triton=True), x / x.pow(2).mean(-1, True).add(1e-6).sqrt(),
                          atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotary_matches_reference_on_a_merged_projection_view(dtype):
    torch.manual_seed(1)
    t, heads, hd = 3, 4, 16
    proj = torch.randn(t, (heads + 2) * hd, dtype=dtype)
    q = proj[:, :heads * hd].view(t, heads, hd)  # rows strided by the merged width
    ang = torch.randn(t, hd // 2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    got, want = rotary(q, cos, sin, use_triton=True), rotary_reference(q, cos, sin)
    assert torch.equal(got, want) if dtype == torch.float32 else torch.allclose(got, want, atol=2e-3)
    # independent: rotate each (i, i + hd/2) pair by its angle
    x1, x2 = q[..., :hd // 2].double(), q[..., hd // 2:].double()
    c, s = cos[:, None, :hd // 2].double(), sin[:, None, :hd // 2].double()
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    assert torch.allclose(want.double(), rotated, atol=1e-2 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,hd", [(4, 2, 16), (3, 3, 24)])
def test_rotary_store_writes_each_rows_cache_entry_and_nothing_else(dtype, heads, kv_heads, hd):
    # q/k/v are views of one merged projection; rows go to (slot, position) pairs, the last row
    # (a bucket's padding) to the scratch slot; every other cache entry keeps its poison.
    torch.manual_seed(4)
    t, slots, max_len = 4, 3, 6
    proj = torch.randn(t, (heads + 2 * kv_heads) * hd, dtype=dtype)
    q = proj[:, :heads * hd].view(t, heads, hd)
    k = proj[:, heads * hd:(heads + kv_heads) * hd].view(t, kv_heads, hd)
    v = proj[:, (heads + kv_heads) * hd:].view(t, kv_heads, hd)
    ang = torch.randn(t, hd // 2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    where = torch.tensor([2, 0, 1, slots]), torch.tensor([5, 0, 3, 0])
    poison = torch.full((slots + 1, max_len, kv_heads, hd), 777.0, dtype=dtype)
    kc, vc = poison.clone(), poison.clone()
    got_q = rotary_store(q, k, v, cos, sin, kc, vc, *where, use_triton=True)
    assert torch.equal(got_q, rotary(q, cos, sin, use_triton=True))
    assert torch.equal(kc[where], rotary(k, cos, sin, use_triton=True))
    assert torch.equal(vc[where], v)
    written = torch.zeros(slots + 1, max_len, dtype=torch.bool)
    written[where] = True
    assert (kc[~written] == 777).all() and (vc[~written] == 777).all()
    # and the CPU path (the reference) stores the same
    kr, vr = poison.clone(), poison.clone()
    ref_q = rotary_store(q, k, v, cos, sin, kr, vr, *where)
    assert torch.equal(ref_q, rotary_reference(q, cos, sin)) and torch.equal(vr, vc)
    assert torch.allclose(kr.float(), kc.float(), atol=2e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_silu_mul_on_halves_of_one_projection(dtype):
    torch.manual_seed(2)
    gu = torch.randn(3, 2 * 1500, dtype=dtype) * 4
    g, u = gu.split(1500, dim=-1)
    got, want = silu_mul(g, u, use_triton=True), silu_mul_reference(g, u)
    assert torch.allclose(got.float(), want.float(), atol=2e-3 if dtype == torch.float16 else 1e-6)
    gd = g.double()
    # fp16: two roundings of values up to ~50 (silu, then the product)
    assert torch.allclose(want.double(), gd * torch.sigmoid(gd) * u.double(),
                          rtol=2e-3 if dtype == torch.float16 else 1e-5,
                          atol=2e-3 if dtype == torch.float16 else 1e-5)
    assert torch.equal(F.silu(g) * u, want)


def test_cpu_tensors_take_the_reference_even_under_the_interpreter():
    # The model's CPU path must not pick up TRITON_INTERPRET from a test module (slow, and wrong
    # in bf16): only an explicit use_triton=True runs a kernel on CPU tensors.
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
