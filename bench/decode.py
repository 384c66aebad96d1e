"""End-to-end decode: time to first token and tokens/s at tp 1/2/4, batch 1 and 8.

    python bench/decode.py [--model PATH] [--tp 1 2 4] [--batch 1 8] [--device cpu|cuda] \
        [--backend ray|local] [--prompt-len 128] [--gen 64] [--out bench/results/decode.json]

Without --model it runs the embedded demo checkpoint. Each configuration loads the model once,
warms up, then measures: TTFT (one prefill of prompt-len tokens + the first sampled token) and
decode tokens/s (batch sequences decoding together through the engine's continuous batching).
With the Ray backend it also reports the share of step time spent in the coordinator's
all-reduces (first partial in -> sum sent, summed over the step's reductions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

import tpserve
from tpserve.engine import Engine
from tpserve.sampling import SamplingParams


def run_batch(engine: Engine, prompts: list[list[int]], gen: int) -> float:
    """Decode tokens/s of len(prompts) sequences generating `gen` tokens each."""
    params = SamplingParams(max_tokens=gen, ignore_eos=True)
    done = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda p=p: done.append(engine.generate(p, params)))
               for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(len(d) for d in done) / (time.perf_counter() - t0)


def bench_one(path, tp, backend, device, dtype, batches, prompt_len, gen) -> list[dict]:
    opts = {"progress": False} if backend == "ray" else {}
    llm = tpserve.load(path, tp=tp, backend=backend, device=device, dtype=dtype,
                       num_slots=max(batches), max_model_len=prompt_len + gen + 8, **opts)
    vocab = llm.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
    llm.generate(prompt[:16], max_tokens=4, ignore_eos=True)  # warm-up (kernels, autotune)
    ttfts = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate(prompt, max_tokens=1, ignore_eos=True)
        ttfts.append(time.perf_counter() - t0)
    engine = Engine(llm).start()
    rows = []
    for b in batches:
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(b)]
        run_batch(engine, prompts, 4)  # warm this batch shape
        stats = getattr(llm.executor, "stats", None)
        ar0 = (stats.allreduce_seconds, stats.allreduce_count) if stats else (0.0, 0)
        s0, steps0 = engine.stats.step_seconds, engine.stats.steps
        tps = run_batch(engine, prompts, gen)
        step_s = engine.stats.step_seconds - s0
        row = {"tp": tp, "backend": backend, "device": device, "batch": b,
               "ttft_ms": 1e3 * min(ttfts), "decode_tok_s": tps,
               "step_ms": 1e3 * step_s / max(1, engine.stats.steps - steps0)}
        if stats:
            ar_s = stats.allreduce_seconds - ar0[0]
            row["allreduce_share"] = ar_s / step_s if step_s else 0.0
            row["allreduce_us"] = 1e6 * ar_s / max(1, stats.allreduce_count - ar0[1])
        rows.append(row)
    engine.stop()
    llm.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="ray", choices=["ray", "local"])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.model:
        path = args.model
    else:
        from tpserve import demo
        path = demo.demo_path()
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if args.device == "cpu" else torch.float16)
    rows = []
    for tp in args.tp:
        rows += bench_one(path, tp, args.backend, args.device, dtype, args.batch, args.prompt_len,
                          args.gen)
    print(f"{'tp':>3} {'batch':>5} {'TTFT ms':>8} {'tok/s':>8} {'step ms':>8} {'all-reduce %':>12}")
    for r in rows:
        share = f"{100 * r['allreduce_share']:.0f}%" if "allreduce_share" in r else "-"
        print(f"{r['tp']:>3} {r['batch']:>5} {r['ttft_ms']:>8.1f} {r['decode_tok_s']:>8.1f} "
              f"{r['step_ms']:>8.2f} {share:>12}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"model": str(path), "device": args.device, "dtype": str(dtype),
                "prompt_len": args.prompt_len, "gen": args.gen, "cpus": os.cpu_count(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
