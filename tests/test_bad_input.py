"""Bad paths, configs and checkpoints: one clear error each, naming the thing and the fix."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tpserve
from tpserve.errors import CheckpointError, ConfigError, TpserveError


@pytest.fixture
def ckpt(ckpt_dir, tmp_path):
    """A fresh, writable copy of a good checkpoint."""
    dst = tmp_path / "m"
    shutil.copytree(ckpt_dir("bad_input_base"), dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if k.startswith("q_"):
            cfg["quantization_config"][k[2:]] = v
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        tpserve.load(tmp_path / "nope")


def test_broken_config_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        tpserve.load(ckpt)


@pytest.mark.parametrize("changes,match", [
    (dict(q_bits=5), r"bits=5 is not supported"),
    (dict(q_quant_method="awq"), r"quant_method='awq' is not supported"),
    (dict(q_checkpoint_format="marlin"), r"checkpoint_format='marlin' is not supported"),
    (dict(q_pack_dtype="int16"), r"pack_dtype='int16' is not supported"),
    (dict(q_dynamic={"+:.*down": {"iters": 3}}), r"dynamic override .* sets \['iters'\]"),
    (dict(model_type="gpt2"), r"model_type='gpt2' is not supported"),
    (dict(num_attention_heads=7), r"num_attention_heads=7 is not a multiple of num_key_value_heads=4"),
])
def test_unsupported_config_values_are_named(ckpt, changes, match):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=match):
        tpserve.load(ckpt)


def test_missing_config_key(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["intermediate_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'intermediate_size' is missing"):
        tpserve.load(ckpt)


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith(
        "model.layers.1.mlp.up_proj.")])
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.qweight"):
        tpserve.load(ckpt, tp=2)


def test_wrong_shape(ckpt):
    def cut(t):
        t["model.layers.0.self_attn.o_proj.scales"] = t["model.layers.0.self_attn.o_proj.scales"][:, :5].clone()
    edit_tensors(ckpt, cut)
    with pytest.raises(CheckpointError, match=r"o_proj.scales' has shape \[3, 5\]"):
        tpserve.load(ckpt)


def test_nan_scales(ckpt):
    def poison(t):
        t["model.layers.0.mlp.down_proj.scales"][0, 0] = float("nan")
    edit_tensors(ckpt, poison)
    with pytest.raises(CheckpointError, match=r"down_proj.scales' holds NaN or inf"):
        tpserve.load(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        tpserve.load(ckpt)


def test_index_pointing_at_missing_shard(ckpt):
    names = load_file(str(ckpt / "model.safetensors")).keys()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors', which does not exist"):
        tpserve.load(ckpt)


def test_bad_requests_to_the_python_api(ckpt):
    llm = tpserve.load(ckpt, dtype=torch.float32)
    with pytest.raises(TpserveError, match="outside the vocabulary"):
        llm.logits([1, 500])
    with pytest.raises(TpserveError, match="max_tokens=0"):
        llm.generate([1, 2], max_tokens=0)
    with pytest.raises(TpserveError, match="top_p=1.5"):
        llm.generate([1, 2], top_p=1.5)
    with pytest.raises(TpserveError, match="exceeds the context"):
        llm.generate([1] * 100, max_tokens=100)
    with pytest.raises(TpserveError, match="backend='mpi'"):
        tpserve.load(ckpt, backend="mpi")
    # prompt_logprobs computes every prompt row's logits at once: a bounded amount per request
    from tpserve.serve import request_checks as checks
    vocab = llm.cfg.vocab_size
    limit, checks.PROMPT_LOGITS_BYTES = checks.PROMPT_LOGITS_BYTES, 10 * vocab * 4
    try:
        with pytest.raises(TpserveError, match="prompt_logprobs over a prompt of 11 tokens"):
            llm.generate(list(range(1, 12)), max_tokens=2, prompt_logprobs=1)
        assert len(llm.generate(list(range(1, 11)), max_tokens=2, prompt_logprobs=1)) == 2
    finally:
        checks.PROMPT_LOGITS_BYTES = limit
    # the model still works after the rejected requests
    assert len(llm.generate([1, 2, 3], max_tokens=4, ignore_eos=True)) == 4


def test_dense_checkpoint_is_served_as_documented_and_logged(tmp_path, caplog):
    """No quantization_config: tpserve serves the dense weights (README: "Dense checkpoints") and
    says so at load; its logits are transformers' own."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        llm = tpserve.load(tmp_path, tp=2, dtype=torch.float32)
    assert "no GPTQ quantization_config: serving its dense (unquantized) weights" in caplog.text
    ids = [1, 5, 9, 33, 2]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - want).abs().max() < 1e-4  # fp32, two ranks: summation order only
