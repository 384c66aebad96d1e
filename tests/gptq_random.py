"""Random GPTQ shards quantized for real (tests, bench/kernels.py --check)."""

from __future__ import annotations

import torch

from tpserve.kernels import GPTQWeight
from tpserve.model import gptq


def random_gptq(k: int, n: int, bits: int, group_size: int, k0: int = 0, k_total: int | None = None,
                act_order: bool = False, sym: bool = False, device="cpu",
                generator: torch.Generator | None = None) -> GPTQWeight:
    """Rows [k0, k0 + k) of a random [k_total, n] layer quantized by `gptq.quantize`.

    The shard is cut as `read_gptq_shard` cuts one: covering groups, group_offset = k0 % group_size,
    or with act_order a local g_idx rebased to the first kept group.
    """
    k_total = k0 + k if k_total is None else k_total
    w = torch.randn(k_total, n, generator=generator).to(device)
    order = torch.randperm(k_total, generator=generator).to(device) if act_order else None
    q, zeros, scales = gptq.quantize(w if order is None else w[order], bits, group_size, sym)
    g_full = torch.arange(k_total, device=device) // group_size
    if order is not None:  # GPTQ act-order: groups are contiguous in `order`, not in row order
        inv = torch.argsort(order)
        q, g_full = q[inv], g_full[inv]
    g_loc = g_full[k0:k0 + k]
    g_first, g_last = int(g_loc.min()), int(g_loc.max())
    return GPTQWeight(qweight=gptq.pack_rows(q[k0:k0 + k], bits),
                      qzeros=gptq.pack_cols(zeros[g_first:g_last + 1], bits).to(device),
                      scales=scales[g_first:g_last + 1].to(device).contiguous(),
                      g_idx=(g_loc - g_first).to(torch.int32) if act_order else None,
                      group_offset=0 if act_order else k0 % group_size, bits=bits,
                      group_size=group_size, in_features=k, out_features=n)
