"""Profile decode steps of one model with torch.profiler: where a step's time goes.

    python bench/profile_step.py --model PATH [--device cuda] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import tpserve


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    llm = tpserve.load(args.model, tp=1, device=args.device, dtype=getattr(torch, args.dtype),
                       max_model_len=256)
    ids = list(range(3, 131))
    llm.generate(ids, max_tokens=4, ignore_eos=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        llm.generate(ids, max_tokens=args.steps, ignore_eos=True)
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
