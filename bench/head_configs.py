"""Every config of the int8 lm_head GEMV (M = 1) timed on one GPU, with and without evict-first
loads, beside the dense fp16 head (cuBLAS) and the autotuned call: what the head's tuner chooses
from, and how close a config comes to the copy bandwidth.

    python bench/head_configs.py --shape 4096x128256 --out head_configs.json

Times are the median of CUDA-event pairs around single calls enqueued behind a GPU sleep, the
tables rotated past the L2 (bench/kernels.py's `device_time_us`). `%copy` is the table's bytes
over the time, against the measured device-to-device copy bandwidth (read + write).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpserve.kernels import head_kernels as hk  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)  # bench/kernels.py (the repo's kernels/ takes the name)


def configs():
    """BLOCK_V, BLOCK_H, warps, stages: int8 tiles of 4-64 KB, <= 128 fp32 accumulators a thread."""
    for bv, bh, warps, stages in itertools.product((16, 32, 64, 128), (128, 256, 512, 1024),
                                                   (4, 8), (2, 3, 4)):
        if 4096 <= bv * bh <= 65536 and bv * bh // (32 * warps) <= 128:
            yield bv, bh, warps, stages


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x128256", help="H x V")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    h, v = map(int, args.shape.split("x"))
    dev = torch.device("cuda")
    copy_bw = bench_kernels.copy_bandwidth(dev, 2 ** 30)
    copies = bench_kernels.n_copies(v * h, False)
    w = torch.randn(v, h, device=dev).half() / h ** 0.5
    tables = [hk.quantize_int8(w) for _ in range(copies)]
    x = torch.randn(1, h, device=dev).half()
    nbytes = v * h + 4 * v
    rows = []

    def row(name, us, moved):
        r = dict(config=name, us=us, pct_copy=100 * moved / (us * 1e-6) / copy_bw)
        rows.append(r)
        print(f"{name:<40} {us:8.1f} us {r['pct_copy']:5.1f}% copy", flush=True)

    dense = [w] + [w.clone() for _ in range(bench_kernels.n_copies(2 * v * h, False) - 1)]
    row("dense fp16 F.linear", bench_kernels.device_time_us(
        [lambda d=d: F.linear(x, d) for d in dense], dev, args.iters), 2 * v * h)
    del dense
    want = hk.dequant_matmul(hk.HeadFormat.INT8, x.float(), *tables[0]).half()
    out = torch.empty(1, v, device=dev, dtype=torch.float16)
    for (bv, bh, warps, stages), evict in itertools.product(list(configs()), (False, True)):
        grid = (triton.cdiv(v, bv),)

        def call(q, s, bv=bv, bh=bh, warps=warps, stages=stages, evict=evict, grid=grid):
            hk._head_gemv_kernel[grid](x, q, s, out, v, h, q.stride(0), s.stride(0), Q8_0=False,
                                       PDL=False, EVICT="evict_first" if evict else "",
                                       BLOCK_V=bv, BLOCK_H=bh,
                                       num_warps=warps, num_stages=stages)
        call(*tables[0])
        err = (out.float() - want.float()).abs().max().item()
        if err > 1e-2 * want.abs().max().item():
            print(f"config {bv}x{bh} w{warps} s{stages}: max |err| {err:.3g}: WRONG", flush=True)
            continue
        name = f"BLOCK_V {bv} BLOCK_H {bh} warps {warps} stages {stages}{' evict' if evict else ''}"
        row(name, bench_kernels.device_time_us([lambda t=t: call(*t) for t in tables], dev,
                                               args.iters), nbytes)
    row("autotuned int8 (the server's call)", bench_kernels.device_time_us(
        [lambda t=t: hk.head_matmul_triton(hk.HeadFormat.INT8, x, *t) for t in tables], dev,
        args.iters), nbytes)
    best = min((r for r in rows if r["config"].startswith("BLOCK")), key=lambda r: r["us"])
    print(f"best config: {best['config']} {best['us']:.1f} us ({best['pct_copy']:.1f}% copy); "
          f"dense {rows[0]['us']:.1f} us; autotuned {rows[-1]['us']:.1f} us", flush=True)
    if args.out:
        json.dump(dict(gpu=torch.cuda.get_device_name(), copy_tb_s=copy_bw / 1e12, H=h, V=v,
                       rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
