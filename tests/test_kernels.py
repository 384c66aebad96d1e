"""Triton kernels against their torch references, on the CPU through the Triton interpreter.

Run: python -m pytest tests/test_kernels.py -q   (the module sets TRITON_INTERPRET=1 itself)
Tiny shapes, because the interpreter is slow; fp32 and fp16 only (bf16 is wrong there). Every kernel
writes into an output poisoned with NaN, so an element it fails to write fails the comparison.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules decorate their @triton.jit

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from gptq_random import random_gptq  # noqa: E402
from tpserve.kernels import (HeadFormat, dequant_rows, gptq_matmul, int8_matmul,  # noqa: E402
                             q8_0_matmul)
from tpserve.kernels.gptq_weight import gptq_matmul_cpu, unpack  # noqa: E402
from tpserve.model import gptq  # noqa: E402
from tpserve.model.checkpoint import Checkpoint  # noqa: E402
from tpserve.model.config import QuantConfig  # noqa: E402
from tpserve.model.gptq_shard import prepare_act_order, read_gptq_shard  # noqa: E402


def _interpreted(*names):
    """The kernel modules with interpreted kernels, re-imported (in order: helpers first) if
    something imported them before TRITON_INTERPRET was set."""
    mods = [importlib.import_module(f"tpserve.kernels.{n}") for n in names]
    if not isinstance(mods[0]._lane, InterpretedFunction):
        mods = [importlib.reload(m) for m in mods]
    return mods


common, _h2, gemv, decode, prefill, h2mm, hk = _interpreted(
    "gptq_common", "gptq_h2", "gptq_gemv", "gptq_decode", "gptq_prefill", "gptq_h2mm",
    "head_kernels")
launch = importlib.import_module("tpserve.kernels.gptq_launch")
gptq_matmul_triton = importlib.import_module("tpserve.kernels.dispatch").gptq_matmul_triton


def _close(y, ref, dtype):
    # fp32: only the summation order differs. fp16: the output is rounded (half an ulp, 2**-11
    # relative) and the ROW/TWO dot paths round the dequantized weight to fp16 as the reference does.
    scale = ref.abs().max().item()
    tol = 2e-5 * scale if dtype == torch.float32 else 3e-3 * scale
    err = (y.float() - ref).abs().max().item()
    assert err <= tol, f"max |err| {err:.3g} > {tol:.3g} (max |ref| {scale:.3g})"


def _poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype)


# (bits, k, n, group_size, k0, act_order, gemv BLOCK_K, mm BLOCK_K): group modes, per kernel
GPTQ_CASES = {
    "w4-partial-group": (4, 200, 72, 64, 0, False, 32, 128),  # ONE / ROW (gs < BLOCK_K)
    "w4-g128": (4, 300, 40, 128, 0, False, 128, 128),  # ONE / ONE, K % BLOCK_K != 0
    "w4-straddle": (4, 150, 72, 64, 40, False, 32, 128),  # TWO / ROW, K % 8 != 0
    "w4-straddle64": (4, 250, 40, 128, 64, False, 64, 128),  # ONE / TWO
    "w8-aligned": (8, 200, 72, 64, 0, False, 64, 64),  # ONE / ONE
    "w8-straddle": (8, 150, 40, 64, 40, False, 32, 64),  # TWO / TWO, K % 4 != 0
    "w8-small-groups": (8, 136, 40, 32, 16, False, 32, 64),  # TWO / ROW
    "w4-even": (4, 256, 40, 64, 0, False, 64, 128),  # ONE / ROW, tiles divide K (no row masks)
    "w4-act-shard": (4, 130, 40, 32, 64, True, 32, 128),  # g_idx (sorted): two-group or per-row
    "w4-act-even": (4, 256, 40, 64, 64, True, 32, 128),  # g_idx, tiles divide K
    "w8-act-shard": (8, 130, 72, 32, 64, True, 32, 64),  # ROW
    "w4-act-wide": (4, 256, 40, 32, 64, True, 128, 128),  # g_idx, several groups per M = 1 tile
}


def _config(m, bk_gemv, bk_mm):
    if m == 1:
        return dict(BLOCK_N=32, BLOCK_K=bk_gemv, SPLIT_K=2)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk_mm, SPLIT_K=2)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=bk_mm, GROUP_M=2, SPLIT_K=2)


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_triton_matches_reference(case, m):
    bits, k, n, gs, k0, act, bk_gemv, bk_mm = GPTQ_CASES[case]
    w = random_gptq(k, n, bits, gs, k0=k0, k_total=k0 + k + 60, act_order=act)
    perm = None
    if act:
        w, perm = prepare_act_order(w)
        assert w.g_idx is not None  # a shard's groups are ragged: the per-row path
    assert (w.group_offset != 0) == ("straddle" in case or "small" in case)
    for dtype in (torch.float32, torch.float16) if m in (1, 16) else (torch.float32,):
        x = torch.randn(m, k, dtype=dtype)
        xk = x if perm is None else x[:, perm]
        ref = gptq.dequantize(gptq.unpack_rows(w.qweight, bits, w.in_features),
                              gptq.unpack_cols(w.qzeros, bits, n), w.scales, w.groups())
        ref = xk.float() @ ref
        if x.device in launch._workspaces:  # split-K partials never read stale values
            launch._workspaces[x.device][0].fill_(float("nan"))
        out = gptq_matmul_triton(x, w, perm, out=_poisoned(m, n, dtype),
                                    config=_config(m, bk_gemv, bk_mm))
        _close(out, ref, dtype)
        assert not launch._workspaces[x.device][1].any()  # split-K left its tickets zeroed


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("bk", ["gemv", "mm"])
@pytest.mark.parametrize("case", GPTQ_CASES)
def test_fp16x2_rows_kernel_matches_reference(case, bk, m):
    """The fp16x2 kernel for 2 <= M <= 4 (each word dequantized once for 2 or 4 rows; M = 3 with
    a fourth row that is dropped) in every group mode it meets: one group per tile, two with the
    boundary between words, several per tile (BLOCK_K > group size), padded act-order."""
    bits, k, n, gs, k0, act, bk_gemv, bk_mm = GPTQ_CASES[case]
    w = random_gptq(k, n, bits, gs, k0=k0, k_total=k0 + k + 60, act_order=act)
    perm = None
    if act:
        w, perm = prepare_act_order(w)
    assert gemv.uses_h2(torch.float16, w)  # every case's boundaries fall between words
    x = torch.randn(m, k, dtype=torch.float16)
    ref = (x if perm is None else x[:, perm]).float() @ w.dequantize()
    if x.device in launch._workspaces:  # split-K partials never read stale values
        launch._workspaces[x.device][0].fill_(float("nan"))
    out = h2mm.h2_matmul(x, w, perm, out=_poisoned(m, n, torch.float16),
                         config=dict(BLOCK_N=32, BLOCK_K=bk_gemv if bk == "gemv" else bk_mm,
                                     SPLIT_K=2))
    _close(out, ref, torch.float16)
    assert not launch._workspaces[x.device][1].any()  # tickets left zeroed


@pytest.mark.parametrize("m", [1, 3])
def test_act_order_x_gathered_before_the_kernel(m, monkeypatch):
    """GATHER_X: x[:, perm] taken once in torch (padded rows included), the kernel reads x plainly."""
    monkeypatch.setattr(launch, "GATHER_X", True)
    w = random_gptq(130, 40, 4, 32, k0=64, k_total=260, act_order=True)
    w, perm = prepare_act_order(w)
    assert w.word_groups and w.in_features > w.x_features  # padded rows read x through perm
    x = torch.randn(m, 130, dtype=torch.float16)
    ref = x[:, perm].float() @ w.dequantize()
    out = gptq_matmul_triton(x, w, perm, out=_poisoned(m, 40, torch.float16),
                             config=_config(m, 32, 128))
    _close(out, ref, torch.float16)
    if m <= h2mm.MAX_M and m > 1:
        _close(h2mm.h2_matmul(x, w, perm, config=dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)), ref,
               torch.float16)


def test_tuning_keys_name_kernel_arguments():
    """Triton's autotuner reads its key from the launch's arguments: every name must be one (a
    wrong one fails only on a GPU, at the first tuned call)."""
    from tpserve.kernels import gptq_decode, gptq_gemv, gptq_h2mm, gptq_prefill  # noqa: F401
    assert len(launch.TUNED) >= 4
    for kernel, key in launch.TUNED:
        assert set(key) <= set(kernel.arg_names), (kernel.fn.__name__, key)


def test_gptq_large_m_dequantizes_then_matmuls():
    w = random_gptq(130, 40, 4, 32, k0=64, k_total=260, act_order=True)
    w, perm = prepare_act_order(w)
    x = torch.randn(prefill.DEQUANT_MIN_M, 130)
    y = gptq_matmul_triton(x, w, perm, out=_poisoned(x.shape[0], 40, torch.float32))
    _close(y, x[:, perm] @ w.dequantize(), torch.float32)


@pytest.mark.parametrize("m", [2, 5])
@pytest.mark.parametrize("case", GPTQ_CASES)
def test_prefill_kernel_for_few_rows_matches_reference(case, m):
    """The few-rows candidate (the prefill kernel with BLOCK_M 16 and split-K) in every group
    mode, its split-K tickets left zeroed."""
    bits, k, n, gs, k0, act, _, bk_mm = GPTQ_CASES[case]
    w = random_gptq(k, n, bits, gs, k0=k0, k_total=k0 + k + 60, act_order=act)
    perm = None
    if act:
        w, perm = prepare_act_order(w)
    x = torch.randn(m, k, dtype=torch.float16)
    ref = (x if perm is None else x[:, perm]).float() @ w.dequantize()
    out = prefill.rows_matmul(x, w, perm, out=_poisoned(m, n, torch.float16),
                              config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk_mm, GROUP_M=1,
                                          SPLIT_K=2))
    _close(out, ref, torch.float16)
    assert not launch._workspaces[x.device][1].any()


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_dequantize_kernel_matches_reference(case):
    """The large-M path's first half, in every group mode: one group per tile, two with the
    boundary inside it, per row (groups smaller than the tile, act-order)."""
    bits, k, n, gs, k0, act, _, _ = GPTQ_CASES[case]
    w = random_gptq(k, n, bits, gs, k0=k0, k_total=k0 + k + 60, act_order=act)
    if act:
        w, _ = prepare_act_order(w)
    torch.testing.assert_close(prefill.dequantize_triton(w, torch.float32), w.dequantize(),
                               rtol=0, atol=0)
    # fp16 (4-bit tiles in one group take the fp16x2 path): (q - z) s rounded once, as torch does
    torch.testing.assert_close(prefill.dequantize_triton(w, torch.float16),
                               w.dequantize().half(), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["w4-g128", "w4-even", "w4-straddle64"])
@pytest.mark.parametrize("m", [17, 40])
def test_fp16x2_tile_dequantization_gives_the_fp32_paths_weights(case, m, monkeypatch):
    """The prefill kernel's fp16x2 tiles (`gptq_h2._h2_tile`: eight fields per word, joined into
    rows 8 w + f) give the very outputs of its fp32 dequantization."""
    bits, k, n, gs, k0, act, _, bk_mm = GPTQ_CASES[case]
    w = random_gptq(k, n, bits, gs, k0=k0, k_total=k0 + k + 60, act_order=act)
    x = torch.randn(m, k, dtype=torch.float16)
    got = {}
    for h2 in (True, False):
        monkeypatch.setattr(prefill, "USE_H2", h2)
        got[h2] = prefill.prefill_matmul(x, w, None, out=_poisoned(m, n, torch.float16),
                                         config=_config(m, 32, bk_mm))
    assert torch.equal(got[True], got[False])
    _close(got[True], x.float() @ w.dequantize(), torch.float16)


def test_gptq_unsorted_act_order_runs_per_row():
    w = random_gptq(96, 40, 4, 32, act_order=True)
    x = torch.randn(1, 96)
    y = gptq_matmul_triton(x, w, out=_poisoned(1, 40, torch.float32),
                              config=_config(1, 32, 128))
    _close(y, x @ w.dequantize(), torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_shard_pads_each_group_to_whole_words(bits):
    """A row-parallel shard of an act-order layer: ragged groups, each padded to whole words at
    load (rows of q = z, exact zeros), so that the fp16x2 GEMV reads one group per word."""
    torch.manual_seed(3)
    p = 32 // bits
    w = random_gptq(150, 40, bits, 32, k0=50, k_total=300, act_order=True)
    ws, perm = prepare_act_order(w)
    g = ws.g_idx.long()
    counts = torch.bincount(g)
    assert ws.word_groups and ws.x_features == 150 and ws.in_features == len(perm) == len(g)
    assert bool((counts % p == 0).all()) and ws.in_features > 150  # some group was ragged
    assert bool((g[::p].repeat_interleave(p) == g).all())  # one group per word
    wd = ws.dequantize()
    torch.testing.assert_close(torch.zeros(150, 40).index_add_(0, perm, wd), w.dequantize())
    assert bool((wd[~torch.isin(torch.arange(len(perm)), _real_rows(perm))] == 0).all())
    for m in (1, 3):
        x = torch.randn(m, 150).half()
        want = x.float() @ w.dequantize()
        for run in ("kernel", "dispatch"):
            if run == "kernel":
                y = gptq_matmul_triton(x, ws, perm, out=_poisoned(m, 40, torch.float16),
                                       config=_config(m, 32, 128))
            else:
                y = gptq_matmul(x.float(), ws, perm)
            _close(y, want, torch.float16)


def _real_rows(perm):
    """The first occurrence of each x column in a padded perm: the rows that carry weights
    (padding rows repeat their run's first column, which comes first)."""
    seen, rows = set(), []
    for i, c in enumerate(perm.tolist()):
        if c not in seen:
            seen.add(c)
            rows.append(i)
    return torch.tensor(rows)


def test_prepare_act_order_unsharded_collapses_to_contiguous_groups():
    w = random_gptq(200, 24, 4, 64, act_order=True)
    ws, perm = prepare_act_order(w)
    assert ws.g_idx is None and ws.group_offset == 0 and perm is not None
    torch.testing.assert_close(ws.dequantize(), w.dequantize()[perm])
    x = torch.randn(3, 200)
    torch.testing.assert_close(gptq_matmul(x, ws, perm), x @ w.dequantize(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act", [False, True])
def test_gptq_triton_on_checkpoint_shard(tmp_path, act):
    """A row-parallel shard read by read_gptq_shard from a checkpoint (rows 37..100 of 100)."""
    k, n, gs, bits = 100, 40, 32, 4
    wt = torch.randn(k, n)
    g_idx = torch.arange(k) // gs
    if act:
        order = torch.randperm(k)
        g_idx = torch.empty_like(g_idx)
        g_idx[order] = torch.arange(k) // gs
        q_sorted, zeros, scales = gptq.quantize(wt[order], bits, gs, sym=False)
        q = torch.empty_like(q_sorted)
        q[order] = q_sorted
    else:
        q, zeros, scales = gptq.quantize(wt, bits, gs, sym=False)
    save_file({"l.qweight": gptq.pack_rows(q, bits), "l.qzeros": gptq.pack_cols(zeros, bits),
               "l.scales": scales, "l.g_idx": g_idx.to(torch.int32)}, tmp_path / "m.safetensors")
    quant = QuantConfig(bits=bits, group_size=gs, desc_act=act, sym=False, v1=False, lm_head=False)
    w = read_gptq_shard(Checkpoint(tmp_path), "l", quant, k, n, rows=(37, 100), cols=(0, n))
    assert (w.g_idx is not None) == act and w.group_offset == (0 if act else 37 % gs)
    full = gptq.dequantize(q, zeros, scales, g_idx)
    ws, perm = prepare_act_order(w)
    for m in (1, 3, 20):
        x = torch.randn(m, 63)
        y = gptq_matmul_triton(x, ws, perm, out=_poisoned(m, n, torch.float32),
                                  config=_config(m, 32, 128))
        _close(y, x @ full[37:], torch.float32)


def test_gptq_dispatch_on_cpu_uses_reference():
    w = random_gptq(64, 16, 3, 32, k0=10)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(gptq_matmul(x, w), x @ w.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k0,k,gs", [(0, 64, 32), (10, 64, 32), (0, 50, 32), (37, 29, 16),
                                     (5, 20, 64)])
@pytest.mark.parametrize("act", [False, True])
def test_gptq_cpu_path_matches_reference(bits, k0, k, gs, act):
    # The CPU path pads rows to whole groups: offsets inside a group, a short last group and a
    # shard inside one group must give the reference's product exactly (up to summation order).
    w = random_gptq(k, 24, bits, gs, k0=k0, k_total=k0 + k + 7, act_order=act)
    # the kernels' unpacker (2/4/8 bits: one broadcast shift) against the format module's
    assert torch.equal(unpack(w.qweight, bits, k), gptq.unpack_rows(w.qweight, bits, k))
    assert torch.equal(unpack(w.qzeros.T, bits, 24).T, gptq.unpack_cols(w.qzeros, bits, 24))
    x = torch.randn(3, k)
    torch.testing.assert_close(gptq_matmul_cpu(x, w), x @ w.dequantize(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gptq_matmul_cpu(x.double(), w), x.double() @ w.dequantize(torch.float64))


# ---- lm_head / embedding formats ----

def _naive_w(q, scales):
    return q.float() * (scales.float()[:, None] if scales.dim() == 1
                        else scales.float().repeat_interleave(32, dim=1))


def _naive(x, q, scales):
    return x.float() @ _naive_w(q, scales).T


FORMATS = {"int8": HeadFormat.INT8, "q8_0": HeadFormat.Q8_0}


def _quantize(fmt, w):
    return hk.quantize_int8(w) if fmt == "int8" else hk.quantize_q8_0(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_head_matmul_matches_reference(fmt, m, dtype):
    v, h = 100, 96  # neither a multiple of the test blocks (16 x 64)
    w = torch.randn(v, h) / h ** 0.5
    q, s = _quantize(fmt, w)
    x = torch.randn(m, h, dtype=dtype)
    ref = _naive(x, q, s)
    _close(hk.head_matmul_triton(FORMATS[fmt], x, q, s, out=_poisoned(m, v, dtype)), ref, dtype)
    _close(hk.head_matmul_reference(FORMATS[fmt], x, q, s), ref, dtype)
    # fp32 logits stored from the kernel's fp32 sums (the server's head): the fp32 tolerance
    out32 = hk.head_matmul_triton(FORMATS[fmt], x, q, s, out=_poisoned(m, v, torch.float32))
    assert out32.dtype == torch.float32
    _close(out32, ref, torch.float32)
    public = int8_matmul if fmt == "int8" else q8_0_matmul
    assert public(x.view(1, m, h), q, s).shape == (1, m, v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_rows(fmt):
    v, h = 50, 160
    w = torch.randn(v, h)
    q, s = _quantize(fmt, w)
    ids = torch.tensor([3, 0, 49, 3, 17])
    ref = hk.dequant_rows_reference(FORMATS[fmt], ids, q, s, torch.float32)
    torch.testing.assert_close(ref, _naive_w(q, s)[ids])
    for dtype in (torch.float32, torch.float16):
        out = torch.full((5, h), float("nan"), dtype=dtype)
        y = hk.dequant_rows_triton(FORMATS[fmt], ids, q, s, dtype, out=out, block_h=64)
        torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=0)
    assert dequant_rows(FORMATS[fmt], ids.view(1, 5), q, s, torch.float16).shape == (1, 5, h)


def test_quantize_helpers():
    w = torch.randn(64, 128)
    q, s = hk.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    q, s = hk.quantize_q8_0(w)
    assert s.dtype == torch.float16 and s.shape == (64, 4)
    assert q.numel() + 2 * s.numel() == 34 * w.numel() // 32  # 34 bytes per block of 32
    step = s.float().repeat_interleave(32, dim=1)
    assert ((q.float() * step - w).abs() <= step / 2 + 1e-3 * step).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        hk.quantize_q8_0(torch.randn(4, 40))
