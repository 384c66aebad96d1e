"""Where a decode step's time goes: the whole step (engine, host), the captured rank step
alone, the head + sampler, and a torch.profiler kernel table of the captured step.

    python bench/profile_step.py --model PATH [--device cuda] [--steps 8] [--batch 1]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import tpserve


def cuda_ms(fn, n=50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def time_parts(llm, batch: int) -> None:
    """ms per call of: the captured step's replay (ids -> logits -> argmax where the head is in
    the graph), the engine's step function with its host work (plan upload, replay, tokens to the
    host), and the eager parts (padded eager rank step, head) for comparison."""
    from tpserve.model.kv_cache import StepPlan
    rank = llm.executor.ranks[0]
    plan = StepPlan(slots=list(range(batch)), starts=[100] * batch, lens=[1] * batch)
    ids = torch.arange(3, 3 + batch)
    bucket = rank.graphs.buckets[batch]
    replay = cuda_ms(lambda: bucket.replay(rank.comm))
    step = cuda_ms(lambda: llm.step(ids, plan)[0].argmax(-1).tolist())
    h = llm.head.embed(ids)
    eager = cuda_ms(lambda: rank.run_padded(h, plan), n=10)
    out = rank.run_padded(h, plan)
    head = cuda_ms(lambda: llm.head.logits(out))
    print(f"batch {batch}: graph replay {replay:.3f} ms ({'with' if rank.graphs.with_head else 'without'}"
          f" the head), LLM.step + tokens to host {step:.3f} ms, eager padded rank step "
          f"{eager:.3f} ms, eager head {head:.3f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lm-head", default="auto")
    args = ap.parse_args()
    llm = tpserve.load(args.model, tp=1, device=args.device, dtype=getattr(torch, args.dtype),
                       max_model_len=256, num_slots=max(8, args.batch), lm_head=args.lm_head)
    ids = list(range(3, 131))
    llm.generate(ids, max_tokens=4, ignore_eos=True)
    if args.device == "cuda":
        time_parts(llm, args.batch)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        llm.generate(ids, max_tokens=args.steps, ignore_eos=True)
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
