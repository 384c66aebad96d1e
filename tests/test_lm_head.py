"""Quantized lm_head at the coordinator: int8, Q8_0, GPTQ; one copy of tied tables; main embedding."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tpserve
from tpserve.errors import TpserveError
from tpserve.model.lm_head import Table

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("mode", ["int8", "q8_0"])
def test_table_error_is_within_the_rounding_bound(mode):
    # Round-to-nearest moves each weight by at most half its scale, so for every vocab row v:
    # |logit_q - logit| <= 0.5 * sum_h scale[v, h] * |x_h|  (exact bound, + fp32 slack).
    w, x = torch.randn(300, 64), torch.randn(3, 64)
    t = Table.from_dense(w, mode, torch.float32)
    err = (t.logits(x) - x @ w.T).abs()
    s = t.scales.float()
    per_h = s[:, None].expand(-1, 64) if mode == "int8" else s.repeat_interleave(32, dim=1)
    bound = 0.5 * x.abs() @ per_h.T
    assert (err <= bound * 1.001 + 1e-5).all()
    ids = torch.tensor([0, 7, 299, 7])
    deq = t.rows(ids)
    assert deq.dtype == torch.float32 and ((deq - w[ids]).abs() <= 0.5 * per_h[ids] + 1e-6).all()


@pytest.mark.parametrize("name,modes", [
    ("llama_tied_g128", ["int8", "q8_0"]),
    ("llama_g128_sym", ["int8", "q8_0"]),
    ("llama_lmhead_g128", ["int8", "q8_0", "gptq"]),  # GPTQModel-quantized head (8-bit g32)
])
def test_each_head_mode_agrees_with_dense_over_32_greedy_steps(name, modes):
    path = FIXTURES / name
    ids = load_file(str(path / "reference.safetensors"))["input_ids"].tolist()
    dense = tpserve.load(path, tp=2, dtype=torch.float32, lm_head="dense")
    want_logits, want = dense.logits(ids), dense.generate(ids, max_tokens=32, ignore_eos=True)
    for mode in modes:
        llm = tpserve.load(path, tp=2, dtype=torch.float32, lm_head=mode)
        rel = ((llm.logits(ids) - want_logits).abs().max() / want_logits.abs().max()).item()
        # 8-bit weights: ~1/254 of each row's (block's) max per weight; measured <= 0.8%
        assert rel < 0.02, (mode, rel)
        assert llm.generate(ids, max_tokens=32, ignore_eos=True) == want, mode
        assert llm.head.tied == (name == "llama_tied_g128")


def test_tied_table_is_held_once_and_quantized(tmp_path):
    path = FIXTURES / "llama_tied_g128"
    v, h = 256, 256
    bf16_copy = v * h * 2
    sizes = {}
    for mode in ("dense", "int8", "q8_0"):
        head = tpserve.load(path, dtype=torch.bfloat16, lm_head=mode).head
        assert head.embed_table is head.lm_head  # one table serves both
        sizes[mode] = head.nbytes
    assert sizes["dense"] == bf16_copy  # peers hold two of these
    assert sizes["int8"] <= 0.55 * bf16_copy and sizes["q8_0"] <= 0.55 * bf16_copy
    print("coordinator bytes (tied 256x256):", sizes)


def test_gptq_mode_needs_a_gptq_head():
    with pytest.raises(TpserveError, match="needs a checkpoint whose head is GPTQ-quantized"):
        tpserve.load(FIXTURES / "llama_tied_g128", lm_head="gptq")
    with pytest.raises(TpserveError, match="lm_head mode 'fp4' is not known"):
        tpserve.load(FIXTURES / "llama_tied_g128", lm_head="fp4")


def test_an_auxiliary_same_vocab_table_is_never_the_embedding_or_the_head(tmp_path):
    src = FIXTURES / "llama_tied_g128"
    dst = tmp_path / "with_aux"
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    # like Gemma's per-layer embeddings: same vocabulary, another width, sorted before the main one
    t["model.embed_tokens_per_layer.weight"] = torch.randn(256, 2 * 64).half()
    t["model.aaa_embed.weight"] = torch.randn(256, 96).half()
    save_file(t, str(dst / "model.safetensors"))
    ids = load_file(str(src / "reference.safetensors"))["input_ids"].tolist()
    for mode in ("dense", "int8"):
        a = tpserve.load(src, dtype=torch.float32, lm_head=mode)
        b = tpserve.load(dst, dtype=torch.float32, lm_head=mode)
        assert torch.equal(a.logits(ids), b.logits(ids))
        assert b.head.lm_head.nbytes == a.head.lm_head.nbytes


def test_compute_dtype_comes_from_the_config_not_from_int8_weights():
    llm = tpserve.load(FIXTURES / "llama_tied_g128", lm_head="int8")  # config dtype float16
    assert llm.head.lm_head.q.dtype == torch.int8
    assert llm.head.embed(torch.tensor([1, 2])).dtype == torch.float16
