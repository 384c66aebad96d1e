#!/usr/bin/env bash
# The kernel benchmark on one GPU (device tool, repo root): parity of every path, each kernel's
# self-check, then the GPTQ table; results into $OUT.   bash bench/gpu_kernels.sh
# NCU=1 first profiles the M = 1 GEMV and tinygemm with Nsight Compute (bench/ncu_gemv.py);
# NO_CHECK=1 skips the parity pass, NO_TABLE=1 the table, BENCH_ARGS selects part of it.
set -u
# This copy of the tree is the device's own: place kernels/ where `tpserve.kernels` is imported from.
rm -rf tpserve/kernels && cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${NCU:-}" ]; then
  timeout 240 ncu --profile-from-start off --clock-control none --set detailed ${NCU_ARGS:-} \
    python3 bench/ncu_gemv.py ${NCU_SHAPES:+--shapes $NCU_SHAPES} > "$OUT/ncu_gemv.txt" 2>&1
  echo "ncu rc=$?"; grep -E "^  [a-z_]|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Registers Per|Achieved Occupancy|Theoretical Occ|Block Size|Grid Size|Stall" "$OUT/ncu_gemv.txt" | head -120
fi
[ -n "${NO_CHECK:-}" ] || { python3 bench/kernels.py --check > "$OUT/check.log" 2>&1; echo "check rc=$?"; tail -4 "$OUT/check.log"; }
[ -n "${NO_TABLE:-}" ] && exit 0
python3 -m tpserve.kernels.gptq_gemv 2>&1 | tail -8
timeout ${TABLE_S:-480} python3 bench/kernels.py --no-head --iters 60 ${BENCH_ARGS:-} --out "$OUT/kernels_h100.json" > "$OUT/kernels.log" 2>&1
echo "bench rc=$?"; grep -v "^  *gemm.*bf16\|tinygemm" "$OUT/kernels.log" | tail -5
