#!/usr/bin/env bash
# The 4-GPU call (nvidia-h200-x4, through the device tool, carrying .whl): tp=4 correctness
# against tp=1 on the same machine (tpserve verify, Ray + ZMQ) on the 8B-shaped checkpoint and
# the straddling Qwen-style variant, then bench/decode.py at tp 1, 2, 4, batch 1 and 8.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ -e tpserve/kernels ] || cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TPSERVE_CACHE=/tmp/tpserve-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
[ -e /tmp/l8/config.json ] || python3 bench/make_checkpoint.py --preset llama3-8b --out /tmp/l8 --device cuda
[ -e /tmp/q8/config.json ] || python3 bench/make_checkpoint.py --preset qwen-straddle --layers 8 --out /tmp/q8 --device cuda
for m in l8 q8; do
  python3 -m tpserve.cli verify --model /tmp/$m --tp 4 --device cuda --dtype float16 --max-tokens 16 \
    > "$OUT/verify_$m.txt" 2> "$OUT/verify_$m.log"; echo "verify $m tp=4 exit $?"; head -12 "$OUT/verify_$m.txt"
done
python3 bench/decode.py --model /tmp/l8 --tp 1 2 4 --batch 1 8 --device cuda --dtype float16 \
  --prompt-len 128 --gen 32 --out "$OUT/decode_x4.json" > "$OUT/decode_x4.log" 2>&1
tail -8 "$OUT/decode_x4.log"
