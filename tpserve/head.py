"""The coordinator's part of the model: the main embedding, the final norm and the lm_head.

The main embedding is `model.embed_tokens.weight` [vocab_size, hidden_size]. Tied vs untied is
decided by what the checkpoint holds: a real `lm_head.*` tensor wins over `tie_word_embeddings`.
"""

from __future__ import annotations

import torch

from tpserve.checkpoint import Checkpoint
from tpserve.config import ModelConfig, QuantConfig
from tpserve.errors import CheckpointError
from tpserve.linear import read_linear_weight
from tpserve.model import RMSNorm

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head"


class Head:
    def __init__(self, embed: torch.Tensor, norm: RMSNorm, lm_head: torch.Tensor, tied: bool):
        self.embed_table, self.norm, self.lm_head, self.tied = embed, norm, lm_head, tied

    @classmethod
    def load(cls, path, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype,
             device="cpu") -> "Head":
        ckpt = Checkpoint(path, device=device)
        v, h = cfg.vocab_size, cfg.hidden_size
        embed = ckpt.read(EMBED, shape=(v, h)).to(dtype)
        norm = RMSNorm.load(ckpt, NORM, h, cfg.rms_norm_eps, dtype)
        if f"{LM_HEAD}.qweight" in ckpt:
            head = read_linear_weight(ckpt, LM_HEAD, quant, h, v, (0, h), (0, v), dtype)
            head, tied = head.dequantize(dtype).T.contiguous(), False
        elif f"{LM_HEAD}.weight" in ckpt:
            head, tied = ckpt.read(f"{LM_HEAD}.weight", shape=(v, h)).to(dtype), False
        elif cfg.tie_word_embeddings:
            head, tied = embed, True
        else:
            raise CheckpointError(f"{path} has no lm_head.weight and config.json does not set "
                                  f"tie_word_embeddings; the checkpoint is incomplete")
        return cls(embed, norm, head, tied)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_table[token_ids]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] -> fp32 logits [T, vocab]."""
        return (self.norm(h) @ self.lm_head.T).float()
