#!/usr/bin/env bash
# The H100 benchmark call (run through the device tool from the repo root, carrying .whl from
# ../shared/tools/device-wheels.sh). Stage 1: kernels, lm_head, all-reduce. Stage 2: 8B decode.
#   bash bench/gpu_h100.sh kernels|e2e
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# This copy of the tree is the device's own: place kernels/ where `tpserve.kernels` is imported from.
[ -e tpserve/kernels ] || cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TPSERVE_CACHE=/tmp/tpserve-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
if [ "${1:-kernels}" = kernels ]; then
  python3 bench/kernels.py --out "$OUT/kernels_h100.json" > "$OUT/kernels.log" 2>&1; tail -45 "$OUT/kernels.log"
  python3 bench/lm_head.py --out "$OUT/lm_head_h100.json" 2>&1 | tail -20
  python3 bench/allreduce.py --tp 2 4 --sizes 8K 64K 1M 16M --out "$OUT/allreduce_h100host.json" 2>&1 | tail -18
fi
if [ "${1:-kernels}" != kernels ] || [ "${2:-}" = e2e ]; then
  python3 bench/make_checkpoint.py --preset llama3-8b --out /tmp/l8 --device cuda
  python3 bench/decode.py --model /tmp/l8 --tp 1 --batch 1 8 --device cuda --dtype float16 \
    --peer transformers --lm-head dense int8 --prompt-len 128 --gen 64 \
    --out "$OUT/decode_h100.json" > "$OUT/decode.log" 2>&1; tail -12 "$OUT/decode.log"
fi
