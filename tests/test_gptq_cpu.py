"""4-bit shards on CPU ranks through torch's int4 CPU kernel (kernels/gptq_cpu.py), against the
dequantized shard (`GPTQWeight.dequantize`, the reference every kernel is checked against): shards
that start or end inside a group, N not a multiple of 16, every group size the kernel takes, and
the shards that must keep the per-group broadcast path; small shards with fp32 / fp16 x through
their dense copy."""

import gc

import pytest
import torch

from tpserve.kernels import gptq_cpu, gptq_matmul
from tpserve.kernels.gptq_weight import random_weight

# (K, N, group size, group offset): aligned; a shard starting inside a group and ending inside
# another; N = 40 and 72 (padded to 48 / 80); a shard of fewer rows than one group
SHAPES = [(512, 96, 128, 0), (200, 72, 64, 32), (256, 64, 32, 0), (300, 40, 128, 100),
          (64, 16, 256, 200)]
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative to max |y|


@pytest.mark.parametrize("m", [1, gptq_cpu.SMALL_M])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int4_cpu_kernel_matches_the_dequantized_shard(shape, dtype, m):
    k, n, gs, off = shape
    g = torch.Generator().manual_seed(k + n + gs + off)
    w = random_weight(k, n, 4, gs, off, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    assert gptq_cpu.applies(x, w)
    y = gptq_cpu.int4_matmul(x, w)
    ref = x.double() @ w.dequantize(torch.float64)
    assert y.dtype == dtype and y.shape == (m, n)
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < TOL[dtype], err
    assert gptq_cpu.int4_matmul(x, w).equal(y)  # packed once, reused


def test_dispatch_takes_it_for_4_bit_shards_only(monkeypatch):
    monkeypatch.setattr(gptq_cpu, "DENSE_MAX_BYTES", 0)  # no dense copies: the 4-bit paths
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g)
    four = random_weight(256, 48, 4, 64, generator=g)
    eight = random_weight(256, 48, 8, 64, generator=g)
    small_groups = random_weight(256, 48, 4, 16, generator=g)  # the kernel takes 32..256
    for w in (four, eight, small_groups):
        torch.testing.assert_close(gptq_matmul(x, w), x @ w.dequantize(), rtol=1e-5, atol=1e-5)
    assert four.cpu_pack is not None
    big = torch.randn(gptq_cpu.SMALL_M + 1, 256, generator=g)  # fp32 prefill: the broadcast path
    assert not gptq_cpu.applies(big, four) and gptq_cpu.applies(big.bfloat16(), four)
    torch.testing.assert_close(gptq_matmul(big, four), big @ four.dequantize(), rtol=1e-5,
                               atol=1e-5)
    assert eight.cpu_pack is None and small_groups.cpu_pack is None
    # act-order: x read through the permutation first, as on the GPU
    perm = torch.randperm(256, generator=g)
    torch.testing.assert_close(gptq_matmul(x, four, perm), x[:, perm] @ four.dequantize(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shards_take_a_dense_copy_in_fp32_and_fp16_within_the_budget(dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=g)
    perm = torch.randperm(300, generator=g)
    shards = [random_weight(300, 40, 4, 128, 100, generator=g),  # starts inside a group
              random_weight(300, 40, 8, 64, generator=g), random_weight(300, 40, 3, 32, generator=g)]
    for w in shards:
        for p in (None, perm):
            xp = x if p is None else x[:, p]
            ref = xp.double() @ w.dequantize(torch.float64)
            y = gptq_matmul(x.to(dtype), w, p)
            assert y.dtype == dtype
            err = (y.double() - ref).abs().max() / ref.abs().max()
            assert err < TOL[dtype], err
        assert list(w.cpu_dense) == [dtype] and w.cpu_pack is None
    assert gptq_cpu.dense_copy(x.bfloat16(), shards[0]) is None  # bf16: the int4 kernel is faster
    # the process's budget: a shard that does not fit takes the int4 kernel; a copy freed with its
    # weight gives its bytes back
    size = 1024 * 1040 * torch.finfo(dtype).bits // 8
    monkeypatch.setattr(gptq_cpu, "DENSE_MAX_BYTES", gptq_cpu.dense_bytes() + size)
    big, other = (random_weight(1024, 1040, 4, 128, generator=g) for _ in range(2))
    xb = torch.randn(1, 1024, generator=g).to(dtype)
    gptq_matmul(xb, big)
    assert list(big.cpu_dense) == [dtype] and big.cpu_pack is None
    torch.testing.assert_close(gptq_matmul(xb, other).double(),
                               xb.double() @ other.dequantize(torch.float64),
                               rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    assert not other.cpu_dense and other.cpu_pack is not None  # over the budget: int4 kernel
    del big
    gc.collect()
    gptq_matmul(xb, other)  # another shard of the same size fits now
    assert list(other.cpu_dense) == [dtype]


def test_a_malformed_dense_limit_is_refused_with_its_name(monkeypatch):
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(gptq_cpu.DENSE_ENV, bad)
        with pytest.raises(ValueError, match=f"{gptq_cpu.DENSE_ENV}='{bad}'.*number >= 0"):
            gptq_cpu._dense_max_bytes()
    monkeypatch.setenv(gptq_cpu.DENSE_ENV, "0.5")
    assert gptq_cpu._dense_max_bytes() == 1 << 19
