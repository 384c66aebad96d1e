"""Vocabulary tables at the coordinator: the lm_head, and the embedding when tied to it.

A `Table` holds a [vocab, hidden] matrix in one format and serves both uses: `logits(x)` for the
head and `rows(ids)` (dequantizing only the gathered rows) for the embedding. A tied checkpoint is
therefore held once, quantized, never as two full copies.

Formats (`--lm-head`):
  dense  as stored (the config's compute dtype)
  int8   per-output-channel symmetric int8, quantized at load: H + 4 bytes per row
  q8_0   blocks of 32 weights along H with one fp16 scale: 34 bytes per 32 weights
  gptq   the checkpoint's own GPTQ head (`lm_head: true`)
  auto   gptq when the checkpoint's head is GPTQ; else int8 when the table is 64 MiB or more in
         16-bit (real vocabularies: 128k x 4096 is 1 GiB), where the head is a large share of each
         token's bytes; else dense (tiny models, where exactness is worth more than bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpserve.errors import TpserveError
from tpserve.kernels import GPTQWeight, HeadFormat, dequant_rows, gptq_matmul, head_matmul
from tpserve.model import gptq

MODES = ("auto",) + tuple(f.value for f in HeadFormat)  # the --lm-head values
AUTO_INT8_BYTES = 64 << 20


def resolve_mode(mode: str, stored_gptq: bool, vocab: int, hidden: int) -> HeadFormat:
    """The --lm-head flag (see the module docstring) -> the table's format."""
    if mode not in MODES:
        raise TpserveError(f"lm_head mode {mode!r} is not known; use one of {MODES}")
    if mode == "auto":
        if stored_gptq:
            return HeadFormat.GPTQ
        return HeadFormat.INT8 if vocab * hidden * 2 >= AUTO_INT8_BYTES else HeadFormat.DENSE
    if mode == HeadFormat.GPTQ and not stored_gptq:
        raise TpserveError("lm_head mode 'gptq' needs a checkpoint whose head is GPTQ-quantized "
                           "(lm_head: true); use int8 or q8_0 to quantize it at load")
    return HeadFormat(mode)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Table:
    mode: HeadFormat  # a string value is converted
    dtype: torch.dtype  # compute dtype (from the config, never from a weight's dtype)
    weight: torch.Tensor | None = None  # dense [V, H]
    q: torch.Tensor | None = None  # int8 [V, H]
    scales: torch.Tensor | None = None  # int8: [V]; q8_0: [V, H/32] fp16
    packed: GPTQWeight | None = None  # gptq: [K=H, N=V]

    def __post_init__(self):
        self.mode = HeadFormat(self.mode)

    @classmethod
    def from_dense(cls, w: torch.Tensor, mode: HeadFormat | str, dtype: torch.dtype) -> "Table":
        """w [V, H] as stored -> a table in `mode` (int8/q8_0 are quantized here, once)."""
        from tpserve.kernels import quantize_int8, quantize_q8_0
        mode = HeadFormat(mode)
        if mode is HeadFormat.DENSE:
            return cls(mode, dtype, weight=w.to(dtype))
        if mode is HeadFormat.Q8_0 and w.shape[1] % 32:
            raise TpserveError(f"lm_head mode 'q8_0' needs hidden_size divisible by 32, not "
                               f"{w.shape[1]}; use int8")
        q, s = (quantize_int8 if mode is HeadFormat.INT8 else quantize_q8_0)(w)
        return cls(mode, dtype, q=q, scales=s)

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            return self.packed.nbytes
        return _nbytes(self.weight, self.q, self.scales)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> fp32 logits [T, V]."""
        if self.mode is HeadFormat.DENSE:
            y = x @ self.weight.T
        elif self.mode is HeadFormat.GPTQ:
            y = gptq_matmul(x, self.packed)
        else:
            y = head_matmul(self.mode, x, self.q, self.scales, out_dtype=torch.float32)
        return y.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: rows `ids` [T] -> [T, H] in the compute dtype."""
        if self.mode is HeadFormat.DENSE:
            return self.weight[ids]
        if self.mode is not HeadFormat.GPTQ:
            return dequant_rows(self.mode, ids, self.q, self.scales, self.dtype)
        return _gptq_columns(self.packed, ids).to(self.dtype)


def _gptq_columns(w: GPTQWeight, cols: torch.Tensor) -> torch.Tensor:
    """Columns `cols` of a GPTQ [K, N] weight, dequantized, as rows [len(cols), K]."""
    q = gptq.unpack_rows(w.qweight[:, cols], w.bits, w.in_features)  # (K, n)
    z = gptq.unpack_cols(w.qzeros, w.bits, w.out_features)[:, cols]  # (G, n)
    return gptq.dequantize(q, z, w.scales[:, cols], w.groups()).T
