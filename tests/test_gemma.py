"""Gemma 2, 3 and 4 text models at tp 1, 2, 4 equal transformers' own classes on dequantized
weights.

Fixtures: random weights, quantized round-to-nearest into real GPTQ tensors (4-bit, group 32, v1
zeros) by tests/tiny.py's packer; they reach what the peers cannot write (Gemma 4, MoE, PLE). The
Gemma 2 and 3 checkpoints GPTQModel writes are checked in tests/test_peer_fixtures.py; the expert
and router layouts here follow what the quantizers write (tiny.EXPERT_LAYOUTS).

Tolerance: as tests/test_equivalence.py. Both sides run fp32 on bit-identical dequantized weights,
so the only differences are summation order (tp partial sums, attention kernels, MoE index_add):
~1e-6 relative; we allow 1e-4 absolute on logits of magnitude ~1-50.

Every config has sliding_window=4 and the prompt is 11 tokens + 12 generated, so sliding layers
really drop keys. initializer_range=0.1 (not 0.02) makes attention scores large enough that
soft-capping and the score scale change the result (0.02 leaves tanh(s/cap)*cap == s).
"""

import pytest
import torch

import tiny
import tpserve
from tpserve.model.config import ModelConfig
from tpserve.errors import ConfigError
from tpserve.model.head import find_main_embedding

ATOL = 1e-4
PROMPT = [1, 5, 9, 33, 70, 2, 100, 7, 64, 3, 11]
STEPS = 12
S, F = "sliding_attention", "full_attention"
COMMON = dict(sliding_window=4, tie=True, initializer_range=0.1)

CASES = {
    # attention and final logit soft-capping, query_pre_attn_scalar, default layer_types (s, f)
    "gemma2": dict(arch="gemma2", attn_logit_softcapping=1.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=32, **COMMON),
    # q/k norms, per-layer-type rope (linear-scaled full layers, local theta for sliding ones)
    "gemma3_text": dict(arch="gemma3_text", num_hidden_layers=3, layer_types=[S, S, F],
                        query_pre_attn_scalar=32, rope_parameters={
                            S: {"rope_type": "default", "rope_theta": 10_000.0},
                            F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
                        **COMMON),
    # dense Gemma 4: global head_dim 16 and 2 kv heads on full layers (kv replicated at tp=4),
    # v = k projection there, proportional rope, v norm, layer_scalar, no PLE
    "gemma4_dense": dict(arch="gemma4_text", num_hidden_layers=3, layer_types=[S, S, F],
                         global_head_dim=16, num_global_key_value_heads=2, attention_k_eq_v=True,
                         hidden_size_per_layer_input=0, final_logit_softcapping=30.0, **COMMON),
    # PLE (4 layers x 24 = hidden 96: the per-layer table has the main embedding's shape) and KV
    # sharing: layers 2 (sliding) and 3 (full) reuse layers 0 and 1, with a double-wide MLP
    "gemma4_ple_kvshare": dict(arch="gemma4_text", num_hidden_layers=4, layer_types=[S, F, S, F],
                               global_head_dim=16, hidden_size_per_layer_input=24,
                               vocab_size_per_layer_input=128, num_kv_shared_layers=2,
                               use_double_wide_mlp=True, final_logit_softcapping=30.0, **COMMON),
    # MoE beside the dense MLP, 4 experts top-2, moe_intermediate 48 (tp=2 down rows split at 24:
    # inside group 0 of 32), GPTQ-packed router dequantized at load
    "gemma4_moe": dict(arch="gemma4_text", num_hidden_layers=2, layer_types=[S, F],
                       global_head_dim=16, num_global_key_value_heads=2, attention_k_eq_v=True,
                       hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4,
                       top_k_experts=2, moe_intermediate_size=48, **COMMON),
}


def _reference(path):
    model = tiny.reference_model(path)
    return path, tiny.reference_logits(model, PROMPT), tiny.reference_greedy(model, PROMPT, STEPS)


@pytest.fixture(scope="module")
def refs(ckpt_dir):
    return {name: _reference(ckpt_dir(f"g_{name}", **kw)) for name, kw in CASES.items()}


def _check(llm, ref_logits, ref_tokens, what):
    logits = llm.logits(PROMPT)
    assert logits.shape == (len(PROMPT), 128) and logits.dtype == torch.float32
    err = (logits - ref_logits).abs().max().item()
    assert err < ATOL, f"{what}: max |logit diff| {err:.2e} >= {ATOL}"
    assert llm.generate(PROMPT, max_tokens=STEPS, ignore_eos=True) == ref_tokens, what


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_match_transformers(refs, name, tp):
    path, ref_logits, ref_tokens = refs[name]
    llm = tpserve.load(path, tp=tp, dtype=torch.float32)
    _check(llm, ref_logits, ref_tokens, f"{name} tp={tp}")
    llm.close()


@pytest.mark.parametrize("layout", ["autoround", "dense"])
def test_other_expert_layouts(ckpt_dir, layout):
    # "split" runs above; AutoRound's fused-per-expert gate_up and transformers' own dense 3-D
    # tensors load into the same shards.
    path, ref_logits, ref_tokens = _reference(
        ckpt_dir(f"g_moe_{layout}", experts=layout, **CASES["gemma4_moe"]))
    llm = tpserve.load(path, tp=2, dtype=torch.float32)
    _check(llm, ref_logits, ref_tokens, f"experts={layout} tp=2")
    llm.close()


def test_shards_straddle_groups_and_shared_layers_own_no_cache(refs):
    llm = tpserve.load(refs["gemma4_moe"][0], tp=2, dtype=torch.float32)
    expert = llm.executor.ranks[1].layers[0].moe.experts.experts[0]
    assert expert.down.group_offset == 24  # rank 1 holds rows 24..48 of a group-32 down_proj
    assert isinstance(llm.executor.ranks[0].layers[0].moe.router.proj, torch.Tensor)  # dequantized
    # the experts' routing is read on the host: a GPU rank must not capture these steps
    assert "routed experts" in llm.executor.ranks[0].not_capturable
    llm.close()
    llm = tpserve.load(refs["gemma4_ple_kvshare"][0], tp=4, dtype=torch.float32)
    cache = llm.executor.ranks[0].cache
    assert llm.executor.ranks[0].not_capturable is None
    assert {t: len(c.k) for t, c in cache.groups.items()} == {S: 1, F: 1}  # layers 0 and 1 only
    assert cache.groups[F].k[0].shape[-1] == 16 and cache.groups[S].k[0].shape[-1] == 8
    assert cache.where[2][0] is cache.groups[S] and cache.where[3][0] is cache.groups[F]
    llm.close()


def test_tied_head_quantized_ple_untouched(refs):
    path = refs["gemma4_ple_kvshare"][0]
    dense = tpserve.load(path, tp=2, dtype=torch.float32, lm_head="dense")
    want_logits = dense.logits(PROMPT)
    want = dense.generate(PROMPT, max_tokens=STEPS, ignore_eos=True)
    ple_table = dense.head.per_layer.table
    from tpserve.model.checkpoint import Checkpoint
    # the per-layer table [128, 4 x 24] has the main embedding's shape; it is never taken for it
    assert find_main_embedding(Checkpoint(path), dense.cfg) == "model.embed_tokens.weight"
    for mode in ("int8", "q8_0"):
        llm = tpserve.load(path, tp=2, dtype=torch.float32, lm_head=mode)
        head = llm.head
        assert head.embed_table is head.lm_head and head.lm_head.mode == mode  # one table
        assert torch.equal(head.per_layer.table, ple_table)  # PLE as stored, not quantized
        # PLE bytes are reported on top of the table's (whether or not the final norm counts)
        without_ple = head.nbytes - head.per_layer.nbytes
        assert head.lm_head.nbytes <= without_ple <= head.lm_head.nbytes + head.norm.weight.nbytes
        assert head.per_layer.nbytes >= head.per_layer.table.nbytes > 0
        rel = ((llm.logits(PROMPT) - want_logits).abs().max() / want_logits.abs().max()).item()
        assert rel < 0.02, (mode, rel)  # 8-bit rows: ~1/254 of each row's (block's) max
        assert llm.generate(PROMPT, max_tokens=STEPS, ignore_eos=True) == want, mode
        llm.close()
    dense.close()


def _hf_dict(raw: dict) -> dict:
    """The config as transformers standardises and re-saves it (its defaults filled in)."""
    import transformers
    return transformers.AutoConfig.for_model(**raw).to_dict()


SHAPE = dict(hidden_size=96, intermediate_size=64, num_hidden_layers=6, num_attention_heads=12,
             num_key_value_heads=4, head_dim=8, vocab_size=128)


@pytest.mark.parametrize("raw", [
    dict(model_type="gemma2", **SHAPE),  # no layer_types, no soft-capping keys: class defaults
    dict(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
         rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=3, **SHAPE),
    dict(model_type="gemma4_text", global_head_dim=16, num_global_key_value_heads=2,
         attention_k_eq_v=True, num_kv_shared_layers=2, layer_types=[S, F] * 3,
         **SHAPE),  # legacy head keys
    dict(model_type="gemma4_text", global_head_dim=16, num_global_key_value_heads=2, **SHAPE),
])
def test_config_reads_like_transformers(raw):
    # config.json as older transformers / Google wrote it vs as transformers 5.23 re-saves it
    # (nested rope_parameters, explicit layer_types, per_layer_config): the same model.
    a, b = ModelConfig.from_dict(raw), ModelConfig.from_dict(_hf_dict(raw))
    for key in ("layer_types", "sliding_window", "head_dim", "num_kv_heads", "rope", "gemma",
                "max_position", "tie_word_embeddings"):
        assert getattr(a, key) == getattr(b, key), key


@pytest.mark.parametrize("raw,key", [
    (dict(model_type="gemma3_text", use_bidirectional_attention=True, **SHAPE),
     "use_bidirectional_attention"),
    (dict(model_type="gemma2", hidden_activation="silu", **SHAPE), "hidden_activation"),
    (dict(model_type="gemma4_text", num_kv_shared_layers=6, **SHAPE), "num_kv_shared_layers"),
    (dict(model_type="gemma4_text", vocab_size_per_layer_input=64, **SHAPE),
     "vocab_size_per_layer_input"),
    (dict(model_type="llama", rope_parameters={"rope_type": "proportional"}, **SHAPE),
     "proportional"),
])
def test_unsupported_config_is_refused_by_name(raw, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(raw)


def test_ple_travels_with_h_over_ray(refs, ray_cluster):
    # The coordinator ships [h | ple] as the one step tensor, so the Ray + ZMQ path needs no wire
    # change. (Not bit-exact with the in-process ranks here: rank processes run cpu_count // tp
    # intra-op threads, and fp32 GEMM blocking follows the thread count: ~1e-6.)
    path, ref_logits, ref_tokens = refs["gemma4_ple_kvshare"]
    llm = tpserve.load(path, tp=2, backend="ray", dtype=torch.float32)
    _check(llm, ref_logits, ref_tokens, "ray tp=2")
    assert llm.executor.stats.dropped_messages == 0
    llm.close()


# rope_parameters of a gemma3_text config.json as GPTQModel 7.6.0 saves it (transformers 5.23): the
# per-layer-type settings, plus a flat rope_type and a {global, local} rope_theta beside them that
# transformers ignores. The full layers here use linear scaling, so ignoring the flat keys shows.
GPTQMODEL_GEMMA3_ROPE = {
    "full_attention": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0},
    "rope_theta": {"global": 1000000.0, "local": 10000.0},
    "rope_type": "default",
    "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
}


def test_gemma3_rope_as_gptqmodel_saves_it_turns_like_transformers():
    import transformers
    from tpserve.model.rope import inv_frequencies

    raw = dict(model_type="gemma3_text", layer_types=[S, F] * 3,
               rope_parameters=GPTQMODEL_GEMMA3_ROPE, **SHAPE)
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.rope.kind, cfg.rope.theta, cfg.rope.factor) == ("linear", 1e6, 8.0)
    assert (cfg.gemma.rope_sliding.kind, cfg.gemma.rope_sliding.theta) == ("default", 1e4)
    hf = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(
        transformers.AutoConfig.for_model(**raw))
    for kind, rope in ((F, cfg.rope), (S, cfg.gemma.rope_sliding)):
        assert torch.equal(inv_frequencies(rope, cfg.head_dim), getattr(hf, f"{kind}_inv_freq")), kind


def test_generic_rope_keys_stay_strict_outside_gemma():
    # The {global, local} theta is Gemma's; on a Llama it is a wrong value, named as such.
    raw = dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": {
        "global": 1e6, "local": 1e4}}, **SHAPE)
    with pytest.raises(ConfigError, match="wrong type"):
        ModelConfig.from_dict(raw)
