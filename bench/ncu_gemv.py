"""One GEMV call per shape for Nsight Compute: tpserve's M = 1 GPTQ kernel and tinygemm side by side.

    ncu --profile-from-start off --clock-control none --set detailed python bench/ncu_gemv.py

Each shape's kernels are autotuned and warmed before cudaProfilerStart, so ncu sees exactly one
launch of each (the split-K sum is inside tpserve's kernel); `bash bench/gpu_kernels.sh ncu` runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # bench/kernels.py (its name clashes with the kernels/ package)
from tpserve.kernels import gptq_matmul  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--variants", nargs="+", default=["w4g128"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    calls = []
    for kn in args.shapes.split(","):
        k, n = map(int, kn.split("x"))
        x = torch.randn(1, k, device=dev).half()
        for v in args.variants:
            w, p = bench.make_variant(v, k, n, dev)
            calls.append((f"{v} {kn}", lambda w=w, p=p, x=x: gptq_matmul(x, w, p)))
        f, _ = bench.tinygemm(k, n, dev)
        xb = x.bfloat16()
        calls.append((f"tinygemm {kn}", lambda f=f, xb=xb: f(xb)))
    for _, f in calls:  # autotune, compile
        f(), f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, f in calls:
        torch.cuda.nvtx.range_push(name)
        f()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("\n".join(name for name, _ in calls))


if __name__ == "__main__":
    main()
