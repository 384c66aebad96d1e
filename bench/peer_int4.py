"""The decode peer: a gpt-fast-style int4 decoder in plain torch, on a checkpoint's shapes.

tinygemm int4 weights (`torch._weight_int4pack_mm`, group 128, random values: speed does not
depend on them), merged wqkv and w13, a static KV cache [B, kv_heads, max_len, head_dim], one
decode step compiled with `torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs),
bf16 activations and a bf16 lm_head. Prefill runs eagerly. Used by `bench/decode.py --peer
torch-int4`; run alone it prints tok/s for one config.json:

    python bench/peer_int4.py /path/to/checkpoint [--batch 1 8] [--gen 128]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GROUP = 128


class Int4Linear(torch.nn.Module):
    """A random tinygemm int4 weight for y = x @ W, W [k, n] (buffers: static addresses, so the
    compiled step's CUDA graphs need no copies)."""

    def __init__(self, k: int, n: int, dev):
        super().__init__()
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(
            (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8), 8))
        self.register_buffer("sz", (torch.rand(k // GROUP, n, 2, device=dev) * 0.01).to(torch.bfloat16))

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, GROUP, self.sz)


def rms(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, cos, sin):  # x (B, T, heads, hd)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Block(torch.nn.Module):
    def __init__(self, h, nh, kv, hd, inter, batch, max_len, dev):
        super().__init__()
        bf = torch.bfloat16
        self.h, self.nh, self.kv, self.hd, self.inter = h, nh, kv, hd, inter
        self.wqkv, self.wo = Int4Linear(h, (nh + 2 * kv) * hd, dev), Int4Linear(nh * hd, h, dev)
        self.w13, self.w2 = Int4Linear(h, 2 * inter, dev), Int4Linear(inter, h, dev)
        self.register_buffer("n1", torch.ones(h, dtype=bf, device=dev))
        self.register_buffer("n2", torch.ones(h, dtype=bf, device=dev))
        self.register_buffer("k_cache", torch.zeros(batch, kv, max_len, hd, dtype=bf, device=dev))
        self.register_buffer("v_cache", torch.zeros(batch, kv, max_len, hd, dtype=bf, device=dev))

    def forward(self, x, cos, sin, mask, pos):
        b, t, _ = x.shape
        y = self.wqkv(rms(x, self.n1).view(b * t, self.h)).view(b, t, -1, self.hd)
        q, k, v = y.split([self.nh, self.kv, self.kv], dim=2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k.transpose(1, 2))
        self.v_cache.index_copy_(2, pos, v.transpose(1, 2))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache, self.v_cache,
                                           attn_mask=mask, enable_gqa=True)
        x = x + self.wo(o.transpose(1, 2).reshape(b * t, -1)).view(b, t, self.h)
        g, u = self.w13(rms(x, self.n2).view(b * t, self.h)).split(self.inter, dim=-1)
        return x + self.w2(F.silu(g) * u).view(b, t, self.h)


class Int4Decoder(torch.nn.Module):
    def __init__(self, cfg: dict, batch: int, max_len: int, dev="cuda"):
        super().__init__()
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads", nh)
        hd = cfg.get("head_dim") or h // nh
        vocab, bf = cfg["vocab_size"], torch.bfloat16
        self.register_buffer("embed", torch.randn(vocab, h, dtype=bf, device=dev) * 0.02)
        self.register_buffer("head", torch.randn(vocab, h, dtype=bf, device=dev) * 0.02)
        self.register_buffer("norm", torch.ones(h, dtype=bf, device=dev))
        self.layers = torch.nn.ModuleList(Block(h, nh, kv, hd, cfg["intermediate_size"], batch,
                                                max_len, dev)
                                          for _ in range(cfg["num_hidden_layers"]))
        inv = 1.0 / (cfg.get("rope_theta", 500000.0) ** (torch.arange(0, hd, 2, device=dev).float() / hd))
        ang = torch.arange(max_len, device=dev).float()[:, None] * inv[None]
        self.register_buffer("cos", torch.cat([ang, ang], -1).cos().to(bf))
        self.register_buffer("sin", torch.cat([ang, ang], -1).sin().to(bf))
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool,
                                                             device=dev)))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids (B, T), pos (T,) -> the next greedy token of each sequence (B, 1)."""
        x = self.embed[ids]
        cos, sin = self.cos[pos][None, :, None], self.sin[pos][None, :, None]
        mask = self.causal[pos][None, None]  # (1, 1, T, max_len)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, pos)
        logits = F.linear(rms(x[:, -1], self.norm), self.head)
        return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def bench(cfg: dict, batches: list[int], prompt_len: int, gen: int, dev="cuda") -> list[dict]:
    rows = []
    for b in batches:
        torch.manual_seed(0)
        with torch.device(dev):
            m = Int4Decoder(cfg, b, prompt_len + gen + 8, dev)
        step = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        positions = torch.arange(prompt_len, prompt_len + gen, device=dev)
        ids = torch.randint(3, cfg["vocab_size"], (b, prompt_len), device=dev)

        def generate(n):
            tok = m(ids, torch.arange(prompt_len, device=dev))
            for i in range(n - 1):
                tok = step(tok, positions[i:i + 1]).clone()
            return tok

        t0 = time.perf_counter()
        generate(8)  # compile + capture
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        timings = {}
        for n in (1, gen):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate(n)
            torch.cuda.synchronize()
            timings[n] = time.perf_counter() - t0
        rows.append({"tp": 1, "backend": "torch-int4-peer", "device": dev, "batch": b,
                     "ttft_ms": 1e3 * timings[1], "compile_s": compile_s,
                     "decode_tok_s": b * (gen - 1) / (timings[gen] - timings[1])})
        del m, step
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    a = ap.parse_args()
    for r in bench(json.loads((Path(a.model) / "config.json").read_text()), a.batch, a.prompt_len, a.gen):
        print(r)
    sys.exit(0)
