"""Decode attention on the GPU: Triton kernel vs its torch reference vs SDPA on a gathered batch.

    python bench/attention.py [--out bench/results/attention_h100.json]  # parity, graph, times
    python bench/attention.py --sweep          # also time block_n x splits x warps per shape

Parity first (every dtype the GPU runs, bf16 included, which the CPU interpreter cannot check):
Llama/Gemma-like head shapes, GQA, window, soft-cap, mixed lengths with 0, 1 and the cache length,
and cache positions no sequence may see filled with NaN. Then one CUDA-graph check: the kernel is
captured once, new slots and lengths are written into its static inputs, and the replay must match
the reference. Then times at B = 1, 8, 32, L = 128, 256, 512, 2048 (every sequence L long in a
4096-position cache), H 32, KVH 8, D 128, fp16/bf16: median of CUDA-event pairs around runs of back-to-back calls
enqueued behind a GPU sleep (host launch cost not timed), each call on another layer's cache so L2
never holds the next call's keys. GB/s counts the k/v bytes a call must read (compare with the
3.0 TB/s device copy bandwidth in FACTS.md). `sdpa` is F.scaled_dot_product_attention after an
index_select gather of the batch's slots up to L (what a padded-batch engine does; no key mask,
since every timed sequence is L long, so SDPA may use its flash kernel);
`reference` is decode_attention_reference (fp32 einsum, reads max(lens) on the host); `all
splits` the kernel with every split of its grid used whatever the length (one_keys=0, the A/B of
ONE_SPLIT_KEYS).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tpserve.kernels.attention import (decode_attention, decode_attention_reference,  # noqa: E402
                                       decode_attention_triton)

MAX_LEN = 4096
PARITY_HEADS = [(32, 8, 128), (4, 4, 64), (16, 8, 256), (8, 1, 96)]  # H, KVH, D
PARITY_MODES = [(None, None), (1024, None), (None, 50.0), (700, 30.0)]  # window, softcap


def problem(b, heads, dtype, lens, slots_n=None, max_len=MAX_LEN, seed=0):
    h, kvh, d = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    slots_n = slots_n or b
    q = torch.randn(b, h, d, device="cuda", generator=gen).to(dtype)
    kc = torch.randn(slots_n, max_len, kvh, d, device="cuda", generator=gen).to(dtype)
    vc = torch.randn(slots_n, max_len, kvh, d, device="cuda", generator=gen).to(dtype)
    slots = torch.randperm(slots_n, device="cuda", generator=gen)[:b]
    return q, kc, vc, slots, torch.tensor(lens, dtype=torch.int32, device="cuda")


def poison(kc, vc, slots, lens, window):
    """NaN into every cache position the step must not read."""
    visible = torch.zeros(kc.shape[:2], dtype=torch.bool, device=kc.device)
    for slot, n in zip(slots.tolist(), lens.tolist()):
        visible[slot, max(0, n - window) if window else 0:n] = True
    kc[~visible] = float("nan")
    vc[~visible] = float("nan")


def max_err(out, q, kc, vc, slots, lens, group, scale, window, softcap):
    ref = decode_attention_reference(q.float(), kc.float(), vc.float(), slots, lens, group, scale,
                                     window, softcap)
    return (out.float() - ref).abs().max().item()


def parity():
    """Triton vs reference on the GPU; tolerance: the output's rounding plus p rounded for p @ V.
    Splits: the heuristic's (several here, so the in-kernel merge runs) and 1 (no merge)."""
    rows, ok = [], True
    lens = [0, 1, MAX_LEN // 2 - 3, MAX_LEN, 700, 33]
    cases = [(heads, mode, None) for heads in PARITY_HEADS for mode in PARITY_MODES]
    cases += [(PARITY_HEADS[0], mode, 1) for mode in PARITY_MODES]
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 8e-3), (torch.bfloat16, 6e-2)]:
        for heads, (window, softcap), splits in cases:
            q, kc, vc, slots, lt = problem(len(lens), heads, dtype, lens, slots_n=8)
            poison(kc, vc, slots, lt, window)
            args = (q, kc, vc, slots, lt, heads[0] // heads[1], heads[2] ** -0.5, window, softcap)
            out = decode_attention_triton(*args, num_splits=splits)
            err = max_err(out, *args)
            good = err <= tol and out[0].eq(0).all().item()
            ok &= good
            rows.append({"dtype": str(dtype)[6:], "heads": heads, "window": window,
                         "softcap": softcap, "splits": splits, "max_err": err, "ok": good})
            print(f"parity {str(dtype)[6:]:>8} H/KVH/D {'/'.join(map(str, heads)):>10} "
                  f"window {str(window):>5} softcap {str(softcap):>5} splits {splits or 'auto':>4} "
                  f"max|err| {err:.2e} {'ok' if good else 'FAIL'}")
    return rows, ok


def graph_check(dtype=torch.float16, heads=(32, 8, 128), b=8):
    """Capture once with one plan, replay with another written into the same static buffers."""
    q, kc, vc, slots, lens = problem(b, heads, dtype, [MAX_LEN] * b, slots_n=2 * b)
    group, scale = heads[0] // heads[1], heads[2] ** -0.5
    decode_attention(q, kc, vc, slots, lens, group, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, kc, vc, slots, lens, group, scale)
    new_lens = [0, 1, 17, 4096, 129, 2048, 0, 3000][:b]
    lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    slots.copy_(torch.randperm(2 * b, device="cuda")[:b])
    q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    err = max_err(out, q, kc, vc, slots, lens, group, scale, None, None)
    print(f"graph  {str(dtype)[6:]} B={b} replay with new slots/lengths: max|err| {err:.2e}")
    return err


def time_us(fn, reps=20, trials=7):
    """Median over trials of (time of `reps` back-to-back calls) / reps, behind a GPU sleep."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # ~10 ms: the host enqueues every call before the GPU starts
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def sdpa_gathered(q, kc, vc, slots, group, scale, n):
    """A padded-batch engine's decode attention: gather the slots up to n, one SDPA call. Every
    timed sequence is n long, so no key mask: SDPA may pick its fastest (flash) kernel."""
    k = kc.index_select(0, slots)[:, :n].transpose(1, 2)  # (B, KVH, n, D)
    v = vc.index_select(0, slots)[:, :n].transpose(1, 2)
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=group > 1)
    return o[:, :, 0]  # (B, H, D)


def bench_shape(b, n, dtype, heads, sweep):
    h, kvh, d = heads
    group, scale = h // kvh, d ** -0.5
    kv_bytes = b * n * kvh * d * 2 * torch.finfo(dtype).bits // 8
    layers = max(2, math.ceil(100e6 / kv_bytes))  # rotate caches: L2 (50 MB) never holds them
    probs = [problem(b, heads, dtype, [n] * b, seed=i) for i in range(layers)]
    it = itertools.count()

    def rot(f, **kw):
        return lambda: f(*probs[next(it) % layers][:5], group, scale, **kw)

    row = {"B": b, "L": n, "dtype": str(dtype)[6:], "H": h, "KVH": kvh, "D": d,
           "triton_us": time_us(rot(decode_attention)),
           # every split of the grid used, whatever the length (before ONE_SPLIT_KEYS)
           "every_split_us": time_us(rot(decode_attention_triton, one_keys=0)),
           "reference_us": time_us(rot(decode_attention_reference), reps=3, trials=3),
           "sdpa_us": time_us(lambda: sdpa_gathered(*probs[next(it) % layers][:4], group, scale,
                                                    n))}
    row["triton_GBps"] = kv_bytes / row["triton_us"] / 1e3
    q, kc, vc, slots, lens = probs[0]
    row["triton_err"] = max_err(decode_attention(q, kc, vc, slots, lens, group, scale),
                                q, kc, vc, slots, lens, group, scale, None, None)
    row["sdpa_err"] = max_err(sdpa_gathered(q, kc, vc, slots, group, scale, n),
                              q, kc, vc, slots, lens, group, scale, None, None)
    if sweep:
        configs = [(bn, s, w) for bn in (16, 32, 64, 128) for s in (1, 2, 4, 8, 16, 32)
                   for w in (4, 8)]
        row["sweep"] = {f"bn{bn}_s{s}_w{w}": time_us(rot(decode_attention_triton, block_n=bn,
                                                         num_splits=s, num_warps=w, one_keys=0),
                                                     trials=3)
                        for bn, s, w in configs}
        row["sweep_best"] = min(row["sweep"], key=row["sweep"].get)
    best = f"  best {row['sweep_best']} {row['sweep'][row['sweep_best']]:.1f} us" if sweep else ""
    print(f"{b:>3} {n:>5} {row['dtype']:>8} {row['triton_us']:>9.1f} {row['every_split_us']:>9.1f} "
          f"{row['triton_GBps']:>7.0f} "
          f"{row['sdpa_us']:>8.1f} {row['reference_us']:>9.1f} "
          f"{row['sdpa_us'] / row['triton_us']:>8.2f}x {row['triton_err']:>9.2e} "
          f"{row['sdpa_err']:>9.2e}{best}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="time block_n x splits x warps per shape")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lens", type=int, nargs="+", default=[128, 256, 512, 2048])
    ap.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16"],
                    default=["float16", "bfloat16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU; on CPU run "
                 "`python -m pytest tests/test_attention_kernels.py` (Triton interpreter)")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    parity_rows, ok = parity()
    graph_err = graph_check()
    ok &= graph_err <= 8e-3
    print(f"{'B':>3} {'L':>5} {'dtype':>8} {'triton us':>9} {'all splits':>9} {'GB/s':>7} "
          f"{'sdpa us':>8} "
          f"{'ref us':>9} {'vs sdpa':>9} {'triton err':>9} {'sdpa err':>9}")
    rows = [bench_shape(b, n, dtype, (32, 8, 128), args.sweep)
            for dtype in [getattr(torch, t) for t in args.dtype] for n in args.lens
            for b in args.batch]
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "parity": parity_rows, "graph_err": graph_err,
                                              "times": rows}, indent=1))
    print("parity and graph check:", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
