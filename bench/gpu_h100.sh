#!/usr/bin/env bash
# The GPU checks and the decode benchmark on one H100, run through the device tool from the repo
# root, carrying .whl from ../shared/tools/device-wheels.sh (ray, pyzmq). The startup stage runs
# `tpserve launch`, whose HTTP stack the GPU image lacks; add its wheels to .whl first:
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl fastapi starlette uvicorn h11 click anyio sniffio \
#     prometheus-client annotated-doc annotated-types typing-inspection typing-extensions \
#     opentelemetry-api importlib-metadata zipp pydantic==2.13.4 pydantic-core==2.46.4
# The device tool brings back at most 8 files, and nothing of a command killed at its limit: run
# the stages under a timeout shorter than the call's and pack $OUT after them, e.g.
#   timeout 540 bash bench/gpu_h100.sh checks gated; cd $OUT && tar czf /tmp/r.tgz * \
#     && rm -rf $OUT/* && mv /tmp/r.tgz $OUT/
#   bash bench/gpu_h100.sh checks   kernel parity, captured prefill steps vs the eager step, graph
#                                   vs eager tokens, verify at tp 1/2 over the in-process and Ray
#                                   backends (small checkpoints)
#   bash bench/gpu_h100.sh decode   Llama-3-8B shapes: tpserve tp=1 vs the torch int4 peer and
#                                   transformers bf16, batch 1/8/32, dense and int8 heads, 1 and 8
#                                   decode steps per call (BATCH, HEADS, STEPS, PEERS override)
#   bash bench/gpu_h100.sh sampled  Llama-3-8B shapes, tp=1 in-process: greedy vs sampled
#                                   (temperature 0.8, top_p 0.95, seeded), batch 1 and 8, 1 and 8
#                                   decode steps per call (sampled bursts), the peer in the same run
#   bash bench/gpu_h100.sh startup  Llama-3-8B shapes: launch to healthy twice, from a cold Triton
#                                   cache (tuning + graph capture) and a warm one
#   bash bench/gpu_h100.sh profile  where a decode step's time goes, batch 1 and 8 (8B shapes)
#   bash bench/gpu_h100.sh prefill  where a 128-token prompt's first token's time goes (8B shapes):
#                                   wall vs GPU busy time, launches, kernels by GPU time; then
#                                   the same for one step of eight 128-token prompts
#   bash bench/gpu_h100.sh gemm     the prefill GEMM paths at M = 32, 128, 256, 1024 on the 8B
#                                   shapes (each forced: tl.dot kernel variants, dequantize +
#                                   cuBLAS, bf16 cuBLAS)
#   bash bench/gpu_h100.sh fewrows  the fp16x2 rows kernel's self-check, then M = 2 and 4 on the 8B
#                                   shapes: dispatch's pick, the fp16x2 rows kernel and the tl.dot
#                                   decode kernel forced, tinygemm and bf16 in the same run
#   bash bench/gpu_h100.sh tiles    the prefill kernel's fp16x2 tile dequantization against fp32
#                                   tiles: self-check, then M = 128 and 1024 on the 8B shapes,
#                                   bf16 in the same run
#   bash bench/gpu_h100.sh shared   Llama-3-8B shapes: n = 8 choices of a 500-token prompt prefilled
#                                   once vs eight separate requests, same run
#   bash bench/gpu_h100.sh ttft     Llama-3-8B shapes, prompt 128: TTFT and tok/s of tpserve tp=1
#                                   against the torch int4 peer and transformers bf16, same run
#   bash bench/gpu_h100.sh actorder Llama-3-8B shapes with act-order: tp=1 decode with the MLP's
#                                   channels in down_proj's group order and in the checkpoint's
#                                   (TPSERVE_MLP_GROUP_ORDER=0), then the aligned checkpoint, batch
#                                   1 and 8, the torch int4 peer beside the aligned run
#   bash bench/gpu_h100.sh fixedsum the decode GEMVs' outputs as fixed-point sums taken by their
#                                   readers (the default at tp=1, kernels/fixed_sum.py) with the
#                                   barrier take (the default take): the kernel
#                                   self-check's repeats, graph vs eager tokens, its tokens against
#                                   the written sums' (bench/fixed_sum_check.py), then Llama-3-8B
#                                   shapes tp=1 batch 1 and 8 with written sums (the peer beside
#                                   them), the exchange take and the barrier take, and the
#                                   captured step's kernels with the barrier take
#   bash bench/gpu_h100.sh rowwarps the kernels that give a decode row one program (norms, rotary +
#                                   KV write) with 4, 8 and 16 warps (TPSERVE_ROW_WARPS): Llama-3-8B
#                                   shapes tp=1 batch 1 and 8 (the peer beside 4) and each one's
#                                   captured-step kernels
#   bash bench/gpu_h100.sh gemvfixed the M = 1 GEMV with written and fixed-point outputs
#                                   (bench/kernels.py w4g128 / w4g128_fixed) on the table's shapes,
#                                   tinygemm and bf16 cuBLAS in the same run
#   bash bench/gpu_h100.sh gemvsweep every config of the fixed-point M = 1 GEMV on the 8B shapes,
#                                   with configs beyond the tuner's pool (bench/gemv_configs.py
#                                   --extra: split-K up to 32), the autotuned call last
#   bash bench/gpu_h100.sh headsweep every config of the int8 lm_head GEMV (M = 1, 4096 x 128256),
#                                   with and without evict-first loads (bench/head_configs.py),
#                                   the dense fp16 head and the autotuned call in the same run
#   bash bench/gpu_h100.sh pdlall   every kernel of the decode step launched with PDL (the default) against
#                                   only the GEMVs (TPSERVE_PDL=gemv): Llama-3-8B shapes tp=1,
#                                   int8 head, batch 1 and 8, 8 steps per call, the peer beside
#                                   the first; then the default's captured-step kernels (batch 1)
#   bash bench/gpu_h100.sh gated    down projections reading silu(gate) * up from the gate/up GEMV's
#                                   fixed-point sum (TPSERVE_GATED_SUM=1, opt-in): greedy tokens
#                                   against written sums (bench/fixed_sum_check.py), then Llama-3-8B
#                                   shapes tp=1, int8 head, batch 1 and 8, with the SiLU-mul kernel
#                                   (TPSERVE_GATED_SUM=0, the peer beside it) and without
#   bash bench/gpu_h100.sh all      (stages combine: bash bench/gpu_h100.sh checks profile)
set -u
. bench/gpu_env.sh
if has checks; then
  # Every kernel module prints its error against its torch reference (compiles and tunes: run in
  # the background, on other cores, while the model-level checks below run).
  (for k in kernels/*.py; do
    case "$k" in */__init__.py) continue;; esac
    m=$(basename "$k" .py)
    grep -q "__main__" "$k" && { echo "== $m"; timeout 200 python3 -m "tpserve.kernels.$m" 2>&1 | grep -v Warning; }
  done > "$OUT/kernel_selfchecks.log" 2>&1) &
  selfchecks=$!
  python3 bench/make_checkpoint.py --preset small --out /tmp/small --device cuda >/dev/null
  timeout 240 python3 bench/decode.py --model /tmp/small --tp 1 2 --backend local --device cuda \
    --dtype float16 --check 128 --batch 1 4 --gen 32 --prompt-len 32 2>&1 | tee "$OUT/checks.log" | tail -12
  gpus=$(nvidia-smi -L | wc -l)
  for tp in 1 2; do for backend in local ray; do
    # Ray gives each rank a GPU of its own; on one GPU, tp=2 runs in-process (sharing it).
    [ "$backend" = ray ] && [ "$tp" -gt "$gpus" ] && continue
    timeout 180 python3 -m tpserve.cli verify --model /tmp/small --tp $tp --backend $backend --device cuda \
      --max-tokens 8 --json > "$OUT/verify_tp${tp}_${backend}.json" 2> "$OUT/verify_tp${tp}_${backend}.err"
    echo "verify tp=$tp $backend: exit $? $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('passed' if r['passed'] else 'FAILED', max(p['max_rel'] for p in r['prompts']))" "$OUT/verify_tp${tp}_${backend}.json" 2>&1 | tail -1)"
  done; done
  python3 bench/make_checkpoint.py --preset small-act --out /tmp/small-act --device cuda >/dev/null
  for tp in 1 2; do  # act-order: MLP channels in group order, norms writing x in the GEMVs' order
    timeout 180 python3 -m tpserve.cli verify --model /tmp/small-act --tp $tp --backend local --device cuda \
      --max-tokens 8 --json > "$OUT/verify_act_tp${tp}.json" 2> "$OUT/verify_act_tp${tp}.err"
    echo "verify act-order tp=$tp local: exit $? $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('passed' if r['passed'] else 'FAILED', max(p['max_rel'] for p in r['prompts']))" "$OUT/verify_act_tp${tp}.json" 2>&1 | tail -1)"
  done
  timeout 120 python3 bench/moe_check.py 2>&1 | grep -v INFO | tail -3  # routed experts: eager
  wait $selfchecks  # the full log comes back in $OUT; here only what went wrong, if anything
  echo "kernel self-checks: $(grep -c '^== ' "$OUT/kernel_selfchecks.log") modules ran"
  grep -iE -B3 "error|traceback|fail|nan " "$OUT/kernel_selfchecks.log" | head -30
fi
if has startup; then
  l8
  TRITON_CACHE_DIR=/tmp/triton-startup timeout 500 python3 bench/startup.py --model /tmp/l8 --runs 2 \
    2>&1 | tee "$OUT/startup_h100.json" | tail -3
fi
if has profile; then
  l8
  for b in 1 8; do timeout 200 python3 bench/profile_step.py --model /tmp/l8 --batch $b --lm-head int8 \
    > "$OUT/profile_b$b.log" 2>&1; grep "^batch" "$OUT/profile_b$b.log"; done
  sed -n '/Self CUDA/,+22p' "$OUT/profile_b1.log" | head -26
fi
if has prefill; then
  l8
  timeout 200 python3 bench/profile_step.py --model /tmp/l8 --prefill 128 --lm-head int8 \
    > "$OUT/profile_prefill128.log" 2>&1; grep -A30 "^prefill" "$OUT/profile_prefill128.log" | cut -c1-150
  timeout 200 python3 bench/profile_step.py --model /tmp/l8 --prefill 128 --batch 8 --lm-head int8 \
    > "$OUT/profile_prefill128x8.log" 2>&1; grep -A30 "^prefill" "$OUT/profile_prefill128x8.log" | cut -c1-150
fi
if has gemm; then
  timeout 400 python3 bench/kernels.py --prefill 32 128 256 1024 --no-head --iters 40 \
    --out "$OUT/prefill_paths.json" > "$OUT/prefill_paths.log" 2>&1
  echo "gemm rc=$?"; grep "^prefill" "$OUT/prefill_paths.log"
fi
if has fewrows; then
  timeout 120 python3 -m tpserve.kernels.gptq_h2mm 2>&1 | grep -v Warning | tail -12
  timeout 400 python3 bench/kernels.py --m 2 4 --variants w4g128 w4g128_fp16x2 w4g128_per_field \
    --no-head --iters 60 --shapes 4096x4096,4096x6144,4096x28672,14336x4096 \
    --out "$OUT/kernels_few_rows.json" > "$OUT/kernels_few_rows.log" 2>&1
  echo "fewrows rc=$?"; grep -E "gemm|won|faster" "$OUT/kernels_few_rows.log" | cut -c1-140
fi
if has tiles; then
  timeout 120 python3 -m tpserve.kernels.gptq_prefill 2>&1 | grep -v Warning | tail -8
  timeout 300 python3 bench/kernels.py --prefill 128 1024 --no-head --iters 40 \
    --out "$OUT/kernels_tiles_prefill.json" > "$OUT/kernels_tiles_prefill.log" 2>&1
  echo "prefill rc=$?"; grep "^prefill" "$OUT/kernels_tiles_prefill.log" | cut -c1-140
fi
if has shared; then
  l8
  timeout 240 python3 bench/shared_prompt.py --model /tmp/l8 --device cuda --dtype float16 \
    > "$OUT/shared_prompt.log" 2>&1; grep -v INFO "$OUT/shared_prompt.log" | tail -6
fi
if has ttft; then
  l8
  timeout 240 python3 bench/decode.py --model /tmp/l8 --tp 1 --batch 1 8 --backend local --device cuda \
    --dtype float16 --peer torch-int4 transformers --lm-head int8 --prompt-len 128 --gen 32 \
    --decode-steps 8 --out "$OUT/decode_ttft.json" > "$OUT/decode_ttft.log" 2>&1
  grep -v INFO "$OUT/decode_ttft.log" | tail -12
fi
if has decode; then
  l8
  python3 bench/decode.py --model /tmp/l8 --tp 1 --batch ${BATCH:-1 8 32} --backend local --device cuda \
    --dtype float16 --peer torch-int4 ${PEERS:-} --lm-head ${HEADS:-dense int8} --prompt-len 128 --gen 128 \
    --decode-steps ${STEPS:-1 8} \
    --out "$OUT/decode_h100.json" > "$OUT/decode.log" 2>&1; tail -16 "$OUT/decode.log"
fi
if has actorder; then
  [ -e /tmp/l8act/config.json ] || python3 bench/make_checkpoint.py --preset llama3-8b-act --out /tmp/l8act \
    --device cuda >/dev/null
  for order in ${ORDERS:-1 0}; do
    TPSERVE_MLP_GROUP_ORDER=$order timeout 200 python3 bench/decode.py --model /tmp/l8act --tp 1 \
      --batch ${BATCH:-1 8} --backend local --device cuda --dtype float16 --peer none --lm-head int8 \
      --prompt-len 128 --gen 128 --decode-steps 8 --out "$OUT/decode_act_order$order.json" \
      > "$OUT/decode_act_order$order.log" 2>&1
    echo "act-order, MLP group order $order:"; grep -v INFO "$OUT/decode_act_order$order.log" | tail -3
  done
  rm -rf /tmp/l8act; l8
  timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 1 --batch ${BATCH:-1 8} --backend local \
    --device cuda --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 128 \
    --decode-steps 8 --out "$OUT/decode_aligned.json" > "$OUT/decode_aligned.log" 2>&1
  echo "aligned:"; grep -v INFO "$OUT/decode_aligned.log" | tail -7
fi
if has sampled; then
  l8
  python3 bench/decode.py --model /tmp/l8 --tp 1 --batch 1 8 --backend local --device cuda \
    --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 128 --decode-steps 1 8 \
    --temperature 0 0.8 --out "$OUT/decode_sampled_h100.json" > "$OUT/decode_sampled.log" 2>&1
  tail -12 "$OUT/decode_sampled.log"
fi
if has rowwarps; then
  l8
  for w in 4 8 16; do
    peer=none; [ $w = 4 ] && peer=torch-int4
    TPSERVE_ROW_WARPS=$w timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 1 --batch 1 8 \
      --backend local --device cuda --dtype float16 --peer $peer --lm-head int8 --prompt-len 128 \
      --gen 128 --decode-steps 8 --out "$OUT/decode_rowwarps$w.json" > "$OUT/decode_rowwarps$w.log" 2>&1
    echo "row warps $w:"; grep -v INFO "$OUT/decode_rowwarps$w.log" | tail -4
    TPSERVE_ROW_WARPS=$w timeout 150 python3 bench/profile_step.py --model /tmp/l8 --batch 1 \
      --lm-head int8 > "$OUT/profile_rowwarps$w.log" 2>&1
    grep -E "^batch|_rms_norm|_rotary_store" "$OUT/profile_rowwarps$w.log" | cut -c1-150
  done
fi
if has gemvfixed; then
  timeout 300 python3 bench/kernels.py --no-head --m 1 --variants w4g128 w4g128_fixed \
    --out "$OUT/kernels_gemv_fixed.json" 2>&1 | grep -v INFO | tee "$OUT/kernels_gemv_fixed.log" \
    | grep -E "tinygemm|w4g128" | cut -c1-140
fi
if has gemvsweep; then
  timeout 400 python3 bench/gemv_configs.py --shapes 4096x6144,4096x4096,4096x28672,14336x4096 \
    --variants w4g128_fixed --m 1 --extra --out "$OUT/gemv_configs_fixed.json" 2>&1 \
    | grep -v INFO | tee "$OUT/gemv_configs_fixed.log" | grep "best config"
fi
if has gated; then
  [ -e /tmp/small/config.json ] || python3 bench/make_checkpoint.py --preset small --out /tmp/small \
    --device cuda >/dev/null
  TPSERVE_GATED_SUM=1 timeout 150 python3 bench/fixed_sum_check.py --model /tmp/small 2>&1 \
    | grep -v INFO | tee "$OUT/fixed_sum_check_gated.log" | tail -6
  l8
  for arm in 0 1; do
    peer=none; [ $arm = 0 ] && peer=torch-int4
    TPSERVE_GATED_SUM=$arm timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 1 --batch 1 8 \
      --backend local --device cuda --dtype float16 --peer $peer --lm-head int8 --prompt-len 128 \
      --gen 128 --decode-steps 8 --out "$OUT/decode_gated_$arm.json" > "$OUT/decode_gated_$arm.log" 2>&1
    echo "TPSERVE_GATED_SUM=$arm:"; grep -A5 "^ tp " "$OUT/decode_gated_$arm.log" | grep -v INFO
  done
fi
if has pdlall; then
  l8
  for arm in gemv 1; do
    peer=none; [ $arm = gemv ] && peer=torch-int4
    TPSERVE_PDL=$arm timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 1 --batch 1 8 \
      --backend local --device cuda --dtype float16 --peer $peer --lm-head int8 --prompt-len 128 \
      --gen 128 --decode-steps 8 --out "$OUT/decode_pdl_$arm.json" > "$OUT/decode_pdl_$arm.log" 2>&1
    echo "TPSERVE_PDL=$arm:"; grep -A5 "^ tp " "$OUT/decode_pdl_$arm.log" | grep -v INFO
  done
  timeout 150 python3 bench/profile_step.py --model /tmp/l8 --batch 1 --lm-head int8 \
    > "$OUT/profile_pdl_all.log" 2>&1; grep -A12 "kernels a step" "$OUT/profile_pdl_all.log" | cut -c1-130
fi
if has headsweep; then
  timeout 300 python3 bench/head_configs.py --out "$OUT/head_configs.json" 2>&1 | grep -v INFO \
    | tee "$OUT/head_configs.log" | tail -4
fi
if has fixedsum; then
  # The readers' barrier take (the default, kernels/fixed_sum.py) is checked; the exchange take
  # was checked the same way (bench/README.md, fourteenth session)
  export TPSERVE_FIXED_TAKE=barrier
  timeout 120 python3 -m tpserve.kernels.fixed_sum 2>&1 | grep -v Warn | tee "$OUT/fixed_selfcheck.log"
  [ -e /tmp/small/config.json ] || python3 bench/make_checkpoint.py --preset small --out /tmp/small \
    --device cuda >/dev/null
  TPSERVE_FIXED_SUM=1 timeout 200 python3 bench/decode.py --model /tmp/small --tp 1 --backend local \
    --device cuda --dtype float16 --check 128 --batch 1 4 --gen 32 --prompt-len 32 2>&1 \
    | tee "$OUT/fixedsum_checks.log" | grep -vE "INFO|^ +[0-9]" | tail -6
  timeout 200 python3 bench/fixed_sum_check.py --model /tmp/small 2>&1 | grep -v INFO \
    | tee "$OUT/fixed_sum_check.log" | tail -7
  l8
  for arm in written exchange barrier; do  # the peer beside the written sums
    f=1; peer=none; [ $arm = written ] && f=0 && peer=torch-int4
    TPSERVE_FIXED_SUM=$f TPSERVE_FIXED_TAKE=$arm timeout 200 python3 bench/decode.py --model /tmp/l8 \
      --tp 1 --batch 1 8 --backend local --device cuda --dtype float16 --peer $peer --lm-head int8 \
      --prompt-len 128 --gen 128 --decode-steps 8 --out "$OUT/decode_$arm.json" > "$OUT/decode_$arm.log" 2>&1
    echo "$arm sums:"; grep -v INFO "$OUT/decode_$arm.log" | tail -4
  done
  TPSERVE_FIXED_SUM=1 timeout 150 python3 bench/profile_step.py --model /tmp/l8 --batch 1 --lm-head int8 \
    > "$OUT/profile_fixed_barrier.log" 2>&1; grep -A10 "^batch" "$OUT/profile_fixed_barrier.log" | cut -c1-150
  unset TPSERVE_FIXED_TAKE
fi
