"""A decode GEMV's output as a fixed-point sum taken by the kernel that reads it (`fixed_sum.py`),
against the same GEMV writing its output and the same consumer reading it, under the Triton
interpreter (fp16 and fp32, split-K, a shard starting inside a group). Each consumer must leave
the buffer zeroed: the next GEMV of its role adds into it.

    python -m pytest tests/test_fixed_sum.py -q
"""

import pytest
import torch

import tpserve
from tpserve.demo import demo_path
from tpserve.kernels import fixed_sum, gptq_launch
from tpserve.kernels.fused import add_rms_norm, silu_mul
from tpserve.kernels.gptq_gemv import gemv
from tpserve.kernels.gptq_weight import random_weight
from tpserve.kernels.rotary import rotary_store
from tpserve.model.decoder import gated_roles, reads_gated

CONFIG = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=4)
TOL = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _gemv_both(k, n, dtype, role, offset=0):
    """(the GEMV's output as written, the fixed-point buffer it filled instead)."""
    torch.manual_seed(k + n)
    w = random_weight(k, n, 4, 128, offset)
    x = torch.randn(1, k, dtype=dtype)
    want = gemv(x, w, config=CONFIG)
    buf = fixed_sum.buffer(x.device, role, n)
    got = gemv(x, w, out=buf, config=CONFIG)
    assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.int64
    return want, buf


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [0, 64])
def test_the_fixed_point_sum_is_the_gemv_output(dtype, offset):
    want, buf = _gemv_both(512, 96, dtype, "t", offset)
    assert torch.allclose(fixed_sum.take_reference(buf, dtype).float(), want.float(), **TOL[dtype])
    assert not buf.any()  # taken: zeroed for the next GEMV


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_residual_add_and_norm_take_a_fixed_point_sum(dtype):
    want, buf = _gemv_both(512, 200, dtype, "o")
    h, w = torch.randn(1, 200, dtype=dtype), torch.randn(200, dtype=dtype)
    total, normed = add_rms_norm(h, buf, w, 1e-6, use_triton=True)
    total_want, normed_want = add_rms_norm(h, want, w, 1e-6, use_triton=True)
    assert torch.allclose(total.float(), total_want.float(), **TOL[dtype])
    assert torch.allclose(normed.float(), normed_want.float(), **TOL[dtype])
    assert not buf.any()
    # a norm that writes its row in an act-order order reads the row in several programs: the
    # sum is taken first (in torch), with the same result
    want, buf = _gemv_both(512, 200, dtype, "o")
    perm = torch.randperm(200)
    got = add_rms_norm(h, buf, w, 1e-6, use_triton=True, perm=perm, chunk=64)[1]
    assert torch.allclose(got.float(), add_rms_norm(h, want, w, 1e-6, use_triton=True,
                                                    perm=perm)[1].float(), **TOL[dtype])
    assert not buf.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_silu_mul_takes_gate_and_up_as_fixed_point_sums(dtype):
    want, buf = _gemv_both(256, 2 * 160, dtype, "gate_up")
    got = silu_mul(buf[:, :160], buf[:, 160:], use_triton=True, dtype=dtype)
    assert got.dtype == dtype
    assert torch.allclose(got.float(), silu_mul(want[:, :160], want[:, 160:], use_triton=True)
                          .float(), **TOL[dtype])
    assert not buf.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotary_store_takes_q_k_v_as_fixed_point_sums(dtype):
    heads, kv_heads, hd = 4, 2, 16
    want, buf = _gemv_both(256, (heads + 2 * kv_heads) * hd, dtype, "qkv")
    cos, sin = torch.randn(1, hd, dtype=dtype), torch.randn(1, hd, dtype=dtype)
    slots, positions = torch.tensor([1]), torch.tensor([3])

    def run(out):
        q, k, v = out.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        caches = [torch.zeros(2, 5, kv_heads, hd, dtype=dtype) for _ in range(2)]
        q = rotary_store(q.view(1, heads, hd), k.view(1, kv_heads, hd), v.view(1, kv_heads, hd),
                         cos, sin, *caches, slots, positions, use_triton=True)
        return q, caches
    (q, caches), (q_want, caches_want) = run(buf), run(want)
    assert q.dtype == dtype and torch.allclose(q.float(), q_want.float(), **TOL[dtype])
    for c, c_want in zip(caches, caches_want):
        assert torch.allclose(c.float(), c_want.float(), **TOL[dtype])
    assert not buf.any()


def test_buffers_keep_their_address_and_grow():
    a = fixed_sum.buffer(torch.device("cpu"), "grow", 8)
    assert fixed_sum.buffer(torch.device("cpu"), "grow", 8).data_ptr() == a.data_ptr()
    b = fixed_sum.buffer(torch.device("cpu"), "grow", 64)
    assert b.shape == (1, 64) and not b.any() and b.data_ptr() != a.data_ptr()


def test_reset_zeroes_what_a_failed_step_left():
    _, buf = _gemv_both(256, 64, torch.float32, "left")
    assert buf.any()  # a GEMV's sum whose reader never ran
    fixed_sum.reset(buf.device)
    assert not buf.any()


def test_a_non_finite_output_reads_as_inf_not_as_a_wrapped_sum():
    """Partials are clamped (NaN to the bound): an int64 sum of up to 32 of them cannot wrap, and
    what fp16 cannot hold reads as inf, as the written output would be non-finite too."""
    w = random_weight(512, 64, 4, 128)
    for bad in (float("nan"), float("inf"), 1e30):
        x = torch.randn(1, 512)
        x[0, 7] = bad
        x = x.half() if bad != 1e30 else x
        want = gemv(x, w, config=CONFIG).float()  # the written output
        buf = fixed_sum.buffer(x.device, "bad", 64)
        gemv(x, w, out=buf, config=CONFIG)
        got = fixed_sum.take_reference(buf, torch.float16)
        beyond = ~torch.isfinite(want) | (want.abs() > 65504)
        assert beyond.sum() > 32 and torch.isinf(got[beyond]).all(), (bad, beyond.sum())
        assert torch.equal(got[~beyond], want[~beyond].half())
        assert not buf.any()


def test_which_halves_hand_over_fixed_point_sums(monkeypatch):
    """By default, with one rank in the process: every half but the last (whose sum no norm
    reads) hands its partial over as a fixed-point sum, and the attention / MLP modules name the
    model's buffers; at tp=2, or with TPSERVE_FIXED_SUM=0, none does. (The buffers themselves are only used for
    CUDA tensors: bench/gpu_h100.sh fixedsum runs them.)"""
    monkeypatch.delenv(fixed_sum.ENV, raising=False)
    llm = tpserve.load(demo_path(), tp=1, dtype=torch.float32)
    rank = llm.executor.ranks[0]
    owner, n = rank.fixed_sums, rank.num_halves
    assert owner is not None
    assert [rank.takes_fixed(j) for j in range(n)] == [True] * (n - 1) + [False]
    assert all(layer.self_attn.fixed_sums == owner == layer.mlp.fixed_sums for layer in rank.layers)
    tokens = llm.generate([3, 4, 5], max_tokens=4, ignore_eos=True)
    llm.close()
    llm = tpserve.load(demo_path(), tp=2, dtype=torch.float32)
    assert all(r.fixed_sums is None and not r.takes_fixed(0) for r in llm.executor.ranks)
    llm.close()
    monkeypatch.setenv(fixed_sum.ENV, "0")
    llm = tpserve.load(demo_path(), tp=1, dtype=torch.float32)
    assert llm.executor.ranks[0].fixed_sums is None
    assert llm.generate([3, 4, 5], max_tokens=4, ignore_eos=True) == tokens  # CPU: same path
    llm.close()


def test_only_fp16_gemvs_return_fixed_point_sums():
    """The clamp (+-2**24 per partial) lies far beyond every fp16 output; bf16 and fp32 outputs
    can exceed it, so their GEMVs write their sums."""
    assert fixed_sum.fits(torch.float16)
    assert not fixed_sum.fits(torch.bfloat16) and not fixed_sum.fits(torch.float32)


def test_where_fixed_point_sums_are_on(monkeypatch):
    """TPSERVE_FIXED_SUM: unset or `all`, every group size (at tp > 1 where the one-shot
    all-reduce takes the row-parallel sums, `rank_worker._join` turns them on); 1, one rank
    only; 0, nowhere. In-process ranks sharing a process (LocalComm) never use them, whatever
    the switch."""
    for mode, want in ((None, (True, True)), ("1", (True, False)), ("all", (True, True)),
                       ("0", (False, False))):
        if mode is None:
            monkeypatch.delenv(fixed_sum.ENV, raising=False)
        else:
            monkeypatch.setenv(fixed_sum.ENV, mode)
        assert (fixed_sum.enabled(1), fixed_sum.enabled(2)) == want, mode
    monkeypatch.setenv(fixed_sum.ENV, "off")
    with pytest.raises(ValueError, match="TPSERVE_FIXED_SUM='off': use all"):
        fixed_sum.enabled(1)
    monkeypatch.setenv(fixed_sum.ENV, "all")
    llm = tpserve.load(demo_path(), tp=2, dtype=torch.float32)
    assert all(r.fixed_sums is None for r in llm.executor.ranks)
    llm.close()
    llm = tpserve.load(demo_path(), tp=1, dtype=torch.float32)
    rank = llm.executor.ranks[0]
    rank.use_fixed_sums(False)  # e.g. a group set up again without the one-shot path
    assert all(layer.mlp.fixed_sums is None is layer.self_attn.fixed_sums for layer in rank.layers)
    rank.use_fixed_sums(True)
    assert rank.fixed_sums is not None and all(
        layer.mlp.fixed_sums == rank.fixed_sums for layer in rank.layers)
    llm.close()


def test_with_one_rank_the_residual_norm_takes_the_sum_itself(monkeypatch):
    """At tp=1 a fixed-point o/down partial goes to the residual add + norm kernel, which takes
    it: the decoder must not take it in torch first (four more kernels a half: the fallback is
    for tp > 1 data paths without the fused all-reduce)."""
    from tpserve.model.decoder import StepState
    llm = tpserve.load(demo_path(), tp=1, dtype=torch.float32)
    rank = llm.executor.ranks[0]
    hidden = llm.cfg.hidden_size
    h, part = torch.randn(1, hidden), torch.randn(1, hidden)
    want = rank.layers[0].mlp_norm.after_add(h, part)
    fixed = (part.double() * 2.0 ** 32).long()

    def refuse(*args):
        raise AssertionError("the decoder took the fixed-point sum in torch")
    monkeypatch.setattr(fixed_sum, "take_reference", refuse)
    state = StepState({}, None, None, None)
    got = rank.reduce_residual(0, h, fixed, state)
    assert torch.allclose(got, want[0], atol=1e-6) and torch.allclose(state.normed, want[1],
                                                                       atol=1e-5)
    assert not fixed.any()  # taken by the norm
    llm.close()


@pytest.mark.parametrize("offset", [0, 64])
@pytest.mark.parametrize("perm", [False, True])
def test_the_down_gemv_reads_silu_mul_from_the_gate_up_sum(offset, perm, monkeypatch):
    """A down projection's GEMV given the fixed-point gate/up sum (int64 [1, 2K]) computes
    silu(gate) * up itself (`fixed_sum.gated`): the bits of the SiLU-mul kernel taking the same
    sum, then the GEMV; the sum is read, not taken, and `clear` zeroes another buffer."""
    k, n = 256, 96
    torch.manual_seed(offset + perm)
    gate_up = random_weight(128, 2 * k, 4, 128)
    down = random_weight(k, n, 4, 128, offset)
    p = torch.randperm(k) if perm else None
    x = torch.randn(1, 128, dtype=torch.float16)
    buf = fixed_sum.buffer(x.device, "gate_up-test", 2 * k)
    gemv(x, gate_up, out=buf, config=CONFIG)
    kept = buf.clone()
    act = silu_mul(buf[:, :k], buf[:, k:], use_triton=True, dtype=torch.float16)  # takes it
    want = gemv(act, down, p, config=CONFIG)
    assert torch.equal(fixed_sum.gated_reference(kept), act)  # the torch reference of `gated`
    buf.copy_(kept)
    other = fixed_sum.buffer(x.device, "gate_up-other", 3 * k)
    other.fill_(7)
    got = gemv(buf, down, p, config=CONFIG, clear=other)
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert torch.equal(buf, kept) and not other.any()
    monkeypatch.setattr(gptq_launch, "GATHER_X", True)  # (the A/B switch: x gathered in torch)
    assert torch.equal(gemv(buf, down, p, config=CONFIG), want)  # the sum is read through perm
    monkeypatch.setattr(gptq_launch, "GATHER_X", False)
    # into a fixed-point output too (the down projection's sum for the next residual add + norm)
    out = fixed_sum.buffer(x.device, "down-test", n)
    gemv(buf, down, p, out=out, config=CONFIG)
    assert torch.allclose(fixed_sum.take_reference(out, torch.float16).float(), want.float(),
                          **TOL[torch.float16])


@pytest.mark.parametrize("n", range(7))
def test_gate_up_sums_alternate_buffers_cleared_by_the_next_gate_up(n):
    """`decoder.gated_roles`: gate/up GEMV i clears the buffer GEMV i - 1 wrote (cyclically: a
    step's first clears the step before's last), and never writes the buffer it clears or one
    that is not clear (consecutive GEMVs, cyclically, use different buffers); one MLP has no
    such assignment."""
    roles = gated_roles(n, "m")
    if n < 2:
        assert roles == []
        return
    assert len(roles) == n and len({w for w, _ in roles}) == (3 if n % 2 else 2)
    for i, (write, clear) in enumerate(roles):
        assert clear == roles[i - 1][0] and write != clear


def test_the_gated_mlps_of_a_model(monkeypatch):
    """With fixed-point sums on and TPSERVE_GATED_SUM=1, every SiLU-gated GPTQ MLP of the demo
    model reads silu(gate) * up from its gate/up sum (roles assigned in layer order); 0 (the
    default) keeps the SiLU-mul kernel; an unknown value is refused in one sentence."""
    monkeypatch.setenv(fixed_sum.GATED_ENV, "1")
    llm = tpserve.load(demo_path(), tp=1, dtype=torch.float32)
    try:
        rank = llm.executor.ranks[0]
        mlps = [layer.mlp for layer in rank.layers]
        assert rank.fixed_sums is not None and all(reads_gated(m) for m in mlps)
        assert [m.gated_roles for m in mlps] == gated_roles(len(mlps), rank.fixed_sums)
        monkeypatch.setenv(fixed_sum.GATED_ENV, "0")
        rank.use_fixed_sums(True)
        assert all(m.gated_roles is None for m in mlps) and rank.fixed_sums is not None
        monkeypatch.setenv(fixed_sum.GATED_ENV, "yes")
        with pytest.raises(ValueError, match="TPSERVE_GATED_SUM='yes': use 1"):
            rank.use_fixed_sums(True)
        monkeypatch.delenv(fixed_sum.GATED_ENV)
        assert not fixed_sum.gated_enabled(1)  # the default
        for mode, want in (("1", (True, False)), ("all", (True, True)), ("0", (False, False))):
            monkeypatch.setenv(fixed_sum.GATED_ENV, mode)
            assert (fixed_sum.gated_enabled(1), fixed_sum.gated_enabled(2)) == want, mode
        monkeypatch.setenv(fixed_sum.GATED_ENV, "1")
        rank.use_fixed_sums(False)
        assert all(m.gated_roles is None for m in mlps) and rank.fixed_sums is None
    finally:
        llm.close()
