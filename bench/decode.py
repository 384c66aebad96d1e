"""End-to-end decode: time to first token and tokens/s at tp 1/2/4, batch 1 and 8.

    python bench/decode.py [--model PATH] [--tp 1 2 4] [--batch 1 8] [--device cpu|cuda] \
        [--backend ray|local] [--prompt-len 128] [--gen 64] [--temperature 0 0.8] \
        [--out bench/results/decode.json]

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
from tpserve.serve.engine import Engine
from tpserve.serve.sampling_params import SamplingParams


def sampling(temperature: float, gen: int, seed: int) -> SamplingParams:
    """Greedy at temperature 0, else sampled as a chat client would (top_p 0.95, seeded)."""
    if not temperature:
        return SamplingParams(max_tokens=gen, ignore_eos=True)
    return SamplingParams(max_tokens=gen, ignore_eos=True, temperature=temperature, top_p=0.95,
                          seed=seed)


def run_batch(engine: Engine, prompts: list[list[int]], gen: int,
              temperature: float = 0.0) -> tuple[float, float]:
    """len(prompts) sequences admitted together, `gen` tokens each: (seconds from submission to
    the last sequence's first token, decode tokens/s after it), from the engine's token events."""
    first, last, done = {}, {}, threading.Semaphore(0)

    def on_event(ev):
        now = time.perf_counter()
        first.setdefault(ev.request_id, now)
        if ev.finished:
            last[ev.request_id] = now
            done.release()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(p, sampling(temperature, gen, i), on_event)
    for _ in prompts:
        done.acquire()
    start = max(first.values())
    return start - t0, len(prompts) * (gen - 1) / max(max(last.values()) - start, 1e-9)


def bench_one(path, tp, backend, device, dtype, batches, prompt_len, gen, lm_head="auto",
              bandwidth=None, allreduce="auto", decode_steps=(1,), head_at="auto",
              temperatures=(0.0,)) -> list[dict]:
    opts = {"progress": False, "allreduce": allreduce, "head_at": head_at} if backend == "ray" \
        else {}
    llm = tpserve.load(path, tp=tp, backend=backend, device=device, dtype=dtype,
                       num_slots=max(batches), max_model_len=prompt_len + gen + 8,
                       lm_head=lm_head, **opts)
    floor = floor_tok_s(llm, tp, backend, bandwidth) if bandwidth else None
    vocab = llm.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
    llm.generate(prompt[:16], max_tokens=4, ignore_eos=True)  # warm-up (kernels, autotune)
    rows = []
    for t, k, b in ((t, k, b) for t in temperatures for k in decode_steps for b in batches):
        engine = Engine(llm, decode_steps=k).start()
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(b)]
        run_batch(engine, prompts, 4, t)  # warm this batch shape
        ttft = min(run_batch(engine, prompts, 1, t)[0] for _ in range(3))
        stats = llm.executor.stats
        ar0 = (stats.allreduce_seconds, stats.allreduce_count)
        s0, steps0 = engine.stats.step_seconds, engine.stats.steps
        # Decode rate as the peer measures it: the tokens after the first, per second.
        tps = run_batch(engine, prompts, gen, t)[1]
        step_s = engine.stats.step_seconds - s0
        coord = getattr(llm.executor, "coord", None)
        row = {"tp": tp, "backend": backend, "device": device, "batch": b, "lm_head": lm_head,
               "decode_steps": k, "temperature": t,
               "allreduce": f"{coord.path} ({coord.carry})" if coord else "local",
               "ttft_ms": 1e3 * ttft, "decode_tok_s": tps,
               "step_ms": 1e3 * step_s / max(1, engine.stats.steps - steps0)}
        ar_s = stats.allreduce_seconds - ar0[0]
        row["allreduce_share"] = ar_s / step_s if step_s else 0.0
        row["allreduce_us"] = 1e6 * ar_s / max(1, stats.allreduce_count - ar0[1])
        if floor:
            row["floor_tok_s"] = floor * b  # batch b reads the weights once per step
            row["of_floor"] = tps / row["floor_tok_s"]
        rows.append(row)
        engine.stop()
    llm.close()
    return rows


def _greedy_tokens(path, tp, device, dtype, steps: int, graphs: bool, decode_steps: int = 1,
                   temperature: float = 0.0) -> list[list[int]]:
    """One sequence alone, then four admitted together that leave the batch at different steps
    (buckets 4, 2 and 1; the batch is the same in every run, so each step has the same shape).
    decode_steps > 1: the engine runs that many steps per call where it can (`decode_ids`, or
    `sample_burst`). temperature > 0: sampled (`sampling`, seeded per sequence) instead."""
    llm = tpserve.load(path, tp=tp, device=device, dtype=dtype, num_slots=4,
                       max_model_len=steps + 40, cuda_graphs=graphs)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, llm.cfg.vocab_size, (n,), generator=g).tolist()
               for n in (32, 7, 19, 3)]
    engine = Engine(llm, decode_steps=decode_steps)
    single = engine.generate(prompts[0], sampling(temperature, steps, 0))
    out, done = [[] for _ in prompts], threading.Semaphore(0)
    for i, prompt in enumerate(prompts):
        def on_event(ev, i=i):
            out[i].extend(ev.token_ids)
            if ev.finished:
                done.release()
        engine.submit(prompt, sampling(temperature, max(1, steps - 25 * i), i + 1), on_event)
    engine.start()  # all four are waiting: the first step admits them together
    for _ in prompts:
        done.acquire()
    engine.stop()
    llm.close()
    return [single] + out


def _first_differences(a, b) -> list[int | None]:
    return [next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), None) for x, y in zip(a, b)]


def check_prefill_rows(path, device, dtype) -> None:
    """tp=1: captured prefill steps (the step's tokens as decode rows, `graphs.prefill_rows`)
    against the eager step's attention (flash attention on the step's own q/k/v, or over the
    cache): the out rows' logits within 1e-2 of the largest, the same argmax. One prompt of 2-256
    tokens, two prompts together, a prompt beside a decode row, eight 128-token prompts (1024
    tokens) and five ragged ones."""
    from tpserve.model.kv_cache import StepPlan
    llm = tpserve.load(path, tp=1, device=device, dtype=dtype, num_slots=8, max_model_len=512)
    ex, g = llm.executor, torch.Generator().manual_seed(2)
    rank, head = ex.ranks[0], ex.rank_head
    plans = [StepPlan([0], [0], [n], out_rows=[n - 1]) for n in (2, 16, 37, 128, 200, 256)]
    plans.append(StepPlan([1, 0], [0, 0], [37, 100], out_rows=[36, 136]))
    plans.append(StepPlan([0, 1], [100, 0], [1, 60], out_rows=[0, 60]))  # decode row + prompt
    plans.append(StepPlan(list(range(8)), [0] * 8, [128] * 8,
                          out_rows=[128 * i + 127 for i in range(8)]))
    lens = [200, 256, 100, 37, 250]
    plans.append(StepPlan([3, 1, 4, 0, 2], [0] * 5, lens,
                          out_rows=[sum(lens[:i + 1]) - 1 for i in range(5)]))
    worst = 0.0
    for plan in plans:
        ids = torch.randint(3, llm.cfg.vocab_size, (plan.num_tokens,), generator=g)
        with torch.inference_mode():
            ref = head.logits(rank.run(head.embed(ids.to(rank.device)), plan, None)[plan.out_rows])
            assert ex.ranks[0].graphs.takes_prefill(plan), plan
            got, argmax = ex.step_ids(ids, plan)
            rel = float((got - ref).abs().max() / ref.abs().max())
        worst = max(worst, rel)
        if rel > 1e-2 or not torch.equal(argmax, ref.argmax(-1)):
            raise SystemExit(f"captured prefill {plan}: max rel {rel:.2e}, argmax "
                             f"{argmax.tolist()} vs eager {ref.argmax(-1).tolist()}")
    print(f"captured prefill steps vs eager attention ({len(plans)} steps: one prompt of 2-256 "
          f"tokens, two prompts, a prompt beside a decode row, 8x128 and 5 ragged prompts): max "
          f"rel {worst:.1e}, same argmax")
    llm.close()


def check_graphs(path, tps, device, dtype, steps: int) -> None:
    """The captured decode step and the eager one give identical greedy tokens, also where the
    captured steps run 8 at a time, each fed the last one's argmax on the device; seeded sampled
    tokens are the same at 8 steps per call as at 1. On a greedy difference, each mode runs
    again, to tell a captured-step bug from a mode that differs from itself."""
    if device == "cuda":
        check_prefill_rows(path, device, dtype)
    for tp in tps:
        run = lambda graphs: _greedy_tokens(path, tp, device, dtype, steps, graphs)  # noqa: E731
        graph, eager = run(True), run(False)
        burst = _greedy_tokens(path, tp, device, dtype, steps, True, decode_steps=8)
        print(f"graph, 8 steps per call, vs eager, tp={tp}: " + (
            "identical" if burst == eager else
            f"DIFFERENT (first differing step per sequence: {_first_differences(burst, eager)})"))
        if burst != eager:
            raise SystemExit(f"8 captured steps per call and eager decode disagree at tp={tp}")
        sampled = [_greedy_tokens(path, tp, device, dtype, steps, True, k, 0.8) for k in (8, 1)]
        print(f"sampled (seeded), graph, 8 steps per call vs 1, tp={tp}: " + (
            "identical" if sampled[0] == sampled[1] else
            f"DIFFERENT (first differing step per sequence: {_first_differences(*sampled)})"))
        if sampled[0] != sampled[1]:
            raise SystemExit(f"sampled bursts and single sampled steps disagree at tp={tp}")
        same = graph == eager
        print(f"graph vs eager, tp={tp}, {steps} greedy steps, batch 1 and 4: " + (
            "identical" if same else
            f"DIFFERENT (first differing step per sequence: {_first_differences(graph, eager)})"))
        if not same:
            print(f"  rerun: graph vs graph {_first_differences(graph, run(True))}, "
                  f"eager vs eager {_first_differences(eager, run(False))}")
            raise SystemExit(f"captured and eager decode disagree at tp={tp}")


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (the floor's bandwidth)."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / min(times)


def bytes_per_token(llm) -> tuple[int, int]:
    """Weight bytes one decode step must read: (every rank's shards + norms, the head)."""
    from tpserve.model.gptq_shard import GPTQWeight
    if llm.head is not None:
        total = llm.head.lm_head.nbytes + llm.head.norm.weight.numel() * llm.head.norm.weight.element_size()
    else:  # the head is on rank 0 (another process): its table's bytes from its format
        per_weight = {"dense": 2, "int8": 1, "q8_0": 34 / 32, "gptq": 0.5}[llm.lm_head]
        total = int(llm.cfg.vocab_size * llm.cfg.hidden_size * per_weight)
    head, total = total, 0
    ranks = getattr(llm.executor, "ranks", None)
    if ranks is None:  # Ray: the shards live in other processes; count from the checkpoint
        from tpserve.model.checkpoint import Checkpoint
        ck = Checkpoint(llm.path)
        for k in ck.keys():
            if k.startswith("model.layers."):
                n = 1
                for d in ck.shape(k):
                    n *= d
                total += n * (4 if ck.dtype(k) in ("I32", "F32") else 2)
        return total, head
    for rank in ranks:
        for m in rank.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, GPTQWeight):
                total += w.nbytes
            elif isinstance(w, torch.Tensor):
                total += w.numel() * w.element_size()
    return total, head


def floor_tok_s(llm, tp: int, backend: str, bandwidth: float) -> float:
    """Batch-1 tokens/s if the busiest GPU streamed its weights at copy speed: over Ray each rank
    has a GPU of its own and reads 1/tp of the layers, rank 0 also the head (one GPU holds it);
    in-process ranks share one GPU."""
    layers, head = bytes_per_token(llm)
    gpus = tp if backend == "ray" else 1
    return bandwidth / (layers / gpus + head)


def bench_transformers(path, batches, prompt_len, gen, device) -> list[dict]:
    """The peer: transformers' own model class on the same weights dequantized to bf16."""
    from tpserve.model.hf_reference import load_hf_model
    model = load_hf_model(path, torch.bfloat16, device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        ids = torch.randint(3, model.config.vocab_size, (b, prompt_len), generator=g).to(device)
        kw = dict(do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up

        def timed(n):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        ttft = timed(1)
        rows.append({"tp": 1, "backend": "transformers-bf16", "device": device, "batch": b,
                     "ttft_ms": 1e3 * ttft, "decode_tok_s": b * gen / timed(gen)})
    return rows  # the model goes with this frame; the caller empties the CUDA cache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="ray", choices=["ray", "local"])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--lm-head", nargs="+", default=["auto"])
    ap.add_argument("--head-at", default="auto", choices=["auto", "coordinator", "rank0"],
                    help="where Ray ranks' head runs (decode bursts need it on rank 0)")
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1],
                    help="decode steps per engine call to compare (e.g. 1 8): bursts where the "
                         "ranks hold the head, greedy or sampled")
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0],
                    help="0: greedy; > 0: sampled (top_p 0.95, seeded), where each step's logits "
                         "go to the sampler (e.g. 0 0.8)")
    ap.add_argument("--allreduce", nargs="+", default=["auto"],
                    help="all-reduce paths to compare at tp > 1 over Ray (e.g. cuda nccl)")
    ap.add_argument("--peer", nargs="+", choices=["none", "transformers", "torch-int4"],
                    default=["none"])
    ap.add_argument("--check", type=int, default=0, metavar="STEPS",
                    help="first compare STEPS greedy tokens of the captured and the eager step")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.model:
        path = args.model
    else:
        from tpserve import demo
        path = demo.demo_path()
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if args.device == "cpu" else torch.float16)
    if args.check:
        check_graphs(path, args.tp, args.device, dtype, args.check)
    bandwidth = copy_bandwidth(args.device) if args.device == "cuda" else None
    rows = []
    if "transformers" in args.peer:
        rows += bench_transformers(path, args.batch, args.prompt_len, args.gen, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "torch-int4" in args.peer:
        from peer_int4 import bench as bench_peer
        cfg = json.loads(open(os.path.join(path, "config.json")).read())
        rows += bench_peer(cfg, args.batch, args.prompt_len, args.gen, args.device)
    for tp in args.tp:
        backend = "local" if tp == 1 and args.backend == "ray" and args.device == "cuda" \
            else args.backend  # one GPU, one process: no sockets needed
        for head in args.lm_head:
            for ar in args.allreduce if backend == "ray" and tp > 1 else ["auto"]:
                rows += bench_one(path, tp, backend, args.device, dtype, args.batch,
                                  args.prompt_len, args.gen, head, bandwidth, ar,
                                  args.decode_steps, args.head_at, args.temperature)
    print(f"{'tp':>3} {'backend':>17} {'head':>5} {'all-reduce':>22} {'k':>2} {'temp':>4} "
          f"{'batch':>5} {'TTFT ms':>8} "
          f"{'tok/s':>8} {'step ms':>8} {'all-reduce %':>12} {'of floor':>8}")
    for r in rows:
        share = f"{100 * r['allreduce_share']:.0f}%" if "allreduce_share" in r else "-"
        fl = f"{100 * r['of_floor']:.0f}%" if "of_floor" in r else "-"
        print(f"{r['tp']:>3} {r['backend']:>17} {r.get('lm_head', '-'):>5} "
              f"{r.get('allreduce', '-'):>22} {r.get('decode_steps', 1):>2} "
              f"{r.get('temperature', 0):>4g} {r['batch']:>5} "
              f"{r['ttft_ms']:>8.1f} {r['decode_tok_s']:>8.1f} {r.get('step_ms', 0):>8.2f} "
              f"{share:>12} {fl:>8}")
    for r in rows:  # tpserve / each peer, same batch, same run
        for peer in (p for p in rows if p["backend"] in ("torch-int4-peer", "transformers-bf16")):
            if r["backend"] in ("local", "ray") and peer["batch"] == r["batch"]:
                key = f"vs_{peer['backend']}"
                r[key] = r["decode_tok_s"] / peer["decode_tok_s"]
                r[key + "_ttft"] = r["ttft_ms"] / peer["ttft_ms"]
                print(f"tp={r['tp']} head={r['lm_head']} {r['allreduce']} k={r['decode_steps']} "
                      f"temperature={r['temperature']:g} "
                      f"batch={r['batch']}: "
                      f"tok/s {r[key]:.2f}x "
                      f"{peer['backend']}, TTFT {r[key + '_ttft']:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"model": str(path), "device": args.device, "dtype": str(dtype),
                "copy_bandwidth_Bps": bandwidth,
                "prompt_len": args.prompt_len, "gen": args.gen, "cpus": os.cpu_count(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
