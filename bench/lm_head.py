"""lm_head formats: bytes held and time per decode step, dense vs int8 vs Q8_0, in one run.

    python bench/lm_head.py [--device cpu|cuda] [--batch 1 8] [--out bench/results/lm_head.json]

Shapes (vocab x hidden): 128256x4096 (Llama 3), 151936x2560 (Qwen3-4B), 262144x2048 (Gemma).
The dense peer is the same table in bf16 (fp32 on CPU, where bf16 matmul is slow) through
`torch.nn.functional.linear` (cuBLAS on GPU). Tables are rotated over enough copies to defeat L2
on GPU. Also reported: the bytes a tied table costs here (one quantized copy serving head and
embedding) vs peers (the dense table twice).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from tpserve.model.lm_head import Table

SHAPES = [(128256, 4096), (151936, 2560), (262144, 2048)]


def timeit(fn, device: str, iters: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 32000x1024,50000x512 (default: real ones)")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = args.device
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    dense_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    iters = args.iters or (50 if dev == "cuda" else 5)
    rows = []
    for v, h in shapes:
        w = (torch.randn(v, h, device=dev) * 0.02)
        copies = 1
        if dev == "cuda":  # rotate over >= 200 MB of bf16 tables to defeat the 50 MB L2
            copies = max(2, -(-200 * 2**20 // (v * h * 2)))
        tables = {"dense": [Table.from_dense(w, "dense", dense_dtype) for _ in range(copies)],
                  "int8": [Table.from_dense(w, "int8", dense_dtype) for _ in range(copies)],
                  "q8_0": [Table.from_dense(w, "q8_0", dense_dtype) for _ in range(copies)]}
        del w
        for b in args.batch:
            x = torch.randn(b, h, device=dev, dtype=dense_dtype)
            res = {}
            for mode, ts in tables.items():
                i = [0]

                def step(ts=ts):
                    i[0] = (i[0] + 1) % len(ts)
                    return ts[i[0]].logits(x)
                res[mode] = timeit(step, dev, iters)
            bf16_bytes = v * h * 2
            for mode, ts in tables.items():
                rows.append({"vocab": v, "hidden": h, "batch": b, "mode": mode, "device": dev,
                             "us": res[mode] * 1e6, "speedup_vs_dense": res["dense"] / res[mode],
                             "bytes": ts[0].nbytes, "bytes_vs_one_bf16_copy": ts[0].nbytes / bf16_bytes,
                             "tied_bytes_vs_peer_two_copies": ts[0].nbytes / (2 * bf16_bytes),
                             "GBps": ts[0].nbytes / res[mode] / 1e9})
        del tables
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"{'vocab x hidden':>15} {'M':>2} {'mode':>5} {'us':>9} {'vs dense':>8} {'bytes/bf16':>10} {'GB/s':>7}")
    for r in rows:
        print(f"{r['vocab']:>8}x{r['hidden']:<6} {r['batch']:>2} {r['mode']:>5} {r['us']:>9.1f} "
              f"{r['speedup_vs_dense']:>8.2f} {r['bytes_vs_one_bf16_copy']:>10.3f} {r['GBps']:>7.0f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
                "dense_dtype": str(dense_dtype), "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
