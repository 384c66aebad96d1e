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
. bench/gpu_env.sh
if has bench; then
  timeout 200 python3 bench/allreduce.py --tp 4 --sizes 8K 64K 1M 16M --paths shm shm-torch --gpu \
    --out "$OUT/allreduce_gpu_tp4.json" 2>"$OUT/allreduce_gpu.err" | tail -6
fi
if has decode; then
  l8
  timeout 420 python3 bench/decode.py --model /tmp/l8 --tp 1 2 4 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 64 --decode-steps 1 8 \
    --out "$OUT/decode_x4.json" > "$OUT/decode_x4.log" 2>&1; tail -14 "$OUT/decode_x4.log"
fi
if has verify; then
  l8; q8; verify_ray 4 l8 q8
fi
if has 70b; then
  L70=${L70:-40}
  python3 bench/make_checkpoint.py --preset llama3-70b --layers "$L70" --out /tmp/l70 --device cuda
  timeout 300 python3 bench/decode.py --model /tmp/l70 --tp 4 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --lm-head int8 --prompt-len 128 --gen 32 \
    --out "$OUT/decode_x4_70b.json" > "$OUT/decode_x4_70b.log" 2>&1; tail -4 "$OUT/decode_x4_70b.log"
  rm -rf /tmp/l70
  python3 bench/make_checkpoint.py --preset llama3-70b --layers 8 --out /tmp/l70v --device cuda >/dev/null
  verify_ray 4 l70v  # 8 of the 80 layers
fi
