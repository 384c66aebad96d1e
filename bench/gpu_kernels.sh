#!/usr/bin/env bash
# The kernel benchmark on one GPU (device tool, repo root): parity of every path, each kernel's
# self-check, then the GPTQ table; results into $OUT.   bash bench/gpu_kernels.sh
set -u
# This copy of the tree is the device's own: place kernels/ where `tpserve.kernels` is imported from.
rm -rf tpserve/kernels && cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -n "${NO_CHECK:-}" ] || { python3 bench/kernels.py --check > "$OUT/check.log" 2>&1; echo "check rc=$?"; tail -4 "$OUT/check.log"; }
python3 -m tpserve.kernels.gptq_gemv 2>&1 | tail -8
python3 bench/kernels.py --no-head --iters 60 ${BENCH_ARGS:-} --out "$OUT/kernels_h100.json" > "$OUT/kernels.log" 2>&1
echo "bench rc=$?"; grep -v "^  *gemm.*bf16\|tinygemm" "$OUT/kernels.log" | tail -5
