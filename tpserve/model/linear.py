"""Column- and row-parallel linear layers; each reads its own shard, beside its forward.

A layer's weight is either a GPTQ shard (`GPTQWeight`) or, for layers a quantizer left in full
precision (AutoRound skips some), a dense [N_local, K_local] tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import QuantConfig
from tpserve.errors import CheckpointError
from tpserve.model.gptq_shard import GPTQWeight, read_gptq_shard
from tpserve.kernels import gptq_matmul, prepare_act_order


def read_linear_weight(ckpt: Checkpoint, prefix: str, quant: QuantConfig | None,
                       in_features: int, out_features: int, rows: tuple[int, int],
                       cols: tuple[int, int], dtype: torch.dtype) -> GPTQWeight | torch.Tensor:
    """The [rows x cols] shard of linear `prefix`: GPTQ if the checkpoint has it, else dense."""
    if f"{prefix}.qweight" in ckpt:
        quant = quant.for_module(prefix) if quant is not None else None
        if quant is None:
            raise CheckpointError(f"tensor '{prefix}.qweight' is GPTQ-packed but the quantization "
                                  f"config is missing or excludes it; fix quantize_config.json")
        return read_gptq_shard(ckpt, prefix, quant, in_features, out_features, rows, cols)
    if f"{prefix}.weight" in ckpt:
        w = ckpt.read(f"{prefix}.weight", rows=cols, cols=rows, shape=(out_features, in_features))
        return w.to(dtype)
    raise CheckpointError(f"neither '{prefix}.qweight' nor '{prefix}.weight' is in {ckpt.path}; "
                          f"the checkpoint does not match config.json")


def _prepare(weight: GPTQWeight | torch.Tensor):
    """(weight, perm): act-order rows sorted by group once, at load (the kernels' fast path)."""
    if isinstance(weight, GPTQWeight) and weight.g_idx is not None:
        return prepare_act_order(weight)
    return weight, None


def _matmul(x: torch.Tensor, weight: GPTQWeight | torch.Tensor, perm) -> torch.Tensor:
    if isinstance(weight, GPTQWeight):
        return gptq_matmul(x, weight, perm)
    return F.linear(x, weight)


class ColumnParallelLinear(torch.nn.Module):
    """Output columns [n0, n1) of a linear layer; no communication."""

    def __init__(self, weight: GPTQWeight | torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        (self.weight, self.perm), self.bias = _prepare(weight), bias

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, quant: QuantConfig | None, in_features: int,
             out_features: int, cols: tuple[int, int], dtype: torch.dtype, bias: bool = False):
        w = read_linear_weight(ckpt, prefix, quant, in_features, out_features, (0, in_features),
                               cols, dtype)
        b = ckpt.read(f"{prefix}.bias", rows=cols, shape=(out_features,)).to(dtype) if bias else None
        return cls(w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _matmul(x, self.weight, self.perm)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(torch.nn.Module):
    """Input rows [k0, k1) of a linear layer; the partial products are summed across ranks."""

    def __init__(self, weight: GPTQWeight | torch.Tensor, bias: torch.Tensor | None, comm):
        super().__init__()
        (self.weight, self.perm), self.bias, self.comm = _prepare(weight), bias, comm

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, quant: QuantConfig | None, in_features: int,
             out_features: int, rows: tuple[int, int], dtype: torch.dtype, comm, bias: bool = False):
        w = read_linear_weight(ckpt, prefix, quant, in_features, out_features, rows,
                               (0, out_features), dtype)
        # The bias is replicated in the checkpoint but must enter the sum once: rank 0 adds it.
        b = None
        if bias and comm.rank == 0:
            b = ckpt.read(f"{prefix}.bias", shape=(out_features,)).to(dtype)
        return cls(w, b, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _matmul(x, self.weight, self.perm)
        if self.bias is not None:
            y = y + self.bias
        return self.comm.all_reduce(y)
