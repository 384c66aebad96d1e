"""GPTQ packing round trips and the shard property: sharded products sum/concatenate to the full one."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

import tiny
from tpserve.model import gptq
from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import QuantConfig
from tpserve.model.gptq_shard import read_gptq_shard


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 32, 100, 96])
def test_pack_round_trip_and_matches_independent_unpacker(bits, k):
    v = torch.randint(0, 2**bits, (k, 5), dtype=torch.int32)
    words = gptq.pack_rows(v, bits)
    assert words.shape == (gptq.packed_len(k, bits), 5)
    assert torch.equal(gptq.unpack_rows(words, bits, k), v)
    assert np.array_equal(tiny.np_unpack(words.numpy(), bits, k), v.numpy())
    assert torch.equal(gptq.unpack_cols(gptq.pack_cols(v.T, bits), bits, k), v.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_from_a_bit_offset_reads_a_mid_word_slice(bits):
    v = torch.randint(0, 2**bits, (70, 3), dtype=torch.int32)
    words = gptq.pack_rows(v, bits)
    for k0 in (1, 5, 11, 33):
        w0 = k0 * bits // 32
        got = gptq.unpack_rows(words[w0:], bits, 70 - k0, bit_offset=k0 * bits - 32 * w0)
        assert torch.equal(got, v[k0:])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zeros_round_trip_including_zero_that_borrows(bits):
    # A true zero of 0 makes the word-level v1 subtraction borrow from the next field; the
    # word-level inverse must restore every field exactly.
    z = torch.randint(0, 2**bits, (4, 64), dtype=torch.int32)
    z[:, ::3] = 0
    v1 = gptq.v2_to_v1_zeros(gptq.pack_cols(z, bits), bits)
    assert torch.equal(gptq.unpack_zeros(v1, bits, 64, v1=True), z)
    # ...and a column slice starting mid-row (as a column shard reads it) agrees.
    for n0 in (5, 11, 40):
        w0 = n0 * bits // 32
        part = gptq.unpack_zeros(v1[:, w0:], bits, 64 - n0, bit_offset=n0 * bits - 32 * w0,
                                 v1=True, word_start=w0)
        assert torch.equal(part, z[:, n0:])


def test_quantize_dequantize_error_is_bounded_by_half_a_step():
    w = torch.randn(96, 40)
    for sym in (True, False):
        q, z, s = gptq.quantize(w, 4, 32, sym)
        groups = torch.arange(96) // 32
        err = (gptq.dequantize(q, z, s, groups) - w).abs()
        # round-to-nearest: at most half a quantization step (+ fp16 scale rounding slack)
        assert (err <= 0.5 * s.float()[groups] * 1.01 + 1e-6).all()


def _write_layer(d: Path, k, n, bits, gs, desc_act, v1, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=gen)
    t = tiny._gptq_tensors("layer", w, bits, gs, False, desc_act, "gptq" if v1 else "gptq_v2", gen)
    save_file(t, str(d / "model.safetensors"))
    full = tiny.np_dequantize(t, "layer", bits, v1, k, n, gs).T  # [K, N]
    return full


def _cuts(draw, n, parts):
    inner = sorted(draw(st.sets(st.integers(1, n - 1), min_size=parts - 1, max_size=parts - 1)))
    return list(zip([0] + inner, inner + [n]))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.integers(8, 160), n=st.integers(4, 70), bits=st.sampled_from([2, 3, 4, 8]),
       gs=st.sampled_from([-1, 8, 16, 32, 48, 128]), tp=st.integers(1, 5), desc_act=st.booleans(),
       v1=st.booleans())
def test_row_and_column_shards_reassemble_the_full_product(data, k, n, bits, gs, desc_act, v1, tp):
    tp_rows, tp_cols = min(tp, k), min(tp, n)
    with tempfile.TemporaryDirectory() as d:
        full = _write_layer(Path(d), k, n, bits, gs, desc_act, v1, seed=k * n + bits)
        ckpt = Checkpoint(d)
        quant = QuantConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=False, v1=v1,
                            lm_head=False)
        x = torch.randn(3, k)
        want = x @ full
        # Arbitrary cut points: shards start and end inside groups and inside pack words.
        rows = _cuts(data.draw, k, tp_rows)
        got = sum(x[:, k0:k1] @ read_gptq_shard(ckpt, "layer", quant, k, n, (k0, k1), (0, n))
                  .dequantize() for k0, k1 in rows)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 sum reordering only
        cols = _cuts(data.draw, n, tp_cols)
        got = torch.cat([x @ read_gptq_shard(ckpt, "layer", quant, k, n, (0, k), c).dequantize()
                         for c in cols], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_straddling_shard_keeps_both_groups_and_its_offset(tmp_path):
    _write_layer(tmp_path, 96, 8, 4, 32, False, True, seed=1)
    quant = QuantConfig(bits=4, group_size=32, desc_act=False, sym=False, v1=True, lm_head=False)
    w = read_gptq_shard(Checkpoint(tmp_path), "layer", quant, 96, 8, (20, 50), (0, 8))
    assert w.group_offset == 20 and w.scales.shape[0] == 2  # groups 0 and 1
    assert w.groups()[:12].eq(0).all() and w.groups()[12:].eq(1).all()
