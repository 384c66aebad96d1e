"""Kernel benchmark: tpserve's GPTQ and lm_head kernels vs bf16 cuBLAS, tinygemm and copy bandwidth.

    python bench/kernels.py --out bench/results/kernels_h100.json   # on a GPU, ~3-4 min on an H100
    python bench/kernels.py --smoke                                 # CPU: tiny shapes, torch paths
    python bench/kernels.py --check                                 # GPU parity of every kernel path

Every shape's weights are rotated over enough copies (>= 2, >= 100 MB in all) that L2 (50 MB on an
H100) never holds the next call's weights. Times are the median of CUDA-event pairs around single
calls, enqueued behind a GPU sleep so that the host's launch cost is not timed (`eager_us` is the
host-bound wall time per call instead). `%copy` is (compressed weight + activation bytes) / time,
over the measured device-to-device copy bandwidth (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tpserve.kernels import gptq_matmul  # noqa: E402
from tpserve.kernels.gptq_weight import gptq_matmul_reference, random_weight  # noqa: E402
from tpserve.model.gptq_shard import prepare_act_order  # noqa: E402

# K x N: Llama-3-8B's layers, merged q/k/v and gate/up, each rank's shapes at tp 2 and 4, 70B-class.
GPTQ_SHAPES = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 28672),
               (4096, 3072), (2048, 4096), (7168, 4096), (4096, 1536), (3584, 4096),
               (8192, 8192), (8192, 28672)]
HEAD_SHAPES = [(4096, 128256), (2048, 262144)]  # H x V
GPTQ_M, HEAD_M = (1, 4, 16), (1, 8)
PREFILL = [((4096, 14336), 64), ((4096, 14336), 512)]  # tl.dot; dequant + cuBLAS
# w4g128_fp32: the M = 1 GEMV without its fp16x2 path (the A/B of that path, M = 1 only);
# w4g128_dot: M > 1 through the tl.dot decode kernel only (w4g128 takes the faster of it and the
# fp16x2 rows kernel, measured on first use, up to M = 4 here; the server offers it at M = 2);
# w4g128_fixed: the M = 1 GEMV adding into a fixed-point buffer, no split-K ticket (what a tp=1
# decode step runs, kernels/fixed_sum.py; its reader's take is not timed here)
VARIANTS = ["w4g128", "w4g128_fixed", "w4g128_fp32", "w4g128_dot", "w4g128_off64", "w4_act",
            "w4_act_shard", "w8g128"]
M1_ONLY = ("w4g128_fp32", "w4g128_fixed")
# Not in the default table: one few-rows kernel forced at M >= 2 (w4g128 is dispatch's pick)
FORCED = {"w4g128_per_field": "decode", "w4g128_per_tile": "rows", "w4g128_fp16x2": "h2mm"}
L2_BYTES = 50e6
SHAPES = None  # --shapes


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def device_time_us(fns, dev, iters):
    """Median time of one call (us), fns rotated; each fn's first call (autotune, compile: act-order
    copies differ in K, so each may tune or specialize anew) untimed."""
    for f in fns:
        f()
    sync(dev)
    if dev.type != "cuda":
        ts = []
        for i in range(iters):
            t = time.perf_counter()
            fns[i % len(fns)]()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time while the host enqueues every call
    for i, (a, b) in enumerate(events):
        a.record()
        fns[i % len(fns)]()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e3


def eager_us(fns, dev, iters=50):
    """Wall time per call of a plain loop: the host's launch cost when it exceeds the GPU's."""
    sync(dev)
    t = time.perf_counter()
    for i in range(iters):
        fns[i % len(fns)]()
    sync(dev)
    return (time.perf_counter() - t) / iters * 1e6


def copy_bandwidth(dev, nbytes):
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = device_time_us([lambda: dst.copy_(src)], dev, 20)
    return 2 * nbytes / (t * 1e-6)


def n_copies(nbytes, smoke):
    return 2 if smoke else max(2, math.ceil(2 * L2_BYTES / nbytes))


def make_variant(name, k, n, dev):
    """(GPTQWeight, perm) for one benchmark variant."""
    bits = 8 if name.startswith("w8") else 4
    w = random_weight(k, n, bits, 128, 64 if name.endswith("off64") else 0, device=dev)
    if name == "w4_act":  # unsharded act-order: groups of 128 in a random row order
        order = torch.randperm(k, device=dev)
        w.g_idx = torch.empty(k, dtype=torch.int32, device=dev)
        w.g_idx[order] = (torch.arange(k, device=dev) // 128).to(torch.int32)
    elif name == "w4_act_shard":  # a row-parallel shard of one: ragged groups
        w.g_idx = torch.randint(0, w.scales.shape[0], (k,), dtype=torch.int32, device=dev)
    return prepare_act_order(w) if w.g_idx is not None else (w, None)


def tinygemm(k, n, dev):
    """torch._weight_int4pack_mm (g128) as a callable of x bf16 [M, K], and its weight bytes."""
    w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
    packed = torch.ops.aten._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8),
                                                        8)
    sz = torch.rand(k // 128, n, 2, device=dev).to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz),
            packed.numel() * packed.element_size() + sz.numel() * 2)


def bench_gptq(dev, smoke, iters, rows, copy_bw, saved=lambda: None):
    shapes = [(256, 384), (384, 256)] if smoke else SHAPES or GPTQ_SHAPES
    ms = (1, 4) if smoke else GPTQ_M
    for k, n in shapes:
        base = {}
        wb = [torch.randn(n, k, device=dev).to(torch.bfloat16)
              for _ in range(n_copies(2 * n * k, smoke))]
        for m in ms:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            base[m] = device_time_us([lambda w=w: F.linear(x, w) for w in wb], dev, iters)
            rows.append(_row("gemm", k, n, m, "bf16 F.linear", base[m], 2 * n * k, x, n, copy_bw,
                             base[m], None))
        del wb
        tiny = {}
        try:
            made = [tinygemm(k, n, dev) for _ in range(n_copies(k * n // 2, smoke))]
            for m in ms:
                x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                tiny[m] = device_time_us([lambda f=f: f(x) for f, _ in made], dev, iters)
                rows.append(_row("gemm", k, n, m, "tinygemm int4 g128", tiny[m], made[0][1], x, n,
                                 copy_bw, base[m], None))
            del made
        except Exception as e:  # noqa: BLE001 - not built for this device/torch: report n/a
            print(f"tinygemm {k}x{n}: n/a ({type(e).__name__}: {str(e)[:80]})")
            for m in ms:
                rows.append(dict(kind="gemm", K=k, N=n, M=m, variant="tinygemm int4 g128", us=None))
        for v in VARIANTS:
            if v == "w4g128_fixed" and dev.type != "cuda":
                continue  # a Triton-only output form
            first = make_variant(v, k, n, dev)
            ws = [first] + [make_variant(v, k, n, dev) for _ in range(n_copies(first[0].nbytes, smoke) - 1)]
            if dev.type == "cuda":
                from tpserve.kernels import dispatch, gptq_gemv
                gptq_gemv.USE_H2 = v != "w4g128_fp32"
                dispatch.H2_ROWS = v != "w4g128_dot"
                dispatch.H2_ROWS_MAX_M = 4  # the A/B at every M the fp16x2 rows kernel runs
            v_ms = ms[:1] if v in M1_ONLY else [m for m in ms if m > 1 or v != "w4g128_dot"]
            if v in FORCED:
                v_ms = [m for m in ms if 2 <= m <= (4 if FORCED[v] == "h2mm" else 16)]
            for m in v_ms:
                x = torch.randn(m, k, device=dev).half()
                if v in FORCED:
                    from tpserve.kernels import gptq_decode, gptq_h2mm, gptq_prefill
                    run = dict(decode=gptq_decode.decode_matmul, rows=gptq_prefill.rows_matmul,
                               h2mm=gptq_h2mm.h2_matmul)[FORCED[v]]
                    fns = [lambda w=w, p=p: run(x, w, p) for w, p in ws]
                elif v == "w4g128_fixed":  # sums wrap over the timed calls: times are unchanged
                    fns = [lambda w=w, p=p: fixed_gemv(x, w, p) for w, p in ws]
                else:
                    fns = [lambda w=w, p=p: gptq_matmul(x, w, p) for w, p in ws]
                t = device_time_us(fns, dev, iters)
                r = _row("gemm", k, n, m, v, t, first[0].nbytes, x, n, copy_bw, base[m], tiny.get(m))
                if (k, n) == shapes[0]:  # the autotuned configs, against the reference
                    w, p = first
                    ref = gptq_matmul_reference(x.float() if p is None else x.float()[:, p], w)
                    got = fixed_gemv(x, w, p, fresh=True) if v == "w4g128_fixed" else fns[0]()
                    r["rel_err"] = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                if m == 1:
                    r["eager_us"] = eager_us(fns, dev)
                rows.append(r)
            del ws, first
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        saved()  # each shape's rows reach --out as they are measured
    for (k, n), m in ([] if smoke else PREFILL):
        wb = [torch.randn(n, k, device=dev).to(torch.bfloat16) for _ in range(2)]
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        tb = device_time_us([lambda w=w: F.linear(x, w) for w in wb], dev, iters)
        rows.append(_row("prefill", k, n, m, "bf16 F.linear", tb, 2 * n * k, x, n, copy_bw, tb, None))
        ws = [make_variant("w4g128", k, n, dev) for _ in range(2)]
        xh = x.half()
        from tpserve.kernels import gptq_prefill as gp
        import triton
        out = torch.empty(m, n, dtype=torch.float16, device=dev)
        def fp32_tiles(f):  # the same path with the tiles dequantized in fp32 (the A/B)
            def run(w):
                gp.USE_H2 = False
                try:
                    return f(w)
                finally:
                    gp.USE_H2 = True
            return run
        tl_dot = lambda w: gp._tl_dot(xh, w, out, triton.next_power_of_2(m), None)  # noqa: E731
        deq = lambda w: gp._dequant_matmul(xh, w, out)  # noqa: E731
        for variant, run in (  # each path forced, then the one gptq_matmul picks
                ("w4g128 tl.dot", tl_dot), ("w4g128 tl.dot fp32 tiles", fp32_tiles(tl_dot)),
                ("w4g128 dequant+cuBLAS", deq),
                ("w4g128 dequant+cuBLAS fp32 tiles", fp32_tiles(deq)),
                ("w4g128 gptq_matmul", lambda w: gptq_matmul(xh, w))):
            t = device_time_us([lambda w=w: run(w[0]) for w in ws], dev, iters)
            r = _row("prefill", k, n, m, variant, t, ws[0][0].nbytes, x, n, copy_bw, tb, None)
            w0 = ws[0][0]
            ref = xh.float() @ w0.dequantize().float()
            r["rel_err"] = ((run(w0).float() - ref).abs().max() / ref.abs().max()).item()
            r["tflops"] = 2 * m * k * n / t / 1e6
            rows.append(r)
            print(f"prefill {k}x{n} M={m} {variant}: {t:.1f} us ({t / tb:.2f}x bf16 {tb:.1f} us, "
                  f"{r['tflops']:.0f} TFLOP/s, rel err {r['rel_err']:.1e})", flush=True)
        del wb, ws


def fixed_gemv(x, w, perm, fresh=False, config=None):
    """The one-row GEMV into w's fixed-point buffer; `fresh`: from zero, taken as fp16."""
    from tpserve.kernels import fixed_sum
    from tpserve.kernels.gptq_gemv import gemv
    buf = fixed_sum.buffer(x.device, f"bench{id(w):x}", w.out_features)
    if fresh:
        buf.zero_()
    out = gemv(x, w, perm, out=buf, config=config)
    return fixed_sum.take_reference(out, torch.float16) if fresh else out


def bench_head(dev, smoke, iters, rows, copy_bw):
    from tpserve.kernels import int8_matmul, q8_0_matmul, quantize_int8, quantize_q8_0
    shapes = [(256, 1000)] if smoke else HEAD_SHAPES
    for h, v in shapes:
        wb = [torch.randn(v, h, device=dev).to(torch.bfloat16) for _ in range(n_copies(2 * v * h, smoke))]
        base = {}
        for m in HEAD_M:
            x = torch.randn(m, h, device=dev).to(torch.bfloat16)
            base[m] = device_time_us([lambda w=w: F.linear(x, w) for w in wb], dev, iters)
            rows.append(_row("head", h, v, m, "bf16 F.linear", base[m], 2 * v * h, x, v, copy_bw,
                             base[m], None))
        for name, quant, fn in [("int8", quantize_int8, int8_matmul), ("q8_0", quantize_q8_0, q8_0_matmul)]:
            qs = [quant(w) for w in wb[:1]]
            qs += [(q.clone(), s.clone()) for q, s in qs * (n_copies(v * h, smoke) - 1)]
            nbytes = sum(t.numel() * t.element_size() for t in qs[0])
            for m in HEAD_M:
                x = torch.randn(m, h, device=dev).half()
                t = device_time_us([lambda q=q, s=s: fn(x, q, s) for q, s in qs], dev, iters)
                rows.append(_row("head", h, v, m, name, t, nbytes, x, v, copy_bw, base[m], None))
            del qs
        del wb
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _row(kind, k, n, m, variant, us, wbytes, x, n_out, copy_bw, base_us, tiny_us):
    moved = wbytes + x.numel() * x.element_size() + m * n_out * 2
    r = dict(kind=kind, K=k, N=n, M=m, variant=variant, us=us, weight_bytes=wbytes,
             tb_s=moved / (us * 1e-6) / 1e12, pct_copy=100 * moved / (us * 1e-6) / copy_bw,
             vs_bf16=base_us / us, vs_tinygemm=None if tiny_us is None else tiny_us / us)
    print(_fmt(r), flush=True)
    return r


def _fmt(r):
    if r.get("us") is None:
        return f"{r['kind']:>7} {r['K']:>6}x{r['N']:<6} M={r['M']:<3} {r['variant']:<20} n/a"
    vt = "" if r["vs_tinygemm"] is None else f" {r['vs_tinygemm']:5.2f}x tinygemm"
    ea = "" if "eager_us" not in r else f"  eager {r['eager_us']:6.1f} us"
    return (f"{r['kind']:>7} {r['K']:>6}x{r['N']:<6} M={r['M']:<3} {r['variant']:<20} "
            f"{r['us']:8.1f} us {r['tb_s']:5.2f} TB/s {r['pct_copy']:5.1f}% copy "
            f"{r['vs_bf16']:5.2f}x bf16{vt}{ea}")


def main():
    global SHAPES, GPTQ_M, VARIANTS, PREFILL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (torch paths)")
    ap.add_argument("--check", action="store_true", help="only check parity on the GPU")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-head", action="store_true", help="GPTQ shapes only")
    ap.add_argument("--shapes", help="GPTQ shapes KxN,... (default: the table's; with --shapes "
                                     "or --m the default prefill rows are left out)")
    ap.add_argument("--m", type=int, nargs="+", help="GPTQ M values (default 1 4 16)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS + list(FORCED),
                    help="GPTQ variants (default: all but the forced few-rows kernels)")
    ap.add_argument("--prefill", type=int, nargs="+", metavar="M",
                    help="only the prefill paths (tl.dot vs dequant + cuBLAS vs bf16) at these M, "
                         "on the Llama-3-8B layer shapes")
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")  # which kernel won each M = 2..4 shape (w4g128)
    logging.getLogger("tpserve.kernels.tuning").setLevel(logging.INFO)
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    smoke = args.smoke or dev.type == "cpu"
    SHAPES = args.shapes and [tuple(map(int, x.split("x"))) for x in args.shapes.split(",")]
    GPTQ_M, VARIANTS = tuple(args.m or GPTQ_M), args.variants or VARIANTS
    if args.check:
        from kernels_check import check
        sys.exit(0 if check(dev) else 1)
    t0 = time.time()
    copy_bw = copy_bandwidth(dev, 2 ** 24 if smoke else 2 ** 30)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}: device-to-device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    import triton
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                copy_tb_s=copy_bw / 1e12, smoke=smoke)

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if args.prefill:
        PREFILL = [(kn, m) for kn in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
                   for m in args.prefill]
        SHAPES = [(256, 256)]  # the GEMV table's smallest stand-in: the prefill rows are the point
        GPTQ_M, VARIANTS = (1,), ["w4g128"]
    elif args.shapes or args.m:  # a focused GEMV run: the default prefill rows only cost time
        PREFILL = []
    bench_gptq(dev, smoke, 5 if smoke else args.iters, rows, copy_bw, save)
    if not args.no_head:
        bench_head(dev, smoke, 5 if smoke else args.iters, rows, copy_bw)
    meta["seconds"] = time.time() - t0
    print(f"done in {meta['seconds']:.0f} s")
    save()


if __name__ == "__main__":
    main()
