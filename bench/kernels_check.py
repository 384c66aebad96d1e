"""GPU parity of every kernel path (`python bench/kernels.py --check`), with fixed configs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tpserve.kernels import HeadFormat  # noqa: E402
from tpserve.kernels.gptq_weight import gptq_matmul_reference  # noqa: E402
from tpserve.model.gptq_shard import prepare_act_order  # noqa: E402


def check(dev):
    """Parity of every kernel path on this device, with fixed configs (one compile each)."""
    from tpserve.kernels import dispatch, gptq_h2mm, gptq_launch, head_kernels
    from tpserve.kernels.gptq_gemv import uses_h2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gptq_random import random_gptq
    worst = 0.0

    def report(what, y, ref):
        nonlocal worst
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        if not err < 1e-2:
            print(f"FAIL {what}: relative error {err:.2e}")

    # (bits, k, n, gs, k0, act, gemv BLOCK_K, mm BLOCK_K): ONE/ROW, ONE/TWO, TWO/ROW, TWO/TWO, ROW
    cases = [(4, 200, 72, 64, 0, False, 32, 128), (4, 250, 40, 128, 64, False, 64, 128),
             (4, 150, 72, 64, 40, False, 32, 128), (8, 150, 40, 64, 40, False, 32, 64),
             (4, 130, 40, 32, 64, True, 32, 128), (4, 4096, 4096, 128, 0, False, 128, 128),
             (8, 4096, 1024, 128, 64, False, 64, 64), (4, 1024, 1000, 32, 16, False, 32, 128)]
    for i, (bits, k, n, gs, k0, act, bk1, bk2) in enumerate(cases):
        w = random_gptq(k, n, bits, gs, k0=k0, k_total=k0 + k + 60, act_order=act, device=dev)
        w, perm = prepare_act_order(w) if act else (w, None)
        for dtype in (torch.float16, torch.bfloat16) + ((torch.float32,) if i < 2 else ()):
            for m in (1, 2, 5, 16, 300, 600):
                cfg = (dict(BLOCK_N=32, BLOCK_K=bk1, SPLIT_K=3) if m == 1 else
                       dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk2, SPLIT_K=3) if m <= 16 else
                       dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk1, GROUP_M=4) if m < 600 else
                       None)  # dequantize + cuBLAS
                x = torch.randn(m, k, device=dev, dtype=dtype)
                xk = x if perm is None else x[:, perm]
                y = dispatch.gptq_matmul_triton(x, w, perm, config=cfg)
                report(f"gptq bits={bits} K={k} N={n} gs={gs} k0={k0} act={act} M={m} {dtype}",
                       y, gptq_matmul_reference(xk.float(), w))
                if 1 < m <= gptq_h2mm.MAX_M and uses_h2(dtype, w):  # the fp16x2 rows kernel too
                    report(f"gptq fp16x2 rows bits={bits} K={k} gs={gs} k0={k0} act={act} M={m}",
                           gptq_h2mm.h2_matmul(x, w, perm, config=dict(BLOCK_N=64, BLOCK_K=bk1,
                                                                       SPLIT_K=3)),
                           gptq_matmul_reference(xk.float(), w))
                if m == 1 and dtype == torch.float16:  # fp16x2 sums: |x| up to ~12000 stay finite
                    w2 = dataclasses.replace(w, scales=w.scales / 3000)  # y itself stays in fp16
                    report(f"gptq large x bits={bits} K={k} k0={k0}",
                           dispatch.gptq_matmul_triton(x * 3000, w2, perm, config=cfg),
                           gptq_matmul_reference(xk.float() * 3000, w2))
    for h, v in [(96, 1000), (4096, 5000)]:
        wt = torch.randn(v, h, device=dev) / h ** 0.5
        for fmt in (HeadFormat.INT8, HeadFormat.Q8_0):
            q, s = (head_kernels.quantize_int8 if fmt == HeadFormat.INT8
                    else head_kernels.quantize_q8_0)(wt)
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for m in (1, 3, 40):
                    cfg = dict(BLOCK_V=32, BLOCK_H=256) if m == 1 else \
                        dict(BLOCK_M=16, BLOCK_V=64, BLOCK_H=128)
                    x = torch.randn(m, h, device=dev, dtype=dtype)
                    report(f"head {fmt} H={h} V={v} M={m} {dtype}",
                           head_kernels.head_matmul_triton(fmt, x, q, s, config=cfg),
                           head_kernels.dequant_matmul(fmt, x.float(), q, s))
            ids = torch.randint(0, v, (33,), device=dev)
            report("rows", head_kernels.dequant_rows_triton(fmt, ids, q, s, torch.float32),
                   head_kernels.dequant_rows_reference(fmt, ids, q, s, torch.float32))
    clean = all(not cnt.any().item() for _, cnt in gptq_launch._workspaces.values())
    print(f"check: worst relative error {worst:.2e}; split-K tickets left zeroed: {clean}")
    return worst < 1e-2 and clean
