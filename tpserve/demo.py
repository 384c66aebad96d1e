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

from tpserve import gptq

log = logging.getLogger("tpserve.demo")

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


def write_demo(path: Path, seed: int = 0) -> Path:
    c = CONFIG
    gen = torch.Generator().manual_seed(seed)
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (h, q_out), "self_attn.k_proj": (h, kv_out),
              "self_attn.v_proj": (h, kv_out), "self_attn.o_proj": (q_out, h),
              "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}
    t = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=gen).half(),
         "lm_head.weight": (torch.randn(c["vocab_size"], h, generator=gen) / h**0.5).half(),
         "model.norm.weight": torch.ones(h).half()}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(h).half()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(h).half()
        for name, (k, n) in shapes.items():
            w = torch.randn(k, n, generator=gen) / k**0.5  # [K, N], variance-preserving
            q, zeros, scales = gptq.quantize(w, QUANT["bits"], QUANT["group_size"], sym=True)
            t[f"{p}.{name}.qweight"] = gptq.pack_rows(q, QUANT["bits"])
            t[f"{p}.{name}.qzeros"] = gptq.v2_to_v1_zeros(gptq.pack_cols(zeros, QUANT["bits"]),
                                                          QUANT["bits"])
            t[f"{p}.{name}.scales"] = scales
            t[f"{p}.{name}.g_idx"] = (torch.arange(k) // QUANT["group_size"]).int()
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**c, "quantization_config": QUANT}, indent=1))
    tok, tok_cfg = _tokenizer()
    (path / "tokenizer.json").write_text(tok)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    (path / "README.md").write_text(
        f"# {NAME}\n\nRandom weights in GPTQ format, built by tpserve as its embedded demo. "
        "Not trained: it produces gibberish. Serve a real GPTQ checkpoint with --model.\n")
    return path
