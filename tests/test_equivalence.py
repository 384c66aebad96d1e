"""tpserve at tp = 1..4 equals transformers' own model class on the dequantized weights.

Tolerance: both sides run fp32 on bit-identical dequantized weights, so the only differences are
summation order (a row-parallel product is split into tp partial sums; attention kernels differ).
That is ~1e-6 relative; we allow 1e-4 absolute on logits of magnitude ~1-10.
"""

from pathlib import Path

import pytest
import torch

import tiny
import tpserve

ATOL = 1e-4
PROMPT = [1, 5, 9, 33, 70, 2, 100, 7, 64, 3, 11]

# name -> make_checkpoint kwargs. With hidden 96 (12 heads x 8) and intermediate 168, tp=3/4
# shards of o_proj (K=96) and down_proj (K=168) start inside groups of 32 and 64 and the last
# group of down_proj is partial (intermediate 168).
CASES = {
    "llama_sym_g32": dict(arch="llama"),
    "llama_asym_act_g64": dict(arch="llama", sym=False, desc_act=True, group_size=64),
    "llama3_rope_tied_g16": dict(arch="llama", group_size=16, tie=True,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32}),
    "mistral_v2_2bit_gchan": dict(arch="mistral", bits=2, group_size=-1, sym=False, fmt="gptq_v2"),
    "qwen2_3bit_bias": dict(arch="qwen2", bits=3, group_size=32),
    "qwen3_8bit_act": dict(arch="qwen3", bits=8, group_size=64, desc_act=True),
    "llama_mixed_dense_down": dict(arch="llama", skip=("down_proj.weight",)),
    "llama_act_dense_gate": dict(arch="llama", desc_act=True, skip=("gate_proj.weight",)),
}


@pytest.fixture(scope="module")
def refs(ckpt_dir):
    out = {}
    for name, kw in CASES.items():
        path = ckpt_dir(name, **kw)
        model = tiny.reference_model(path)
        out[name] = (path, tiny.reference_logits(model, PROMPT),
                     tiny.reference_greedy(model, PROMPT, 16))
    return out


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_match_transformers(refs, name, tp):
    path, ref_logits, ref_tokens = refs[name]
    llm = tpserve.load(path, tp=tp, dtype=torch.float32)
    logits = llm.logits(PROMPT)
    assert logits.shape == (len(PROMPT), 128) and logits.dtype == torch.float32
    err = (logits - ref_logits).abs().max().item()
    assert err < ATOL, f"{name} tp={tp}: max |logit diff| {err:.2e} >= {ATOL}"
    assert llm.generate(PROMPT, max_tokens=16, ignore_eos=True) == ref_tokens
    llm.close()


@pytest.mark.parametrize("name", ["llama_sym_g32", "llama_asym_act_g64", "qwen3_8bit_act"])
def test_the_4_bit_cpu_paths_match_transformers_without_dense_copies(refs, name, monkeypatch):
    """fp32 CPU shards take dense copies while the process's budget lasts (gptq_cpu.py); with no
    budget the model runs torch's int4 CPU kernel (decode rows, 4-bit) and the per-group
    broadcast (prefill, act-order, 8-bit): the same logits and tokens."""
    from tpserve.kernels import gptq_cpu
    monkeypatch.setattr(gptq_cpu, "DENSE_MAX_BYTES", 0)
    path, ref_logits, ref_tokens = refs[name]
    llm = tpserve.load(path, tp=2, dtype=torch.float32)
    err = (llm.logits(PROMPT) - ref_logits).abs().max().item()
    assert err < ATOL, f"{name}: max |logit diff| {err:.2e} >= {ATOL}"
    assert llm.generate(PROMPT, max_tokens=16, ignore_eos=True) == ref_tokens
    from tpserve.kernels.gptq_weight import GPTQWeight
    weights = [m.weight for rank in llm.executor.ranks for m in rank.layers.modules()
               if isinstance(getattr(m, "weight", None), GPTQWeight)]
    assert weights and not any(w.cpu_dense for w in weights)
    if name == "llama_sym_g32":  # 4-bit, no act-order: decode rows through the int4 kernel
        assert all(w.cpu_pack is not None for w in weights)
    llm.close()


def test_every_row_parallel_shard_straddles_a_group_at_tp4(refs):
    # The configuration above is only a useful test if the shards really start inside groups.
    path, *_ = refs["llama_sym_g32"]
    llm = tpserve.load(path, tp=4, dtype=torch.float32)
    for rank in llm.executor.ranks[1:]:
        layer = rank.layers[0]
        assert layer.self_attn.o_proj.weight.group_offset != 0
        assert layer.mlp.down_proj.weight.group_offset != 0
    llm.close()


@pytest.mark.parametrize("name", ["llama_asym_act_g64", "llama_act_dense_gate"])
def test_act_order_mlp_channels_in_group_order_give_aligned_down_shards(refs, name):
    """With an act-order down_proj, each rank takes its MLP channels in down_proj's group order:
    its down shard is a run of whole groups (no g_idx, no gather of x) and its gate/up columns are
    the checkpoint's columns of the same channels, at tp = 3 where the spans start inside groups."""
    path, *_ = refs[name]
    ref = tiny.reference_model(path)
    llm = tpserve.load(path, tp=3, dtype=torch.float32)
    inter = ref.config.intermediate_size
    for i, ref_layer in enumerate(ref.model.layers):
        channels = [rank.layers[i].mlp.channels for rank in llm.executor.ranks]
        joined = torch.cat(channels)
        assert sorted(joined.tolist()) == list(range(inter))
        assert not torch.equal(joined, torch.arange(inter))  # a real reorder
        gate_ref, up_ref = ref_layer.mlp.gate_proj.weight.T, ref_layer.mlp.up_proj.weight.T
        down_ref = ref_layer.mlp.down_proj.weight.T  # [K, N]
        offsets = []
        for rank, ch in zip(llm.executor.ranks, channels):
            mlp = rank.layers[i].mlp
            down = mlp.down_proj
            assert down.perm is None and down.weight.g_idx is None
            offsets.append(down.weight.group_offset)
            lin = mlp.linears()
            torch.testing.assert_close(lin["mlp.down_proj"][1], down_ref[ch], rtol=0, atol=1e-6)
            torch.testing.assert_close(lin["mlp.gate_proj"][1], gate_ref[:, ch], rtol=0, atol=1e-6)
            torch.testing.assert_close(lin["mlp.up_proj"][1], up_ref[:, ch], rtol=0, atol=1e-6)
        assert any(offsets)  # some rank's run starts inside a group
    llm.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_act_order_norms_write_x_in_the_order_of_the_gemvs_they_feed(tp):
    """q/k/v and gate/up of an act-order checkpoint (GPTQModel's: the parts of each share one
    group order, so they merge) read x without a gather: their norms write it in the GEMV's row
    order (test_peer_fixtures compares this checkpoint's logits with transformers'); o_proj, fed
    by attention, keeps its gather."""
    path = Path(__file__).parent / "fixtures" / "llama_g32_sym_act"
    llm = tpserve.load(path, tp=tp, dtype=torch.float32)
    hidden = llm.executor.ranks[0].layers[0].attn_norm.weight.numel()
    for rank in llm.executor.ranks:
        for layer in rank.layers:
            for norm, merged in ((layer.attn_norm, layer.self_attn.qkv_proj),
                                 (layer.mlp_norm, layer.mlp.gate_up_proj)):
                linear = merged.joined
                assert linear.perm is None and linear.input_order is not None
                assert norm.out_perm is linear.input_order
                assert sorted(norm.out_perm.tolist()) == list(range(hidden))
            assert layer.self_attn.o_proj.perm is not None
    llm.close()


def test_sampling_is_seeded_and_respects_stop_tokens(refs):
    path, *_ = refs["llama_sym_g32"]
    llm = tpserve.load(path, tp=2, dtype=torch.float32)
    a = llm.generate(PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=7,
                     ignore_eos=True)
    b = llm.generate(PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=7,
                     ignore_eos=True)
    assert a == b and len(a) == 12
    greedy = llm.generate(PROMPT, max_tokens=8, ignore_eos=True)
    stopped = llm.generate(PROMPT, max_tokens=8, stop_token_ids=[greedy[2]], ignore_eos=True)
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    llm.close()
