"""The coordinator's part of the model: the main embedding, the final norm and the lm_head.

- Main embedding: the table with `num_embeddings == vocab_size` and `embedding_dim == hidden_size`.
  Other tables of the same vocabulary but another width (Gemma's per-layer embeddings,
  `embed_tokens_per_layer`) are never taken for it, and never made into a head.
- Tied vs untied comes from what the checkpoint holds: a real `lm_head.*` tensor wins over
  `tie_word_embeddings`. A tied table is held once (`tpserve.model.lm_head.Table`), in the head's format.
- The compute dtype is the config's (or the caller's), never a weight's.
- Gemma: the embedding is scaled by sqrt(hidden) (rounded to the compute dtype, as transformers
  does), the final norm is Gemma's, and logits are soft-capped (final_logit_softcapping). Gemma 4's
  per-layer embedding inputs (`PerLayerInputs`, below) are computed here too and `embed`
  returns them as extra columns of the step tensor, [h | ple]; their bytes count in `nbytes`.
"""

from __future__ import annotations

import logging

import torch

from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import ModelConfig, QuantConfig
from tpserve.errors import CheckpointError
from tpserve.model.gptq_shard import GPTQWeight
from tpserve.model.layers import RMSNorm
from tpserve.model.linear import matmul, read_linear_weight
from tpserve.model.lm_head import Table, resolve_mode

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
        norm = RMSNorm(ckpt.read(NORM, shape=(h,)).to(dtype), cfg.rms_norm_eps,
                       None if cfg.gemma is None else cfg.gemma.norm_offset)
        if cfg.gemma is not None:
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
        log.info("head (embedding + lm_head) on %s: %.1f MB (lm_head=%s, %s, embedding %s%s)",
                 device, head.nbytes / 1e6, mode, "tied: one table" if tied else "untied",
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


class PerLayerInputs:
    """Gemma 4's per-layer embedding inputs, at the coordinator: ids + scaled embedding -> [T, L*P].

    As transformers' `get_per_layer_inputs` + `project_per_layer_inputs`:
    (rmsnorm(W_proj @ e * hidden^-0.5) + table[id] * sqrt(P)) * 2^-0.5, per layer's P columns.
    The table stays as stored (the compute dtype): lm_head modes never touch it.
    """

    TABLE, PROJECTION = "model.embed_tokens_per_layer.weight", "model.per_layer_model_projection"
    NORM = "model.per_layer_projection_norm.weight"

    def __init__(self, table: torch.Tensor, projection, norm: RMSNorm, cfg: ModelConfig,
                 dtype: torch.dtype):
        self.table, self.projection, self.norm = table, projection, norm
        self.layers, self.dim = cfg.num_layers, cfg.gemma.ple_dim
        self.table_scale = torch.tensor(self.dim ** 0.5, dtype=dtype)
        self.projection_scale = cfg.hidden_size ** -0.5

    @classmethod
    def load(cls, ckpt: Checkpoint, cfg: ModelConfig, quant, dtype) -> "PerLayerInputs":
        g, width = cfg.gemma, cfg.num_layers * cfg.gemma.ple_dim
        table = ckpt.read(cls.TABLE, shape=(g.ple_vocab, width)).to(dtype)
        proj = read_linear_weight(ckpt, cls.PROJECTION, quant, cfg.hidden_size, width,
                                  (0, cfg.hidden_size), (0, width), dtype)
        norm = RMSNorm(ckpt.read(cls.NORM, shape=(g.ple_dim,)).to(dtype), cfg.rms_norm_eps,
                       g.norm_offset)
        return cls(table, proj, norm, cfg, dtype)

    @property
    def nbytes(self) -> int:
        p = self.projection
        return (self.table.numel() * self.table.element_size() + self.norm.weight.numel() *
                self.norm.weight.element_size() +
                (p.nbytes if isinstance(p, GPTQWeight) else p.numel() * p.element_size()))

    def __call__(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """ids [T], the scaled main embedding [T, hidden] -> [T, layers x ple_dim]."""
        t = ids.shape[0]
        token = (self.table[ids] * self.table_scale).view(t, self.layers, self.dim)
        proj = matmul(embedded, self.projection) * self.projection_scale  # (T, layers x ple_dim)
        proj = self.norm(proj.view(t, self.layers, self.dim))
        return ((proj + token) * 2 ** -0.5).reshape(t, self.layers * self.dim)
