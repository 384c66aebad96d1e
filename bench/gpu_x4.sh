#!/usr/bin/env bash
# The 4-GPU host (device kind nvidia-h100-x4), from the repo root, carrying .whl from
# ../shared/tools/device-wheels.sh (ray, pyzmq). Stages combine (`bash bench/gpu_x4.sh bench
# decode`); each writes into $OUT:
#   bench   allreduce_gpu_tp4.json: bench/allreduce.py --gpu at tp 4: gloo, NCCL, tpserve nccl /
#           cuda (one-shot + NCCL), eager and captured in a CUDA graph
#   decode  decode_x4.json: Llama-3-8B shapes, tp 1 (in-process) / 2 / 4 (Ray, head on rank 0,
#           all-reduce auto = cuda) vs the torch int4 peer in the same run, batch 1 and 8
#   verify  tpserve verify at tp 4 over Ray on the 8B-shaped and the straddling checkpoints
#   70b     a Llama-3-70B-shaped checkpoint (L70 layers, default 40, of the 80) at tp 4 over Ray:
#           decode tok/s at batch 1 and 8 with its bandwidth floor; verify at tp 4 on 8 layers
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
[ -e tpserve/kernels ] || cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TPSERVE_CACHE=/tmp/tpserve-cache RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader; nvidia-smi topo -m | head -5; nproc
STAGES=" ${*:-all} "
has() { [[ "$STAGES" == *" $1 "* || "$STAGES" == *" all "* ]]; }
l8() { [ -e /tmp/l8/config.json ] || python3 bench/make_checkpoint.py --preset llama3-8b --out /tmp/l8 --device cuda >/dev/null; }
if has bench; then
  timeout 200 python3 bench/allreduce.py --tp 4 --sizes 8K 64K 1M 16M --paths shm --gpu \
    --out "$OUT/allreduce_gpu_tp4.json" 2>"$OUT/allreduce_gpu.err" | tail -6
fi
if has decode; then
  l8
  timeout 420 python3 bench/decode.py --model /tmp/l8 --tp 1 2 4 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 64 --decode-steps 1 8 \
    --out "$OUT/decode_x4.json" > "$OUT/decode_x4.log" 2>&1; tail -14 "$OUT/decode_x4.log"
fi
if has verify; then
  l8
  [ -e /tmp/q8/config.json ] || python3 bench/make_checkpoint.py --preset qwen-straddle --layers 8 --out /tmp/q8 --device cuda >/dev/null
  for m in l8 q8; do
    timeout 200 python3 -m tpserve.cli verify --model /tmp/$m --tp 4 --backend ray --device cuda --dtype float16 \
      --max-tokens 16 > "$OUT/verify_x4_$m.txt" 2> "$OUT/verify_x4_$m.log"; echo "verify $m tp=4 ray: exit $?"
    head -9 "$OUT/verify_x4_$m.txt"
  done
fi
if has 70b; then
  L70=${L70:-40}
  python3 bench/make_checkpoint.py --preset llama3-70b --layers "$L70" --out /tmp/l70 --device cuda
  timeout 300 python3 bench/decode.py --model /tmp/l70 --tp 4 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --lm-head int8 --prompt-len 128 --gen 32 \
    --out "$OUT/decode_x4_70b.json" > "$OUT/decode_x4_70b.log" 2>&1; tail -4 "$OUT/decode_x4_70b.log"
  rm -rf /tmp/l70
  python3 bench/make_checkpoint.py --preset llama3-70b --layers 8 --out /tmp/l70v --device cuda >/dev/null
  timeout 200 python3 -m tpserve.cli verify --model /tmp/l70v --tp 4 --backend ray --device cuda --dtype float16 \
    --max-tokens 16 > "$OUT/verify_x4_70b.txt" 2> "$OUT/verify_x4_70b.log"; echo "verify 70b(8 layers) tp=4 ray: exit $?"
  head -9 "$OUT/verify_x4_70b.txt"
fi
