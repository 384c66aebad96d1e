#!/usr/bin/env bash
# The 2-GPU host (device kind nvidia-h100-x2), from the repo root, carrying .whl from
# ../shared/tools/device-wheels.sh (ray, pyzmq). Stages combine (`bash bench/gpu_allreduce.sh
# decode cpu`); each writes into $OUT:
#   bench    allreduce_gpu_tp2.json: bench/allreduce.py --gpu at tp 2: gloo, NCCL, tpserve zmq /
#            shm / nccl / cuda, eager and captured (16 all-reduces in one CUDA graph, checked);
#            allreduce_cpu.json: the CPU paths at tp 2 and 4 on this host's cores (gloo, zmq, shm)
#   ray      allreduce_ray_gpu.json: tpserve over Ray on 2 GPUs (small checkpoint): which path
#            `auto` picks, logits of each path and head placement against the in-process ranks,
#            decode tok/s of each
#   decode   decode_x2.json: Llama-3-8B shapes, tp=1 (in-process) vs tp=2 (Ray, head on rank 0,
#            all-reduce cuda = one-shot + NCCL) vs the torch int4 peer, batch 1 and 8, int8 head,
#            1 and 8 decode steps per call; then tp=2 again with TPSERVE_ONE_SHOT_NORM=0 (the
#            residual add + norm not fused into the one-shot all-reduce: the fusion's A/B)
#   pdl      decode_pdl.json / decode_nopdl.json: the same tp=1 and tp=2 decode runs (batch 1 and 8,
#            1 and 8 decode steps per call, the peer in the first) with programmatic dependent
#            launch on and off (TPSERVE_PDL=0): kernels/pdl.py's A/B; then graph vs eager tokens
#   step     after a change to the decode step: decode_step.json (tp 1 and 2, batch 1 and 8, 1 and 8
#            decode steps per call, the torch int4 peer), a short tp=2 profile (prof/rank0.*), graph
#            vs eager tokens, `tpserve verify` at tp 2 over Ray against transformers, the fused
#            kernels' and attention's self-checks
#   ttft     decode_ttft_x2.json: Llama-3-8B shapes, prompt 128: TTFT and tok/s of tp 1 and 2 over Ray
#            (head on rank 0, all-reduce cuda: one-sequence prefills replay captured graphs with
#            the all-reduces inside) against the torch int4 peer and transformers bf16, batch 1
#            and 8; then `tpserve verify` at tp=2 over Ray against transformers (small checkpoint)
#   profile  where a tp=2 Ray decode step's time goes on each rank (TPSERVE_PROFILE, batch 1, 8B
#            shapes): prof/rank{0,1}.txt (kernels by GPU time) and .trace.json (timeline)
#   verify   tpserve verify at tp=2 over Ray on the 8B-shaped and the straddling checkpoints
#   cpu      decode_cpu16.json: CPU ranks over Ray on this host's cores, tp 1/2/4, on the demo
#            model and a Llama-3.2-1B-shaped checkpoint
#   cpudense decode_cpu16_dense{0,256}_r{1,2}.json: demo model, fp32, tp 1/2/4, batch 1 and 8, small
#            shards through dense copies vs torch's int4 CPU kernel, transformers in the same run
#   cputhreads decode_cpu16_reserved{0,1}_r{1,2}.json: demo model, fp32, tp 1/2/4, batch 1 and 8,
#            CPU ranks sharing every core vs leaving one to the driver and Ray
#   cpuhead  decode_cpu16_head_{coordinator,rank0}.json: CPU ranks on this host's cores, demo
#            model, tp 2 and 4, 8 decode steps per call, greedy and sampled, with the head at the
#            coordinator (what `auto` picks for CPU ranks: no bursts) and on rank 0 (bursts)
#   sampled  decode_sampled.json: tp 1 and 2 greedy vs sampled (temperature 0.8, top_p 0.95,
#            seeded), batch 1 and 8, 1 and 8 steps per call: what sampling costs (rank 0 samples,
#            tpserve/serve/rank_sampling.py, in bursts of 8 steps per call where asked)
#   fixedsum the decode GEMVs' fixed-point sums at tp=2 over Ray (TPSERVE_FIXED_SUM=all: the
#            one-shot all-reduce + norm takes the row-parallel ones): greedy tokens against
#            written sums and repeated (bench/fixed_sum_check.py --tp 2), `tpserve verify` at
#            tp=2 on the small and 8B-shaped checkpoints, then decode_fixedsum_{1,all}.json: tp=1
#            and tp=2 with written sums at tp=2 (the peer beside them) and tp=2 with fixed-point
#            sums, batch 1 and 8, 8 steps per call
#   pdlar    the one-shot all-reduces launched with PDL (TPSERVE_PDL_ALLREDUCE=1, opt-in): `tpserve
#            verify` at tp=2 over Ray with it on the small and 8B-shaped checkpoints, then
#            decode_pdlar_{0,1}.json: tp=2 batch 1 and 8, 8 steps per call, without and with it
set -u
. bench/gpu_env.sh
if has bench; then
  timeout 280 python3 bench/allreduce.py --tp 2 --sizes 4K 8K 64K 1M 16M --gpu \
    --out "$OUT/allreduce_gpu_tp2.json" 2>"$OUT/allreduce_gpu.err" | tail -8
  timeout 240 python3 bench/allreduce.py --tp 2 4 --sizes 8K 64K 1M 16M --paths zmq shm shm-torch \
    --out "$OUT/allreduce_cpu.json" 2>"$OUT/allreduce_cpu.err" | tail -10
fi
if has ray; then
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
for requested, head_at in (("auto", "auto"), ("nccl", "coordinator"), ("zmq", "coordinator")):
    llm = tpserve.load(path, tp=2, backend="ray", device="cuda", dtype=torch.float16,
                       allreduce=requested, head_at=head_at, progress=False)
    got = llm.logits(ids).float()
    llm.generate(ids[:8], max_tokens=4, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    n = len(llm.generate(ids[:8], max_tokens=64, ignore_eos=True))
    tok_s = n / (time.perf_counter() - t0)
    rows.append({"requested": requested, "path": llm.executor.coord.path, "decode_tok_s": tok_s,
                 "head_on_rank0": llm.head is None,
                 "max_abs_vs_local": (got - ref).abs().max().item(),
                 "ref_abs_max": ref.abs().max().item(),
                 "allreduce_count": llm.executor.stats.allreduce_count})
    print(rows[-1], flush=True)
    llm.close()
json.dump({"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "rows": rows}, open(out, "w"), indent=1)
PY
fi
if has decode; then
  l8
  timeout 330 python3 bench/decode.py --model /tmp/l8 --tp 1 2 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 64 --allreduce cuda --decode-steps 1 8 \
    --out "$OUT/decode_x2.json" > "$OUT/decode_x2.log" 2>&1; tail -10 "$OUT/decode_x2.log"
  # the A/B of the all-reduce fused with the residual add + norm: the same tp=2 runs without it
  TPSERVE_ONE_SHOT_NORM=0 timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 2 --batch 1 8 \
    --backend ray --device cuda --dtype float16 --lm-head int8 --prompt-len 128 --gen 64 \
    --allreduce cuda --out "$OUT/decode_x2_unfused.json" > "$OUT/decode_x2_unfused.log" 2>&1
  echo "== without the fused add + norm (TPSERVE_ONE_SHOT_NORM=0)"; tail -5 "$OUT/decode_x2_unfused.log"
fi
if has pdl; then
  l8
  timeout 240 python3 bench/decode.py --model /tmp/l8 --tp 1 2 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 64 --allreduce cuda \
    --decode-steps 1 8 --out "$OUT/decode_pdl.json" > "$OUT/decode_pdl.log" 2>&1
  echo "== PDL on"; grep -A12 "^ tp " "$OUT/decode_pdl.log" | grep -v INFO | head -12
  TPSERVE_PDL=0 timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 1 2 --batch 1 8 --backend ray \
    --device cuda --dtype float16 --lm-head int8 --prompt-len 128 --gen 64 --allreduce cuda \
    --decode-steps 1 8 --out "$OUT/decode_nopdl.json" > "$OUT/decode_nopdl.log" 2>&1
  echo "== PDL off (TPSERVE_PDL=0)"; grep -A10 "^ tp " "$OUT/decode_nopdl.log" | grep -v INFO | head -10
  python3 bench/make_checkpoint.py --preset small --out /tmp/small --device cuda >/dev/null
  timeout 120 python3 bench/decode.py --model /tmp/small --tp 1 2 --backend local --device cuda \
    --dtype float16 --check 128 --batch 1 4 --gen 32 --prompt-len 32 > "$OUT/graph_vs_eager_pdl.log" 2>&1
  grep -i "identical\|differ\|error" "$OUT/graph_vs_eager_pdl.log" | head
fi
if has step; then
  (for m in fused attention; do echo "== $m"; timeout 100 python3 -m tpserve.kernels.$m 2>&1 | grep -v Warning; done \
    > "$OUT/selfchecks.log" 2>&1) &
  l8
  timeout 200 python3 bench/decode.py --model /tmp/l8 --tp 1 2 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --peer torch-int4 --lm-head int8 --prompt-len 128 --gen 64 --allreduce cuda \
    --decode-steps 1 8 --out "$OUT/decode_step.json" > "$OUT/decode_step.log" 2>&1
  grep -A12 "^ tp " "$OUT/decode_step.log" | grep -v INFO | head -12
  TPSERVE_PROFILE=60:8:$OUT/prof timeout 100 python3 bench/decode.py --model /tmp/l8 --tp 2 --batch 1 \
    --backend ray --device cuda --dtype float16 --lm-head int8 --prompt-len 128 --gen 72 \
    > "$OUT/profile_x2.log" 2>&1; rm -f "$OUT"/prof/rank1*
  python3 bench/make_checkpoint.py --preset small --out /tmp/small --device cuda >/dev/null
  timeout 90 python3 bench/decode.py --model /tmp/small --tp 1 2 --backend local --device cuda \
    --dtype float16 --check 128 --batch 1 4 --gen 32 --prompt-len 32 > "$OUT/graph_vs_eager.log" 2>&1
  grep -i "identical\|differ\|error" "$OUT/graph_vs_eager.log" | head
  timeout 90 python3 -m tpserve.cli verify --model /tmp/small --tp 2 --backend ray --device cuda \
    --dtype float16 --reference transformers --max-tokens 8 > "$OUT/verify_small_tp2_hf.txt" 2>&1
  echo "verify tp2 ray vs transformers: exit $?"; grep -A4 "prompt  tokens" "$OUT/verify_small_tp2_hf.txt"
  wait; grep -ciE "error|traceback|nan " "$OUT/selfchecks.log"
fi
if has ttft; then
  l8
  timeout 300 python3 bench/decode.py --model /tmp/l8 --tp 1 2 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --peer torch-int4 transformers --lm-head int8 --prompt-len 128 --gen 32 --allreduce cuda \
    --decode-steps 8 --out "$OUT/decode_ttft_x2.json" > "$OUT/decode_ttft_x2.log" 2>&1
  grep -v INFO "$OUT/decode_ttft_x2.log" | tail -14
  python3 bench/make_checkpoint.py --preset small --out /tmp/small --device cuda >/dev/null
  timeout 120 python3 -m tpserve.cli verify --model /tmp/small --tp 2 --backend ray --device cuda \
    --dtype float16 --reference transformers --max-tokens 8 > "$OUT/verify_small_tp2_hf.txt" 2>&1
  echo "verify tp2 ray vs transformers: exit $?"; head -4 "$OUT/verify_small_tp2_hf.txt"
fi
if has profile; then
  l8
  TPSERVE_PROFILE=60:16:$OUT/prof timeout 300 python3 bench/decode.py --model /tmp/l8 --tp 2 --batch 1 \
    --backend ray --device cuda --dtype float16 --lm-head int8 --prompt-len 128 --gen 96 \
    > "$OUT/profile_x2.log" 2>&1; tail -3 "$OUT/profile_x2.log"
  for r in 0 1; do head -22 "$OUT/prof/rank$r.txt"; done
fi
if has verify; then
  l8; q8; verify_ray 2 l8 q8
fi
if has cpu; then
  [ -e /tmp/l1/config.json ] || python3 bench/make_checkpoint.py --preset llama3-1b --out /tmp/l1 --device cuda >/dev/null
  # the demo model in fp32 (as every earlier table); the 1B shapes in bf16 (torch's int4 CPU GEMM
  # is ~4x faster in bf16 than in fp32), batch 1
  for m in demo l1; do
    arg="--batch 1 8 --dtype float32 --prompt-len 32 --gen 16"
    [ $m = l1 ] && arg="--model /tmp/l1 --batch 1 --dtype bfloat16 --prompt-len 16 --gen 8"
    timeout 280 python3 bench/decode.py $arg --tp 1 2 4 --backend ray --device cpu \
      --out "$OUT/decode_cpu16_$m.json" > "$OUT/decode_cpu16_$m.log" 2>&1
    echo "== CPU ranks, $m"; tail -8 "$OUT/decode_cpu16_$m.log"
  done
fi
if has cpudense; then
  # the demo model in fp32: small shards through their dense copies (default) against torch's
  # int4 CPU kernel (TPSERVE_CPU_DENSE_MAX_MB=0), alternating, transformers on the same host
  for r in 1 2; do for mb in 0 256; do
    TPSERVE_CPU_DENSE_MAX_MB=$mb timeout 200 python3 bench/decode.py --batch 1 8 --dtype float32 \
      --prompt-len 32 --gen 16 --tp 1 2 4 --backend ray --device cpu --peer transformers \
      --out "$OUT/decode_cpu16_dense${mb}_r$r.json" > "$OUT/decode_cpu16_dense${mb}_r$r.log" 2>&1
    echo "== CPU ranks, demo fp32, dense limit $mb MiB, round $r"
    grep -A10 "^ tp " "$OUT/decode_cpu16_dense${mb}_r$r.log" | grep -v INFO | cut -c1-110
  done; done
fi
if has cputhreads; then
  # CPU ranks' torch threads: every core shared by the ranks (TPSERVE_CPU_RESERVED_CORES=0, the
  # old default) against one core left to the driver and Ray (1, the default), alternating
  for r in 1 2; do for res in 0 1; do
    TPSERVE_CPU_RESERVED_CORES=$res timeout 200 python3 bench/decode.py --batch 1 8 --dtype float32 \
      --prompt-len 32 --gen 32 --tp 1 2 4 --backend ray --device cpu \
      --out "$OUT/decode_cpu16_reserved${res}_r$r.json" > "$OUT/decode_cpu16_reserved${res}_r$r.log" 2>&1
    echo "== CPU ranks, demo fp32, reserved cores $res, round $r"
    grep -E "^ +[124] +ray" "$OUT/decode_cpu16_reserved${res}_r$r.log" | cut -c1-110
  done; done
fi
if has cpuhead; then
  for h in coordinator rank0; do
    timeout 280 python3 bench/decode.py --tp 2 4 --batch 1 8 --backend ray --device cpu --dtype float32 \
      --prompt-len 32 --gen 32 --decode-steps 8 --temperature 0 0.8 --head-at $h \
      --out "$OUT/decode_cpu16_head_$h.json" > "$OUT/decode_cpu16_head_$h.log" 2>&1
    echo "== head at $h"; grep -A9 "^ tp " "$OUT/decode_cpu16_head_$h.log" | grep -v INFO
  done
fi
if has sampled; then
  l8
  timeout 330 python3 bench/decode.py --model /tmp/l8 --tp 1 2 --batch 1 8 --backend ray --device cuda \
    --dtype float16 --lm-head int8 --prompt-len 128 --gen 64 --allreduce cuda --decode-steps 1 8 \
    --temperature 0 0.8 --out "$OUT/decode_sampled.json" > "$OUT/decode_sampled.log" 2>&1
  grep -A17 "^ tp " "$OUT/decode_sampled.log" | grep -v INFO
fi
if has fixedsum; then
  [ -e /tmp/small/config.json ] || python3 bench/make_checkpoint.py --preset small --out /tmp/small \
    --device cuda >/dev/null
  timeout 240 python3 bench/fixed_sum_check.py --model /tmp/small --tp 2 2>&1 | grep -v INFO \
    | tee "$OUT/fixed_sum_check_tp2.log" | tail -6
  l8
  TPSERVE_FIXED_SUM=all verify_ray 2 small l8
  for f in 1 all; do  # 1: fixed-point sums at tp=1 only (tp=2 writes its sums); all: the default
    tps="2"; peer=none; [ $f = 1 ] && tps="1 2" && peer=torch-int4
    TPSERVE_FIXED_SUM=$f timeout 300 python3 bench/decode.py --model /tmp/l8 --tp $tps --batch 1 8 \
      --backend ray --device cuda --dtype float16 --peer $peer --lm-head int8 --prompt-len 128 \
      --gen 64 --decode-steps 8 --out "$OUT/decode_fixedsum_$f.json" > "$OUT/decode_fixedsum_$f.log" 2>&1
    echo "TPSERVE_FIXED_SUM=$f:"; grep -A8 "^ tp " "$OUT/decode_fixedsum_$f.log" | grep -v INFO
  done
fi
if has pdlar; then
  [ -e /tmp/small/config.json ] || python3 bench/make_checkpoint.py --preset small --out /tmp/small \
    --device cuda >/dev/null
  l8
  TPSERVE_PDL_ALLREDUCE=1 verify_ray 2 small l8
  for arm in 0 1; do
    TPSERVE_PDL_ALLREDUCE=$arm timeout 300 python3 bench/decode.py --model /tmp/l8 --tp 2 \
      --batch 1 8 --backend ray --device cuda --dtype float16 --peer none --lm-head int8 \
      --prompt-len 128 --gen 64 --decode-steps 8 --out "$OUT/decode_pdlar_$arm.json" \
      > "$OUT/decode_pdlar_$arm.log" 2>&1
    echo "TPSERVE_PDL_ALLREDUCE=$arm:"; grep -A4 "^ tp " "$OUT/decode_pdlar_$arm.log" | grep -v INFO
  done
fi
