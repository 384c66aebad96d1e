"""The embedded demo checkpoint: what `tpserve launch` serves when no --model is given.

A small Llama-shaped model with RANDOM weights (it is not trained: its text is gibberish), written
on first use in real GPTQ format (4-bit, group 128, v1 zeros) with a byte-level tokenizer and a
chat template, and cached under $TPSERVE_CACHE (default ~/.cache/tpserve). Its shapes make every
tp=4 row-parallel shard start inside a quantization group: o_proj splits K=256 at 64/128/192 and
down_proj splits K=720 at 176/360/536 (group 128), and down_proj's last group is partial.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpserve.model import gptq

log = logging.getLogger(__name__)

NAME = "tpserve-demo-llama-gptq4"
VERSION = 1
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
              intermediate_size=720, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, vocab_size=320, max_position_embeddings=1024,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, dtype="float16",
              bos_token_id=256, eos_token_id=257)
QUANT = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True,
             checkpoint_format="gptq", pack_dtype="int32", lm_head=False)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def cache_dir() -> Path:
    return Path(os.environ.get("TPSERVE_CACHE", Path.home() / ".cache" / "tpserve"))


def demo_path() -> Path:
    """The demo checkpoint folder, built on first use."""
    path = cache_dir() / f"{NAME}-v{VERSION}"
    if not (path / "model.safetensors").is_file():
        log.info("building the demo checkpoint at %s (first use, a few seconds)", path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_demo(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            pass
    return path


def _tokenizer() -> tuple[str, dict]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])  # ids 256, 257, 258
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
           "chat_template": CHAT_TEMPLATE, "model_max_length": CONFIG["max_position_embeddings"]}
    return tok.to_str(), cfg


LINEAR_SHAPES = {  # name -> (K, N) from the config
    "self_attn.q_proj": lambda c, h, i, q, kv: (h, q), "self_attn.k_proj": lambda c, h, i, q, kv: (h, kv),
    "self_attn.v_proj": lambda c, h, i, q, kv: (h, kv), "self_attn.o_proj": lambda c, h, i, q, kv: (q, h),
    "mlp.gate_proj": lambda c, h, i, q, kv: (h, i), "mlp.up_proj": lambda c, h, i, q, kv: (h, i),
    "mlp.down_proj": lambda c, h, i, q, kv: (i, h)}


SAME_INPUT = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def _gptq_layer(w: torch.Tensor, quant: dict, perm: torch.Tensor | None) -> dict:
    """Round-to-nearest GPTQ tensors of W [K, N] (v1 zeros; act-order rows in `perm`'s order)."""
    k, bits, gs = w.shape[0], quant["bits"], quant["group_size"]
    perm = torch.arange(k, device=w.device) if perm is None else perm.to(w.device)
    q_perm, zeros, scales = gptq.quantize(w[perm], bits, gs, quant.get("sym", True))
    q = torch.empty_like(q_perm)
    q[perm] = q_perm
    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    g_idx[perm] = torch.arange(k, dtype=torch.int32, device=w.device) // (k if gs == -1 else gs)
    qzeros = gptq.pack_cols(zeros.to(w.device), bits)
    if quant.get("checkpoint_format", "gptq") == "gptq":
        qzeros = gptq.v2_to_v1_zeros(qzeros, bits)
    return {"qweight": gptq.pack_rows(q, bits).cpu(), "qzeros": qzeros.cpu(),
            "scales": scales.cpu(), "g_idx": g_idx.cpu()}


def write_random_checkpoint(path: Path, config: dict, quant: dict, seed: int = 0, device="cpu",
                            layers_per_file: int = 8, tokenizer: bool = True) -> Path:
    """A Llama/Mistral/Qwen-shaped GPTQ checkpoint with random weights (demo, benchmarks).

    Quantization runs on `device` (a GPU makes 8B shapes take seconds); files hold
    `layers_per_file` layers each, with a model.safetensors.index.json when there are several.
    """
    c = config
    gen = torch.Generator().manual_seed(seed)
    h, inter = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q_out, kv_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    bias = c["model_type"] == "qwen2"
    path.mkdir(parents=True, exist_ok=True)
    files, weight_map = [], {}

    def flush(t: dict):
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(t, str(path / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in t})

    t = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=gen).half(),
         "model.norm.weight": torch.ones(h).half()}
    if not c.get("tie_word_embeddings"):
        t["lm_head.weight"] = (torch.randn(c["vocab_size"], h, generator=gen) / h**0.5).half()
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(h).half()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(h).half()
        orders = {}  # act-order: one row order per input, as GPTQ's (q/k/v share one, gate/up one)
        for name, shape in LINEAR_SHAPES.items():
            k, n = shape(c, h, inter, q_out, kv_out)
            w = torch.randn(k, n, generator=gen).to(device) / k**0.5  # [K, N], variance-preserving
            source = next((s for s, names in SAME_INPUT.items() if name in names), name)
            if quant.get("desc_act") and source not in orders:
                orders[source] = torch.randperm(k, generator=gen)
            for key, v in _gptq_layer(w, quant, orders.get(source)).items():
                t[f"{p}.{name}.{key}"] = v
            if bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                t[f"{p}.{name}.bias"] = (0.02 * torch.randn(n, generator=gen)).half()
        if (i + 1) % layers_per_file == 0:
            flush(t)
            t = {}
    if t:
        flush(t)
    if len(files) == 1:
        (path / files[0]).rename(path / "model.safetensors")
    else:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({**c, "quantization_config": quant}, indent=1))
    if tokenizer:
        tok, tok_cfg = _tokenizer()
        (path / "tokenizer.json").write_text(tok)
        (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return path


def write_demo(path: Path, seed: int = 0) -> Path:
    write_random_checkpoint(path, CONFIG, QUANT, seed)
    (path / "README.md").write_text(
        f"# {NAME}\n\nRandom weights in GPTQ format, built by tpserve as its embedded demo. "
        "Not trained: it produces gibberish. Serve a real GPTQ checkpoint with --model.\n")
    return path
