"""Tiny checkpoints for tests, and the independent reference: transformers on dequantized weights.

`make_checkpoint` builds a random transformers model, quantizes its decoder linears round-to-nearest
into real GPTQ tensors (v1 or v2 zeros, act-order permutations, any bits/group size) with tpserve's
packer, and writes a safetensors checkpoint folder. GPTQModel-written fixtures (tests/fixtures)
cover the peers' packing; these cover the shapes and settings the peers cannot write.

`reference_model` never touches tpserve's unpacking: it dequantizes with numpy bit streams.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tpserve.model import gptq

BASE = dict(hidden_size=96, intermediate_size=168, num_hidden_layers=2, num_attention_heads=12,
            num_key_value_heads=4, head_dim=8, vocab_size=128, max_position_embeddings=128,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, dtype="float32")
ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
              "gemma4_text": "Gemma4ForCausalLM"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "per_layer_input_gate", "per_layer_projection")  # the last two: Gemma 4 PLE
OFFSET_NORM_ARCHS = ("gemma2", "gemma3_text")  # RMSNorm weight stored as w, applied as (1 + w)
# Gemma 4 MoE experts as quantizers write them: one linear per expert, named
#   "split":     experts.{e}.gate_proj / up_proj / down_proj  (vLLM, llm-compressor, GPTQModel)
#   "autoround": experts.gate_up_proj.{e} (gate and up fused, [H -> 2I]) / experts.down_proj.{e}
#   "dense":     transformers' own fused 3-D tensors, left unquantized
EXPERT_LAYOUTS = ("split", "autoround", "dense")


def hf_model(config: dict):
    import transformers
    cfg = transformers.AutoConfig.for_model(**config)
    return getattr(transformers, ARCH_CLASS[config["model_type"]])(cfg)


def make_checkpoint(path: Path, arch: str = "llama", bits: int = 4, group_size: int = 32,
                    sym: bool = True, desc_act: bool = False, fmt: str = "gptq",
                    tie: bool = False, seed: int = 0, skip: tuple[str, ...] = (),
                    experts: str = "split", **overrides) -> Path:
    """Write a random GPTQ checkpoint; linears whose name ends with one of `skip` stay dense.

    Gemma 4 MoE routers (`router.proj`) are GPTQ-packed too, as AutoRound writes them; `experts`
    picks the layout of the expert linears (EXPERT_LAYOUTS).
    """
    assert experts in EXPERT_LAYOUTS, experts
    config = {**BASE, "model_type": arch, "tie_word_embeddings": tie, **overrides}
    if arch == "qwen2":
        config.setdefault("use_sliding_window", False)
    torch.manual_seed(seed)
    model = hf_model(config).float()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        t = p.detach().clone()
        if name.endswith("norm.weight"):  # exercise the norms: weights around 1, not exactly 1
            t = (0 if arch in OFFSET_NORM_ARCHS else 1) + 0.2 * torch.randn(t.shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(t.shape, generator=gen)
        elif name.endswith(("embed_tokens.weight", "embed_tokens_per_layer.weight")) or \
                name == "lm_head.weight":
            t = 0.5 * torch.randn(t.shape, generator=gen)
        elif name.endswith(("layer_scalar", "router.scale", "router.per_expert_scale")):
            t = 0.5 + torch.rand(t.shape, generator=gen)  # Gemma 4 scalars: exercise them too
        layer = name.rsplit(".", 2)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and experts != "dense":
            tensors.update(_expert_tensors(name, t, experts, bits, group_size, sym, desc_act, fmt,
                                           gen))
            continue
        quantized = layer[-2] in LINEARS or name.endswith("router.proj.weight")
        if name.endswith(".weight") and quantized and not name.endswith(skip):
            prefix = name[: -len(".weight")]
            tensors.update(_gptq_tensors(prefix, t.T.contiguous(), bits, group_size, sym, desc_act,
                                         fmt, gen))
            continue
        tensors[name] = t.to(torch.float16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config["dtype"] = "float16"
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits,
                                     "group_size": group_size, "desc_act": desc_act, "sym": sym,
                                     "checkpoint_format": fmt, "pack_dtype": "int32",
                                     "lm_head": False}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def _expert_tensors(name, t, layout, bits, group_size, sym, desc_act, fmt, gen):
    """One fused 3-D expert tensor ([E, 2I, H] gate_up or [E, H, I] down) as per-expert GPTQ."""
    prefix, kind = name.rsplit(".", 1)  # ...experts, gate_up_proj | down_proj
    out = {}
    for e, w in enumerate(t):  # w: nn.Linear layout [out, in]
        if layout == "autoround":
            parts = {f"{kind}.{e}": w}
        elif kind == "gate_up_proj":
            parts = {f"{e}.gate_proj": w[: w.shape[0] // 2], f"{e}.up_proj": w[w.shape[0] // 2:]}
        else:
            parts = {f"{e}.down_proj": w}
        for sub, wi in parts.items():
            out.update(_gptq_tensors(f"{prefix}.{sub}", wi.T.contiguous(), bits, group_size, sym,
                                     desc_act, fmt, gen))
    return out


def _gptq_tensors(prefix, w, bits, group_size, sym, desc_act, fmt, gen):
    k = w.shape[0]
    gs = k if group_size == -1 else group_size
    perm = torch.randperm(k, generator=gen) if desc_act else torch.arange(k)
    q_perm, zeros, scales = gptq.quantize(w[perm], bits, group_size, sym)
    q = torch.empty_like(q_perm)
    q[perm] = q_perm
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // gs
    qzeros = gptq.pack_cols(zeros, bits)
    if fmt == "gptq":
        qzeros = gptq.v2_to_v1_zeros(qzeros, bits)
    return {f"{prefix}.qweight": gptq.pack_rows(q, bits), f"{prefix}.qzeros": qzeros,
            f"{prefix}.scales": scales, f"{prefix}.g_idx": g_idx}


# ---- the independent reference --------------------------------------------------------------

def np_unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values packed along dim 0 of int32 words [W, N] as one little-endian bit stream per column."""
    w, n = words.shape
    b = np.unpackbits(words.astype("<u4").view(np.uint8).reshape(w, n, 4), axis=2,
                      bitorder="little")  # (W, N, 32)
    stream = b.transpose(1, 0, 2).reshape(n, w * 32)[:, : count * bits].reshape(n, count, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(-1).T  # (count, N)


def np_dequantize(t: dict, prefix: str, bits: int, v1: bool, k: int, n: int,
                  group_size: int) -> torch.Tensor:
    q = np_unpack(t[f"{prefix}.qweight"].numpy(), bits, k)
    zw = t[f"{prefix}.qzeros"].numpy().astype(np.uint32)
    if v1 and bits != 3:  # word-level +1 per field, the inverse of the writers' word-level -1
        ones = np.zeros(zw.shape[1] * 32, np.uint8)
        ones[:: bits][: (zw.shape[1] * 32) // bits] = 1
        const = np.packbits(ones.reshape(-1, 32), axis=1, bitorder="little").view("<u4")[:, 0]
        zw = zw + const[None, :]
    z = np_unpack(zw.T.copy().view(np.int32), bits, n).T  # (G, N)
    if v1 and bits == 3:  # 3-bit fields straddle words: the v1 shift is per field
        z = (z + 1) % 8
    gs = k if group_size == -1 else group_size
    g = t[f"{prefix}.g_idx"].numpy() if f"{prefix}.g_idx" in t else np.arange(k) // gs
    s = t[f"{prefix}.scales"].float().numpy()
    return torch.from_numpy((q - z[g]) * s[g]).float().T.contiguous()  # nn.Linear layout [N, K]


def reference_model(path: Path):
    """transformers' own model class, fp32, with the checkpoint's weights dequantized."""
    config = json.loads((path / "config.json").read_text())
    qc = config.pop("quantization_config", None)
    for name in ("quantize_config.json", "quantization_config.json"):
        if qc is None and (path / name).exists():
            qc = json.loads((path / name).read_text())
    config["dtype"] = "float32"
    t = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "reference.safetensors":
            t.update(load_file(str(f)))
    model = hf_model(config).float().eval()
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq") if qc else "gptq"

    def dequantize(prefix, k, n):
        bits, gs = qc["bits"], qc["group_size"]
        for pattern, over in (qc.get("dynamic") or {}).items():  # GPTQModel's lm_head override
            if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), prefix):
                bits, gs = over.get("bits", bits), over.get("group_size", gs)
                break
        return np_dequantize(t, prefix, bits, fmt == "gptq", k, n, gs)

    sd = {}
    for name, p in model.state_dict().items():
        prefix = name[: -len(".weight")]
        if f"{prefix}.qweight" in t:
            sd[name] = dequantize(prefix, p.shape[1], p.shape[0])
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")) and name not in t:
            sd[name] = _dequantize_experts(name, p.shape, dequantize, t)
        elif name in t:
            sd[name] = t[name].float()
        elif name == "lm_head.weight":
            sd[name] = t["model.embed_tokens.weight"].float()
    model.load_state_dict(sd)
    return model


def _dequantize_experts(name, shape, dequantize, t) -> torch.Tensor:
    """A fused 3-D expert tensor rebuilt from its per-expert GPTQ linears (either layout)."""
    prefix, kind = name.rsplit(".", 1)
    num, n, k = shape  # nn.Linear layout per expert: [out, in]
    if f"{prefix}.{kind}.0.qweight" in t:  # autoround
        return torch.stack([dequantize(f"{prefix}.{kind}.{e}", k, n) for e in range(num)])
    if kind == "down_proj":
        return torch.stack([dequantize(f"{prefix}.{e}.down_proj", k, n) for e in range(num)])
    return torch.stack([torch.cat([dequantize(f"{prefix}.{e}.gate_proj", k, n // 2),
                                   dequantize(f"{prefix}.{e}.up_proj", k, n // 2)])
                        for e in range(num)])


@torch.inference_mode()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]
