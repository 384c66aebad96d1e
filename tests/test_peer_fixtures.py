"""Checkpoints written by GPTQModel 7.6.0 and auto-round 0.16.1 (tests/fixtures, see make_fixtures.py).

Two references per fixture:
- transformers' own model class in fp32 on the dequantized weights: tpserve must match it to fp32
  summation-order noise at every tp (ATOL below);
- GPTQModel's own logits (it runs fp16 on CPU): agreement to fp16 rounding, which on these logits
  (|logit| up to ~10) means a relative error of ~1e-3.
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
    assert len(NAMES) >= 10, NAMES


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
