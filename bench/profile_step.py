"""Where a decode step's time goes: the whole step (engine, host), the captured rank step
alone, the head + sampler, and a torch.profiler kernel table of the captured step. With
`--prefill N`: where a first token's time goes instead (an N-token prompt, one new token): wall
time against the GPU's busy time, kernel launches, and the kernels by GPU time.

    python bench/profile_step.py --model PATH [--device cuda] [--steps 8] [--batch 1]
    python bench/profile_step.py --model PATH --prefill 128 [--batch 8]
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
          f"{eager:.3f} ms, eager head {head:.3f} ms; the captured graphs hold "
          f"{rank.graphs.memory_bytes / 2**20:.0f} MiB of GPU memory "
          f"(decode buckets {sorted(rank.graphs.buckets)}, prefill {sorted(rank.graphs.prefill)})")


def replay_kernels(llm, batch: int, replays: int = 5) -> None:
    """The captured decode step's kernels, grouped by (name, grid, block): calls per step, mean
    us, us per step (kernels that overlap under PDL each count their own span), ordered by the
    step's total; from a chrome trace of `replays` replays."""
    import collections
    import json
    import os
    import tempfile
    rank = llm.executor.ranks[0]
    bucket = rank.graphs.buckets[batch]
    bucket.replay(rank.comm)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            bucket.replay(rank.comm)
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    prof.export_chrome_trace(path)
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
    os.unlink(path)
    groups = collections.defaultdict(list)
    for e in events:
        a = e.get("args", {})
        groups[(e["name"][:48], tuple(a.get("grid", ())), tuple(a.get("block", ())))].append(e["dur"])
    print(f"batch {batch}: {len(events) / replays:.0f} kernels a step, their spans summed "
          f"{sum(e['dur'] for e in events) / replays / 1e3:.3f} ms a step")
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    for (name, grid, block), durs in rows[:40]:
        print(f"  {name:48s} grid {str(grid):16s} block {str(block):14s} {len(durs) / replays:6.1f}/step "
              f"{sum(durs) / len(durs):8.2f} us  {sum(durs) / replays:9.1f} us/step")


def profile_prefill(llm, n: int, device: str, batch: int = 1) -> None:
    """TTFT's parts for an n-token prompt: wall ms of `generate(max_tokens=1)` (median of 10), the
    GPU's busy ms inside one (kernel time summed), the launches, and the kernels by GPU time.
    batch > 1: one step of `batch` n-token prompts (`LLM.step`, first tokens to the host)."""
    import statistics
    import time

    from tpserve.model.kv_cache import StepPlan
    ids = list(range(3, 3 + n))
    if batch == 1:
        def first():
            llm.generate(ids, max_tokens=1, ignore_eos=True)
    else:
        plan = StepPlan(slots=list(range(batch)), starts=[0] * batch, lens=[n] * batch)
        step_ids = torch.tensor([t + b for b in range(batch) for t in ids])

        def first():
            llm.step(step_ids, plan)[0].argmax(-1).tolist()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    walls = []
    for _ in range(11):
        sync()
        t0 = time.perf_counter()
        first()
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        first()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3
    print(f"prefill {batch} x {n} tokens: wall {statistics.median(walls[1:]):.2f} ms (median of 10), GPU busy "
          f"{busy:.2f} ms in {len(kernels)} kernels ({busy / statistics.median(walls[1:]):.0%})")
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=24, max_name_column_width=70))
    host_profile(first, sync)


def host_profile(fn, sync) -> None:
    """Where the host's time goes in `fn` (cProfile, the last of 3 calls): by own time, and the
    calls that wait for the GPU (synchronize, .item(), .tolist(), .cpu())."""
    import cProfile
    import pstats
    for _ in range(2):
        fn()
    sync()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    sync()
    pr.disable()
    st = pstats.Stats(pr)
    print(f"host: {st.total_tt * 1e3:.2f} ms in {st.total_calls} Python calls (cProfile slows "
          f"them); by own time:")
    st.sort_stats("tottime").print_stats(22)
    st.sort_stats("cumulative").print_stats(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lm-head", default="auto")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="profile a first token of an N-token prompt instead of decode steps")
    args = ap.parse_args()
    llm = tpserve.load(args.model, tp=1, device=args.device, dtype=getattr(torch, args.dtype),
                       max_model_len=max(256, 2 * args.prefill), num_slots=max(8, args.batch), lm_head=args.lm_head)
    ids = list(range(3, 131))
    llm.generate(ids, max_tokens=4, ignore_eos=True)
    if args.prefill:
        profile_prefill(llm, args.prefill, args.device, args.batch)
        return 0
    if args.device == "cuda":
        time_parts(llm, args.batch)
        replay_kernels(llm, args.batch)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        llm.generate(ids, max_tokens=args.steps, ignore_eos=True)
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
