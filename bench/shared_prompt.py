"""n choices of one prompt: prefilled once (`Engine.submit_many`, as the server submits n) against
the same requests submitted one by one (each prefilling the prompt), in the same run.

    python bench/shared_prompt.py [--model PATH] [--n 8] [--prompt-len 500] [--gen 4]
        [--device cpu] [--dtype float32] [--runs 2]

Prints, per mode and run: the time until every choice has its first token, until all have
finished, and the prompt tokens not prefilled (`tpserve_prompt_tokens_shared`).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

import tpserve
from tpserve.demo import demo_path
from tpserve.serve.engine import Engine
from tpserve.serve.sampling_params import SamplingParams


def run(llm, prompt: list[int], n: int, gen: int, shared: bool) -> dict:
    engine, done, first = Engine(llm), threading.Semaphore(0), {}
    params = [SamplingParams(max_tokens=gen, temperature=0.8, seed=i, ignore_eos=True)
              for i in range(n)]
    t0 = time.perf_counter()

    def on_event(ev, i):
        first.setdefault(i, time.perf_counter() - t0)
        if ev.finished:
            done.release()
    callbacks = [lambda ev, i=i: on_event(ev, i) for i in range(n)]
    if shared:
        engine.submit_many(prompt, params, callbacks)
    else:
        for p, cb in zip(params, callbacks):
            engine.submit(prompt, p, cb)
    engine.start()
    try:
        for _ in range(n):
            assert done.acquire(timeout=600), "a choice did not finish"
    finally:
        engine.stop()
    return dict(mode="shared" if shared else "separate", first_tokens_s=max(first.values()),
                total_s=time.perf_counter() - t0, shared_tokens=engine.stats.prompt_tokens_shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=500)
    ap.add_argument("--gen", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    llm = tpserve.load(args.model or demo_path(), tp=1, device=args.device,
                       dtype=getattr(torch, args.dtype), num_slots=args.n,
                       max_model_len=args.prompt_len + args.gen + 1)
    try:
        vocab = llm.cfg.vocab_size
        prompt = [(7 * i) % (vocab - 3) + 3 for i in range(args.prompt_len)]
        run(llm, prompt, args.n, args.gen, True)  # warm-up
        rows = [run(llm, prompt, args.n, args.gen, shared)
                for _ in range(args.runs) for shared in (False, True)]
    finally:
        llm.close()
    for r in rows:
        print(f"{r['mode']:>8}: every first token {1e3 * r['first_tokens_s']:8.1f} ms, all done "
              f"{1e3 * r['total_s']:8.1f} ms, prompt tokens not prefilled {r['shared_tokens']}")
    sep = min(r["first_tokens_s"] for r in rows if r["mode"] == "separate")
    sha = min(r["first_tokens_s"] for r in rows if r["mode"] == "shared")
    print(f"first tokens: shared {sha / sep:.2f}x the separate requests' time")


if __name__ == "__main__":
    main()
