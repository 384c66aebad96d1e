"""Checkpoints written by GPTQModel 7.6.0 and auto-round 0.16.1 (tests/fixtures, see make_fixtures.py).

Two references per fixture:
- transformers' own model class in fp32 on the dequantized weights: tpserve must match it to fp32
  summation-order noise at every tp (ATOL below);
- GPTQModel's own logits (it runs fp16 on CPU): agreement to fp16 rounding, which on these logits
  (|logit| up to ~10) means a relative error of ~1e-3.

The Gemma 2 and Gemma 3 fixtures have a sliding window of 4 under the 12-token prompt, soft-caps
(Gemma 2) and two rope thetas (Gemma 3), each moving these logits by 0.2-2, and the gemma3_text
config.json as GPTQModel saves it (a flat rope_type/rope_theta beside the per-layer-type ones).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
import tpserve

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
ATOL = 2e-4  # fp32 vs fp32, only the order of sums differs (partials across ranks, attention)
GPTQMODEL_REL = 5e-3  # fp16 inference in GPTQModel vs fp32 here


def tp_sizes(name):
    heads = json.loads((FIXTURES / name / "config.json").read_text())["num_attention_heads"]
    return [t for t in (1, 2, 3, 4) if heads % t == 0]


def test_the_fixture_set_is_complete():
    assert len(NAMES) >= 12, NAMES
    assert {"gemma2_g32_sym", "gemma3_g32_asym_act"} <= set(NAMES), NAMES


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(name):
        if name not in cache:
            path = FIXTURES / name
            r = load_file(str(path / "reference.safetensors"))
            ids = r["input_ids"].tolist()
            model = tiny.reference_model(path)
            cache[name] = (ids, tiny.reference_logits(model, ids), r["gptqmodel_logits"],
                           tiny.reference_greedy(model, ids, 16))
        return cache[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_transformers_and_gptqmodel_at_every_tp(refs, name):
    ids, ref, peer, greedy = refs(name)
    rel = (ref - peer).abs().max() / peer.abs().max()
    assert rel < GPTQMODEL_REL, f"the dequantizing reference disagrees with GPTQModel: {rel:.2e}"
    for tp in tp_sizes(name):
        llm = tpserve.load(FIXTURES / name, tp=tp, dtype=torch.float32)
        logits = llm.logits(ids)
        err = (logits - ref).abs().max().item()
        assert err < ATOL, f"{name} tp={tp}: max |diff| vs transformers {err:.2e}"
        rel = ((logits - peer).abs().max() / peer.abs().max()).item()
        assert rel < GPTQMODEL_REL, f"{name} tp={tp}: relative diff vs GPTQModel {rel:.2e}"
        assert llm.generate(ids, max_tokens=16, ignore_eos=True) == greedy, f"{name} tp={tp}"
        llm.close()
