"""One rank's shard of a linear layer, read beside its forward; column-parallel shards joined along N.

A layer's weight is either a GPTQ shard (`GPTQWeight`) or, for layers a quantizer left in full
precision (AutoRound skips some), a dense [N_local, K_local] tensor. A row-parallel shard's forward
returns this rank's partial product: the decoder all-reduces it where the reader can see it.

Merged linears (q/k/v, gate/up): column-parallel shards of the same input are joined along N at
load, so a decode step runs one GEMV instead of three. qweight and scales concatenate along N as
they are; qzeros are packed along N, so they are unpacked, concatenated and repacked (a rank's N
need not be a multiple of the pack width). Act-order shards join only when their g_idx agree (each
GPTQ layer has its own group order, so usually they do not) and dense with dense: otherwise the
parts stay separate linears behind the same interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpserve.errors import CheckpointError
from tpserve.kernels import fixed_sum, gptq_matmul
from tpserve.model import gptq
from tpserve.model.checkpoint import Checkpoint
from tpserve.model.config import QuantConfig
from tpserve.model.gptq_shard import (GPTQWeight, prepare_act_order, read_gptq_rows,
                                     read_gptq_shard, select_columns)

Span = tuple[int, int] | torch.Tensor  # [a, b), or the indices to take, in order (MLP channels)


def _whole(span: Span, size: int) -> tuple[int, int]:
    return (0, size) if isinstance(span, torch.Tensor) else span


def read_linear_weight(ckpt: Checkpoint, prefix: str, quant: QuantConfig | None,
                       in_features: int, out_features: int, rows: Span, cols: Span,
                       dtype: torch.dtype) -> GPTQWeight | torch.Tensor:
    """The [rows x cols] shard of linear `prefix`: GPTQ if the checkpoint has it, else dense.
    rows or cols may be an index tensor instead of a span (an MLP's channels in group order)."""
    if f"{prefix}.qweight" in ckpt:
        quant = quant.for_module(prefix) if quant is not None else None
        if quant is None:
            raise CheckpointError(f"tensor '{prefix}.qweight' is GPTQ-packed but the quantization "
                                  f"config is missing or excludes it; fix quantize_config.json")
        if isinstance(rows, torch.Tensor):
            return read_gptq_rows(ckpt, prefix, quant, in_features, out_features, rows,
                                  _whole(cols, out_features))
        w = read_gptq_shard(ckpt, prefix, quant, in_features, out_features, rows,
                            _whole(cols, out_features))
        return select_columns(w, cols) if isinstance(cols, torch.Tensor) else w
    if f"{prefix}.weight" in ckpt:
        w = ckpt.read(f"{prefix}.weight", rows=_whole(cols, out_features),
                      cols=_whole(rows, in_features), shape=(out_features, in_features))
        if isinstance(cols, torch.Tensor):
            w = w[cols.to(w.device)]
        if isinstance(rows, torch.Tensor):
            w = w[:, rows.to(w.device)]
        return w.contiguous().to(dtype)
    raise CheckpointError(f"neither '{prefix}.qweight' nor '{prefix}.weight' is in {ckpt.path}; "
                          f"the checkpoint does not match config.json")


def matmul(x: torch.Tensor, weight: GPTQWeight | torch.Tensor) -> torch.Tensor:
    """x @ W for a GPTQ shard [K, N] or a dense weight [N, K]."""
    return gptq_matmul(x, weight) if isinstance(weight, GPTQWeight) else F.linear(x, weight)


def merge_columns(weights: list) -> GPTQWeight | torch.Tensor | None:
    """Column shards of one input joined along N, or None when they cannot share one kernel call."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights, dim=0)  # dense weights are [N, K]
    if not all(isinstance(w, GPTQWeight) for w in weights):
        return None
    first = weights[0]
    same = all((w.bits, w.group_size, w.in_features, w.group_offset, w.scales.dtype) ==
               (first.bits, first.group_size, first.in_features, first.group_offset,
                first.scales.dtype) for w in weights)
    same_order = all((w.g_idx is None) == (first.g_idx is None) and
                     (w.g_idx is None or torch.equal(w.g_idx, first.g_idx)) for w in weights)
    if not (same and same_order):
        return None
    zeros = torch.cat([gptq.unpack_cols(w.qzeros, w.bits, w.out_features) for w in weights], 1)
    return GPTQWeight(
        qweight=torch.cat([w.qweight for w in weights], 1),
        qzeros=gptq.pack_cols(zeros, first.bits),
        scales=torch.cat([w.scales for w in weights], 1), g_idx=first.g_idx,
        group_offset=first.group_offset, bits=first.bits, group_size=first.group_size,
        in_features=first.in_features, out_features=sum(w.out_features for w in weights),
        x_features=first.x_features, word_groups=first.word_groups)


class Linear(torch.nn.Module):
    """y = x @ W (+ b) with this rank's shard W; act-order rows sorted by group once, at load."""

    def __init__(self, weight: GPTQWeight | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.perm = None
        self.input_order = None  # x arrives in this order of its columns (its producer's work)
        if isinstance(weight, GPTQWeight) and weight.g_idx is not None:
            weight, self.perm = prepare_act_order(weight)
        self.weight, self.bias = weight, bias

    def take_input_order(self) -> torch.Tensor | None:
        """The act-order permutation x is read through, handed to x's producer, which then
        writes x in that order (None: nothing to hand over: no permutation, or rows padded
        per group, whose x has fewer columns than the weight has rows)."""
        if self.perm is None or self.perm.numel() != (self.weight.x_features
                                                      or self.weight.in_features):
            return None
        self.input_order, self.perm = self.perm, None
        return self.input_order

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, quant: QuantConfig | None, in_features: int,
             out_features: int, rows: Span, cols: Span, dtype: torch.dtype,
             bias: bool = False, rank: int = 0) -> "Linear":
        w = read_linear_weight(ckpt, prefix, quant, in_features, out_features, rows, cols, dtype)
        return cls(w, _read_bias(ckpt, prefix, bias, rows, cols, in_features, out_features, rank,
                                 dtype))

    def forward(self, x: torch.Tensor, fixed: str | None = None,
                clear: str | None = None) -> torch.Tensor:
        """`fixed`: a role (`fixed_sum.buffer`) whose buffer a one-row GPU GEMV may return its
        output in, as a fixed-point sum for a consumer that takes it (not with a bias; fp16 x
        only, `fixed_sum.fits`). x may be a fixed-point gate/up sum (int64 [1, 2K], read as
        silu(gate) * up); `clear`: the role of a buffer [1, N] the one-row GEMV zeroes."""
        if isinstance(self.weight, GPTQWeight):
            buf, n = None, self.weight.out_features
            if (fixed is not None and self.bias is None and x.is_cuda
                    and fixed_sum.fits(fixed_sum.reads_as(x))):
                buf = fixed_sum.buffer(x.device, fixed, n)
            y = gptq_matmul(x, self.weight, self.perm, buf,
                            None if clear is None else fixed_sum.buffer(x.device, clear, n))
        else:
            y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """W as fp32 [K, N], rows in the order x has them (for `tpserve verify`)."""
        if not isinstance(self.weight, GPTQWeight):
            return self.weight.float().T
        w = self.weight.dequantize(torch.float32)
        if self.perm is None:  # (with an input order, x arrives permuted as these rows are)
            return w
        # act-order rows were sorted by group at load (x[:, perm] @ w), and padded to whole words
        # with rows of exact zeros that read x through perm like the others: sum them back
        out = w.new_zeros(self.weight.x_features or w.shape[0], w.shape[1])
        return out.index_add_(0, self.perm, w)


def _read_bias(ckpt, prefix, bias, rows, cols, in_features, out_features, rank, dtype):
    if not bias:
        return None
    if isinstance(rows, torch.Tensor) or rows != (0, in_features):
        # Row-parallel: the bias is replicated in the checkpoint but must enter the sum once.
        return ckpt.read(f"{prefix}.bias", shape=(out_features,)).to(dtype) if rank == 0 else None
    b = ckpt.read(f"{prefix}.bias", rows=_whole(cols, out_features), shape=(out_features,))
    return (b[cols.to(b.device)] if isinstance(cols, torch.Tensor) else b).to(dtype)


class MergedLinear(torch.nn.Module):
    """Column-parallel linears of one input as one GEMV: forward returns each part's output."""

    def __init__(self, weights: list, biases: list[torch.Tensor | None]):
        super().__init__()
        self.sizes = [w.out_features if isinstance(w, GPTQWeight) else w.shape[0] for w in weights]
        merged = merge_columns(weights)
        if merged is None:
            self.parts = torch.nn.ModuleList(Linear(w, b) for w, b in zip(weights, biases))
            self.joined = None
            return
        bias = None
        if any(b is not None for b in biases):
            like = next(b for b in biases if b is not None)
            bias = torch.cat([like.new_zeros(n) if b is None else b
                              for b, n in zip(biases, self.sizes)])
        self.parts, self.joined = None, Linear(merged, bias)

    @classmethod
    def load(cls, ckpt: Checkpoint, prefixes: list[str], quant: QuantConfig | None,
             in_features: int, outs: list[tuple[int, Span]], dtype: torch.dtype,
             bias: bool = False) -> "MergedLinear":
        """outs: per prefix (out_features, this rank's columns)."""
        whole = (0, in_features)
        weights = [read_linear_weight(ckpt, p, quant, in_features, n, whole, cols, dtype)
                   for p, (n, cols) in zip(prefixes, outs)]
        return cls(weights, [_read_bias(ckpt, p, bias, whole, cols, in_features, n, 0, dtype)
                             for p, (n, cols) in zip(prefixes, outs)])

    def forward(self, x: torch.Tensor, fixed: str | None = None) -> tuple[torch.Tensor, ...]:
        """`fixed`: as `Linear.forward`, for the joined GEMV only (parts are views of its output)."""
        if self.joined is not None:
            return self.joined(x, fixed).split(self.sizes, dim=-1)
        return tuple(p(x) for p in self.parts)

    def dense_parts(self) -> list[torch.Tensor]:
        """Each part's W as fp32 [K, n_i], rows in checkpoint order."""
        if self.joined is not None:
            return list(self.joined.dense().split(self.sizes, dim=1))
        return [p.dense() for p in self.parts]
