"""The coordinator's part of the model: the main embedding, the final norm and the lm_head.

- Main embedding: the table with `num_embeddings == vocab_size` and `embedding_dim == hidden_size`.
  Other tables of the same vocabulary but another width (Gemma's per-layer embeddings,
  `embed_tokens_per_layer`) are never taken for it, and never made into a head.
- Tied vs untied comes from what the checkpoint holds: a real `lm_head.*` tensor wins over
  `tie_word_embeddings`. A tied table is held once (`tpserve.model.lm_head.Table`), in the head's format.
- The compute dtype is the config's (or the caller's), never a weight's.
- Gemma: the embedding is scaled by sqrt(hidden) (rounded to the compute dtype, as transformers
  does), the final norm is Gemma's, and logits are soft-capped (final_logit_softcapping). Gemma 4's
  per-layer embedding inputs (`tpserve.model.gemma.PerLayerInputs`) are computed here too and `embed`
  returns them as extra columns of the step tensor, [h | ple]; their bytes count in `nbytes`.
"""

from __future__ import annotations

import logging

import torch

from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import ModelConfig, QuantConfig
from tpserve.errors import CheckpointError
from tpserve.model.linear import read_linear_weight
from tpserve.model.lm_head import Table, resolve_mode
from tpserve.model.llama import RMSNorm

log = logging.getLogger(__name__)
NORM, LM_HEAD = "model.norm.weight", "lm_head"
PREFERRED_EMBEDDING = "model.embed_tokens.weight"


def find_main_embedding(ckpt: Checkpoint, cfg: ModelConfig) -> str:
    want = (cfg.vocab_size, cfg.hidden_size)
    tables = {k: ckpt.shape(k) for k in ckpt.keys()
              if "embed" in k and "per_layer" not in k and k.endswith(".weight")}
    main = [k for k, shape in tables.items() if shape == want]
    if not main:
        raise CheckpointError(f"no embedding table of shape {list(want)} (vocab_size x hidden_size) "
                              f"in {ckpt.path}; found {tables or 'none'}")
    return PREFERRED_EMBEDDING if PREFERRED_EMBEDDING in main else sorted(main)[0]


class Head:
    def __init__(self, embed: Table, norm: RMSNorm, lm_head: Table, tied: bool,
                 embed_scale: torch.Tensor | None = None, softcap: float | None = None,
                 per_layer=None):
        self.embed_table, self.norm, self.lm_head, self.tied = embed, norm, lm_head, tied
        self.embed_scale, self.softcap, self.per_layer = embed_scale, softcap, per_layer

    @classmethod
    def load(cls, path, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype,
             device="cpu", mode: str = "auto") -> "Head":
        ckpt = Checkpoint(path, device=device)
        v, h = cfg.vocab_size, cfg.hidden_size
        embed_name = find_main_embedding(ckpt, cfg)
        stored_gptq = f"{LM_HEAD}.qweight" in ckpt
        tied = not (stored_gptq or f"{LM_HEAD}.weight" in ckpt)
        if tied and not cfg.tie_word_embeddings:
            raise CheckpointError(f"{path} has no lm_head.weight and config.json does not set "
                                  f"tie_word_embeddings; the checkpoint is incomplete")
        mode = resolve_mode(mode, stored_gptq, v, h)
        gemma = {}
        if cfg.gemma is None:
            norm = RMSNorm.load(ckpt, NORM, h, cfg.rms_norm_eps, dtype)
        else:
            from tpserve.model.gemma import GemmaRMSNorm, PerLayerInputs
            norm = GemmaRMSNorm.load(ckpt, NORM, h, cfg.rms_norm_eps, dtype, cfg.gemma.norm_offset)
            gemma = dict(embed_scale=torch.tensor(h ** 0.5, dtype=dtype),
                         softcap=cfg.gemma.final_softcap,
                         per_layer=PerLayerInputs.load(ckpt, cfg, quant, dtype)
                         if cfg.gemma.ple_dim else None)
        if tied:
            table = Table.from_dense(ckpt.read(embed_name, shape=(v, h)), mode, dtype)
            head = cls(table, norm, table, tied=True, **gemma)
        else:
            embed = Table("dense", dtype, weight=ckpt.read(embed_name, shape=(v, h)).to(dtype))
            if stored_gptq:
                packed = read_linear_weight(ckpt, LM_HEAD, quant, h, v, (0, h), (0, v), dtype)
                lm = (Table("gptq", dtype, packed=packed) if mode == "gptq"
                      else Table.from_dense(packed.dequantize(torch.float32).T, mode, dtype))
            else:
                lm = Table.from_dense(ckpt.read(f"{LM_HEAD}.weight", shape=(v, h)), mode, dtype)
            head = cls(embed, norm, lm, tied=False, **gemma)
        log.info("coordinator holds embedding + lm_head: %.1f MB (lm_head=%s, %s, embedding %s%s)",
                 head.nbytes / 1e6, mode, "tied: one table" if tied else "untied",
                 embed_name, "" if head.per_layer is None else
                 f", per-layer embeddings {head.per_layer.nbytes / 1e6:.1f} MB")
        return head

    @property
    def nbytes(self) -> int:
        """Bytes of the embedding, the head and the per-layer embeddings (the coordinator's
        vocabulary tables), a shared (tied) table counted once."""
        tables = {id(t): t for t in (self.embed_table, self.lm_head)}
        ple = 0 if self.per_layer is None else self.per_layer.nbytes
        return sum(t.nbytes for t in tables.values()) + ple

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The step tensor for `token_ids` [T]: h [T, hidden], or [h | ple] for Gemma 4 PLE."""
        token_ids = token_ids.to(self.device)
        h = self.embed_table.rows(token_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.per_layer is None:
            return h
        return torch.cat([h, self.per_layer(token_ids, h)], dim=-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] (from any device) -> fp32 logits [T, vocab]."""
        logits = self.lm_head.logits(self.norm(h.to(self.device, self.norm.weight.dtype)))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
