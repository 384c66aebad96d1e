# Sourced by the device scripts (bench/gpu_h100.sh, gpu_allreduce.sh, gpu_x4.sh) from the repo
# root with their stage arguments: the carried wheels (.whl: ray, pyzmq, the HTTP stack), kernels/
# where `tpserve.kernels` is imported from (this copy of the tree is the device's own), the
# environment, $OUT, the GPUs, `has STAGE`, the checkpoints made on demand, and `verify_ray`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
[ -e tpserve/kernels ] || cp -r kernels tpserve/kernels
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TPSERVE_CACHE=/tmp/tpserve-cache RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -5; nproc
STAGES=" ${*:-all} "  # one or more stages
has() { [[ "$STAGES" == *" $1 "* || "$STAGES" == *" all "* ]]; }
l8() { [ -e /tmp/l8/config.json ] || python3 bench/make_checkpoint.py --preset llama3-8b --out /tmp/l8 --device cuda >/dev/null; }
q8() { [ -e /tmp/q8/config.json ] || python3 bench/make_checkpoint.py --preset qwen-straddle --layers 8 --out /tmp/q8 --device cuda >/dev/null; }
# verify_ray TP NAME...: `tpserve verify` over Ray at TP on /tmp/NAME each, into $OUT/verify_x${TP}_NAME.txt
verify_ray() {
  local tp=$1; shift
  for m in "$@"; do
    timeout 240 python3 -m tpserve.cli verify --model /tmp/$m --tp $tp --backend ray --device cuda --dtype float16 \
      --max-tokens 16 > "$OUT/verify_x${tp}_$m.txt" 2> "$OUT/verify_x${tp}_$m.log"; echo "verify $m tp=$tp ray: exit $?"
    head -9 "$OUT/verify_x${tp}_$m.txt"
  done
}
