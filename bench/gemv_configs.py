"""Every config of a GPTQ decode kernel timed on one GPU, per variant: what the autotuner chooses
from, and how far an act-order shard is from the aligned weight at the same config.

    python bench/gemv_configs.py --shapes 4096x4096,4096x14336 --variants w4g128 w4_act_shard --m 1 4

M = 1 sweeps the GEMV's configs; 2 <= M <= 4 the tl.dot decode kernel's and the fp16x2 rows
kernel's. Each line: the config, its time per variant (median device time, weights rotated past
L2, as in bench/kernels.py), and the autotuned call's time last. Act-order shards get more
columns: x gathered through the permutation before the kernel (+gather, `gptq_launch.GATHER_X`)
and the fp32 GEMV path (+fp32, `gptq_gemv.USE_H2` off). w4g128_fixed: the GEMV adding into a
fixed-point buffer (`fixed_sum.py`, what a tp=1 decode step runs; its sums wrap over the timed
calls, which leaves the times as they are). --extra adds GEMV configs outside the tuner's pool
(split-K up to 32: without the split-K ticket a deeper split may pay).

    python bench/gemv_configs.py --shapes 4096x6144,4096x4096 --variants w4g128 w4g128_fixed \
        --m 1 --extra
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpserve.kernels import gptq_matmul  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)  # bench/kernels.py (the repo's kernels/ takes the name)
device_time_us, make_variant, n_copies = (bench_kernels.device_time_us, bench_kernels.make_variant,
                                          bench_kernels.n_copies)
_fixed_run = bench_kernels.fixed_gemv  # the GEMV into a fixed-point buffer (w4g128_fixed)


# GEMV configs beyond the tuner's pool (--extra): BLOCK_N, BLOCK_K, SPLIT_K, warps
EXTRA = [(32, 128, 32, 1), (64, 128, 32, 2), (128, 128, 32, 4), (64, 64, 32, 2), (128, 64, 32, 2),
         (32, 256, 16, 1), (128, 128, 16, 2), (256, 128, 16, 4)]


def _columns(weights, m):
    """(variant, its weights, mode) per column: act-order shards also with x gathered before the
    kernel (+gather) and, at M = 1, through the fp32 GEMV path (+fp32)."""
    for v, ws in weights.items():
        modes = [""]
        if ws[0][1] is not None:
            modes += ["+gather"] + (["+fp32", "+fp32+gather"] if m == 1 else [])
        for mode in modes:
            yield v, ws, mode


def sweep(k, n, m, variants, iters, extra=False):
    from tpserve.kernels import gptq_decode, gptq_gemv, gptq_h2mm, gptq_launch
    from tpserve.kernels.gptq_gemv import uses_h2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a plumbing check
    weights = {}
    for v in variants:
        first = make_variant(v.removesuffix("_fixed"), k, n, dev)
        weights[v] = [first] + [make_variant(v.removesuffix("_fixed"), k, n, dev)
                                for _ in range(n_copies(first[0].nbytes, False) - 1)]
    x = torch.randn(m, max(w.x_features or w.in_features for ws in weights.values()
                           for w, _ in ws), device=dev).half()
    from tpserve.kernels.gptq_launch import cfg as make_cfg
    more = [make_cfg(bn, bk, sk, warps) for bn, bk, sk, warps in EXTRA] if extra else []
    kernels = ([("gemv", gptq_gemv.gemv, gptq_gemv._CONFIGS + more)] if m == 1 else
               [("tl.dot", gptq_decode.decode_matmul, gptq_decode._CONFIGS),
                ("fp16x2", gptq_h2mm.h2_matmul, gptq_h2mm._CONFIGS)])
    rows = []
    for name, run, configs in kernels:
        for c in configs:
            row = dict(K=k, N=n, M=m, kernel=name, config=str(c))
            for v, ws, mode in _columns(weights, m):
                w0 = ws[0][0]
                gptq_launch.GATHER_X, gptq_gemv.USE_H2 = "gather" in mode, "fp32" not in mode
                if name == "fp16x2" and not uses_h2(torch.float16, w0):
                    continue
                kx = w0.x_features or w0.in_features
                bk, sk = c.kwargs["BLOCK_K"], c.kwargs.get("SPLIT_K", 1)
                min_words = 16 if name == "tl.dot" else 1
                if bk * w0.bits // 32 < min_words or (sk > 1 and w0.in_features < sk * bk):
                    continue  # a config the autotuner would not try on this shape
                cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                if name == "fp16x2":
                    cfg.pop("BLOCK_M", None)

                def call(w, p, xs=x[:, :kx], v=v):
                    if v.endswith("_fixed"):
                        return _fixed_run(xs, w, p, config=cfg)
                    return run(xs, w, p, config=cfg)
                try:
                    row[v + mode] = device_time_us([lambda w=w, p=p: call(w, p) for w, p in ws], dev, iters)
                except Exception as e:  # noqa: BLE001 - a config the kernel rejects: say so
                    row[v + mode] = f"{type(e).__name__}: {str(e)[:60]}"
            if len(row) > 5:
                rows.append(row)
                print(json.dumps(row), flush=True)
    gptq_launch.GATHER_X, gptq_gemv.USE_H2 = False, True
    tuned = dict(K=k, N=n, M=m, kernel="autotuned", config="-")
    for v, ws in weights.items():
        kx = ws[0][0].x_features or ws[0][0].in_features
        fn = _fixed_run if v.endswith("_fixed") else gptq_matmul
        tuned[v] = device_time_us([lambda w=w, p=p, fn=fn: fn(x[:, :kx], w, p) for w, p in ws],
                                  dev, iters)
    rows.append(tuned)
    print(json.dumps(tuned), flush=True)
    cols = [v + mode for v, _, mode in _columns(weights, m)]
    best = {c: min((r[c] for r in rows if isinstance(r.get(c), float) and r is not tuned),
                   default=None)
            for c in cols}
    print(f"K={k} N={n} M={m} best config: " + ", ".join(
        f"{c} {best[c]:.1f} us" for c in cols if best[c]) + "; autotuned: " + ", ".join(
        f"{v} {tuned[v]:.1f} us" for v in weights), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336")
    ap.add_argument("--variants", nargs="+", default=["w4g128", "w4_act_shard"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--extra", action="store_true", help="also GEMV configs beyond the tuner's")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for s in args.shapes.split(","):
        k, n = map(int, s.split("x"))
        for m in args.m:
            rows += sweep(k, n, m, args.variants, args.iters, args.extra)
            if args.out:
                json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), open(args.out, "w"),
                          indent=1)


if __name__ == "__main__":
    main()
