"""transformers' own model class on a checkpoint's weights dequantized by tpserve's reader.

Used by `tpserve verify --reference transformers` and as the bf16 peer in bench/decode.py; it needs
the transformers package, which tpserve does not depend on at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tpserve.errors import TpserveError


def load_hf_model(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """An `AutoModelForCausalLM` built from config.json, holding the dequantized weights."""
    try:
        import transformers
    except ImportError:
        raise TpserveError("the transformers reference needs the transformers package; pip "
                           "install transformers, or use --reference tp1") from None
    from tpserve.model.checkpoint import Checkpoint
    from tpserve.model.config import load_configs
    from tpserve.model.linear import read_linear_weight

    path = Path(path)
    _, quant = load_configs(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).replace("torch.", "")
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**config), dtype=dtype).eval()
    ckpt, sd = Checkpoint(path, device=device), {}
    for name, p in model.state_dict().items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.qweight" in ckpt:
            n, k = p.shape  # nn.Linear layout [out, in]
            w = read_linear_weight(ckpt, prefix, quant, k, n, (0, k), (0, n), dtype)
            sd[name] = w.dequantize(dtype).T
        elif name == "lm_head.weight" and name not in ckpt:  # tied
            sd[name] = ckpt.read("model.embed_tokens.weight", shape=tuple(p.shape)).to(dtype)
        else:
            sd[name] = ckpt.read(name, shape=tuple(p.shape)).to(dtype)
    model.load_state_dict(sd)
    return model


class TransformersReference:
    """The float32 reference `tpserve verify` compares against."""

    def __init__(self, path):
        self.model = load_hf_model(path, torch.float32)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()

    def generate(self, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> list[int]:
        out = list(ids)
        for _ in range(max_tokens):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(ids):]

    def close(self) -> None:
        pass
