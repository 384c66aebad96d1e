"""Greedy tokens with the decode GEMVs' fixed-point sums (default, kernels/fixed_sum.py)
against the written outputs, the same checkpoint loaded both ways in one process, on a GPU.

    python bench/fixed_sum_check.py --model /tmp/small [--prompts 4] [--tokens 64] [--eager]
                                    [--device cpu] [--tp 2]

--tp 2: Ray ranks on two GPUs of one host (the one-shot all-reduce takes the row-parallel GEMVs'
fixed-point sums).

The two differ at most by a rounding of a GEMV output (int64 -> fp32 -> fp16 against a fp32 sum
-> fp16), so tokens may part only where two logits nearly tie: the first step where they part is
printed. Each way's tokens are also compared with its own second run (the fixed-point buffers
must be left zeroed between steps).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import tpserve


def run(model: str, fixed: bool, prompts: list[list[int]], tokens: int, device: str,
        graphs: bool, tp: int):
    """tp > 1: Ray ranks (one a process, the one-shot all-reduce taking the row-parallel
    sums; the rank processes inherit TPSERVE_FIXED_SUM)."""
    os.environ["TPSERVE_FIXED_SUM"] = "all" if fixed else "0"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if tp > 1:
        llm = tpserve.load(model, tp=tp, backend="ray", device=device, dtype=dtype,
                           progress=False)
    else:
        llm = tpserve.load(model, tp=1, device=device, dtype=dtype, cuda_graphs=graphs)
        assert (llm.executor.ranks[0].fixed_sums is not None) == fixed
    outs = [[llm.generate(p, max_tokens=tokens, ignore_eos=True) for p in prompts]
            for _ in range(2)]
    llm.close()
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs: eager decode steps")
    ap.add_argument("--device", default="cuda", help="cpu: a plumbing check (no fixed-point sums)")
    ap.add_argument("--tp", type=int, default=1, help="> 1: Ray ranks, the opt-in tp > 1 sums")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (8 + 5 * i,), generator=gen).tolist()
               for i in range(args.prompts)]
    written = run(args.model, False, prompts, args.tokens, args.device, not args.eager, args.tp)
    fixed = run(args.model, True, prompts, args.tokens, args.device, not args.eager, args.tp)
    ok = True
    for name, (a, b) in (("written", written), ("fixed-point", fixed)):
        same = a == b
        ok &= same
        print(f"{name} sums, second run vs first: {'identical' if same else 'DIFFER'}")
    for i, (a, b) in enumerate(zip(written[0], fixed[0])):
        part = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        print(f"prompt {i}: fixed-point vs written sums "
              + ("identical" if part is None else f"part at step {part} ({a[part]} vs {b[part]})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
