#!/usr/bin/env bash
# After a kernel or tuning change, on one H100 (device tool, repo root, carrying .whl): the GEMV
# table at M = 1 and 4, the fused kernels' self-check, graph vs eager tokens on a small checkpoint,
# and tp=1 decode against the torch int4 peer.   bash bench/gpu_quick.sh
# VARIANTS (default "w4g128 w4g128_dot w8g128", e.g. "w4g128 w4_act_shard w4g128_off64"), M ("1 4")
# and SHAPES (K x N, comma-separated; default the Llama-3-8B shapes at tp 1 and 2) pick the table's
# rows; SWEEP="4096x4096:1 4" first times every config of the decode kernels on those shapes and M
# (bench/gemv_configs.py, aligned vs act-order shard). About 8 minutes with the defaults; logs in $OUT.
. bench/gpu_env.sh none >/dev/null 2>&1
if [ -n "${SWEEP:-}" ]; then
  for s in $(echo "$SWEEP" | tr ' ' '_' | tr ';' ' '); do
    IFS=: read -r shapes ms <<< "$s"
    timeout 200 python3 bench/gemv_configs.py --shapes "$shapes" --m ${ms//_/ } \
      --out "$OUT/gemv_configs_${shapes//,/_}.json" > "$OUT/gemv_configs_${shapes//,/_}.log" 2>&1
    grep "best config" "$OUT/gemv_configs_${shapes//,/_}.log"
  done
fi
SHAPES=${SHAPES:-4096x4096,4096x6144,4096x14336,14336x4096,4096x28672,4096x3072,2048x4096,7168x4096}
NO_CHECK=1 TABLE_S=${TABLE_S:-200} BENCH_ARGS="--m ${M:-1 4} --variants ${VARIANTS:-w4g128 w4g128_dot w8g128} --shapes $SHAPES" \
  bash bench/gpu_kernels.sh > "$OUT/gpu_kernels.log" 2>&1
grep -v "bf16 F.linear\|^kernel for" $OUT/kernels.log | head -60
. bench/gpu_env.sh none >/dev/null 2>&1
python3 -m tpserve.kernels.fused 2>&1 | tail -3
python3 bench/make_checkpoint.py --preset small --out /tmp/small --device cuda >/dev/null
timeout 150 python3 bench/decode.py --model /tmp/small --tp 1 2 --backend local --device cuda --dtype float16 \
  --check 128 --batch 1 4 --gen 32 --prompt-len 32 > "$OUT/graph_vs_eager.log" 2>&1
grep -i "identical\|differ\|error" "$OUT/graph_vs_eager.log" | head
HEADS=int8 BATCH=${BATCH:-1 8} STEPS=${STEPS:-1} timeout 300 bash bench/gpu_h100.sh decode 2>&1 | tail -11
