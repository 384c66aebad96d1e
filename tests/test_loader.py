"""Each rank reads only its slices; sharded (indexed) checkpoints load the same model."""

import json

import torch
from safetensors.torch import load_file, save_file

import tpserve
from tpserve.model.checkpoint import Checkpoint
from tpserve.runtime.comm import LocalGroup
from tpserve.model.config import load_configs
from tpserve.model.decoder import build_rank_model
from tpserve.model.shard_plan import ShardPlan


def layer_bytes(path):
    t = load_file(str(path / "model.safetensors"))
    return sum(v.numel() * v.element_size() for k, v in t.items() if k.startswith("model.layers."))


def test_one_rank_of_tp4_reads_about_a_quarter_of_the_layer_bytes(ckpt_dir):
    path = ckpt_dir("loader_big", hidden_size=192, intermediate_size=512, group_size=64)
    cfg, quant = load_configs(path)
    plan, group = ShardPlan.build(cfg, 4), LocalGroup(4)
    total = layer_bytes(path)
    for r in range(4):
        read = build_rank_model(path, cfg, quant, plan, group.comm(r), torch.float32).ckpt.bytes_read
        # 1/4 of the split tensors, plus replicated norms and straddling groups' scales/zeros
        assert 0.22 * total < read < 0.30 * total, (r, read / total)


def test_indexed_multi_file_checkpoint_gives_the_same_logits(ckpt_dir, tmp_path):
    src = ckpt_dir("loader_index")
    t = load_file(str(src / "model.safetensors"))
    names = sorted(t)
    parts = {"model-00001-of-00002.safetensors": names[::2],
             "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: t[k] for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    ids = [1, 4, 9, 16]
    a = tpserve.load(src, tp=2, dtype=torch.float32).logits(ids)
    b = tpserve.load(tmp_path, tp=2, dtype=torch.float32).logits(ids)
    assert torch.equal(a, b)
    assert len(Checkpoint(tmp_path).keys()) == len(names)
