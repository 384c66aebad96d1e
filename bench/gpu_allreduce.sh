#!/usr/bin/env bash
# The all-reduce paths on a 2-GPU host (device kind nvidia-h100-x2), from the repo root, carrying
# .whl from ../shared/tools/device-wheels.sh (ray, pyzmq). Writes JSON into $OUT:
#   allreduce_gpu_tp2.json   bench/allreduce.py --gpu at tp 2: gloo, NCCL, tpserve zmq / shm /
#                            nccl / nccl-graph (16 all-reduces captured in one CUDA graph, checked)
#   allreduce_cpu.json       the CPU paths at tp 2 and 4 on this host's cores (gloo, zmq, shm)
#   allreduce_ray_gpu.json   tpserve over Ray on 2 GPUs: which path `auto` picks, logits of each
#                            path against the in-process ranks, decode tok/s per path
#   bash bench/gpu_allreduce.sh [bench|ray|all]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
[ -e tpserve/kernels ] || cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TPSERVE_CACHE=/tmp/tpserve-cache RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4; nproc
stage=${1:-all}
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  timeout 280 python3 bench/allreduce.py --tp 2 --sizes 4K 8K 64K 1M 16M --gpu \
    --out "$OUT/allreduce_gpu_tp2.json" 2>"$OUT/allreduce_gpu.err" | tail -8
  timeout 200 python3 bench/allreduce.py --tp 2 4 --sizes 8K 64K 1M 16M \
    --out "$OUT/allreduce_cpu.json" 2>"$OUT/allreduce_cpu.err" | tail -10
fi
if [ "$stage" = ray ] || [ "$stage" = all ]; then
  python3 bench/make_checkpoint.py --preset small --out /tmp/small --device cuda >/dev/null
  timeout 280 python3 - /tmp/small "$OUT/allreduce_ray_gpu.json" <<'PY' 2>"$OUT/allreduce_ray.err" | tail -12
import json, logging, sys, time
import torch
import tpserve
logging.basicConfig(level=logging.INFO)
path, out = sys.argv[1:]
ids = list(range(3, 67))
ref = tpserve.load(path, tp=2, device="cuda", dtype=torch.float16).logits(ids).float()
rows = []
for requested in ("auto", "nccl", "zmq"):
    llm = tpserve.load(path, tp=2, backend="ray", device="cuda", dtype=torch.float16,
                       allreduce=requested, progress=False)
    got = llm.logits(ids).float()
    llm.generate(ids[:8], max_tokens=4, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    n = len(llm.generate(ids[:8], max_tokens=64, ignore_eos=True))
    tok_s = n / (time.perf_counter() - t0)
    rows.append({"requested": requested, "path": llm.executor.coord.path, "decode_tok_s": tok_s,
                 "max_abs_vs_local": (got - ref).abs().max().item(),
                 "ref_abs_max": ref.abs().max().item(),
                 "allreduce_count": llm.executor.stats.allreduce_count})
    print(rows[-1], flush=True)
    llm.close()
json.dump({"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "rows": rows}, open(out, "w"), indent=1)
PY
fi
