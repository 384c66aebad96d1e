"""GPTQ dequantize-and-multiply: y[M, N] = x[M, K] @ W[K, N] for one rank's GPTQ shard.

The torch reference dequantizes the shard (`GPTQWeight.dequantize`, which honours the shard's group
offset and act-order g_idx) and runs a dense matmul; it is the oracle for the Triton kernel and the
path on CPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("tpserve.kernels")
_announced: set[str] = set()


def _announce(path: str) -> None:
    if path not in _announced:
        _announced.add(path)
        log.info("GPTQ matmul path: %s", path)


def gptq_matmul_reference(x: torch.Tensor, w) -> torch.Tensor:
    return x @ w.dequantize(x.dtype)


def gptq_matmul(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., K] -> [..., N]."""
    _announce("torch reference (device %s)" % x.device.type)
    shape = x.shape
    y = gptq_matmul_reference(x.reshape(-1, shape[-1]), w)
    return y.view(*shape[:-1], w.out_features)
