#!/usr/bin/env bash
# The benchmark set of issue 9 on one H100: every result as JSON (and the printed tables as .txt)
# in one folder. Each part stays well inside a device call's 10-minute limit; run the parts in as
# few calls as the limit allows (a fresh machine costs minutes of device time).
#
#   bash kd_jax/bench/h100.sh fetch
#       Here, on a machine with PyPI: download into .whl/ (git-ignored through .git/info/exclude)
#       the wheels the device image lacks, for its Python 3.12: grain and what it and
#       kd_jax.train import beyond the image (array-record, portpicker, datasets, dill,
#       multiprocess, tensorboardX) and liger-kernel for the PyTorch baseline (its torch and triton
#       are the image's). About 15 MiB.
#
#   bash kd_jax/bench/h100.sh run OUT [PART ...]
#       On the device (carry: [".whl"]), from the repository root. PARTs, default all in order:
#         flops       analytic FLOPs per token of the student shapes (no device work)
#         loss        fused vs naive KD loss, fwd+bwd, 16384x1536x151936 (and 4096x1536x151936)
#         input       Grain + TensorStore pipeline alone on a synthetic store, seq 4096
#         precompute  teacher forward + top-K, Qwen2.5-7B shape, and 1.5B
#         step05      Qwen2.5-0.5B-shaped student, seq 4096: the tuning sweep as variants
#         step15      Qwen2.5-1.5B-shaped student, seq 4096: the tuning sweep as variants
#         xla         the 1.5B step with and without XLA flags (latency-hiding scheduler), two processes
#         torch       transformers + Liger on the same shapes, batch and top-K tensors
#       e.g. through the device tool:
#         run(command="bash kd_jax/bench/h100.sh run $OUT flops loss input precompute", carry=[".whl"])
#         run(command="bash kd_jax/bench/h100.sh run $OUT step05 step15", carry=[".whl"])
#         run(command="bash kd_jax/bench/h100.sh run $OUT xla torch", carry=[".whl"])
set -uo pipefail

WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        tensorboardX==2.6.5 liger-kernel==0.8.5)
B=${BENCH_BATCH:-8}          # rows per step at seq 4096 (32768 tokens)
STEPS=${BENCH_STEPS:-5}      # timed steps per variant
PY=${PYTHON:-python3}

fetch() {
  local exclude; exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w" || exit 1
  done
  ls -l .whl
}

setup() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
}

# bench NAME ARGS...: python -m kd_jax.bench ARGS --out OUT/NAME.json, the table into OUT/NAME.txt.
bench() {
  local name=$1; shift
  echo "=== $name: $*"
  "$PY" -m kd_jax.bench "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt" | grep -v -i warning
  [ "${PIPESTATUS[0]}" = 0 ] || echo "!!! $name failed (see $OUT/$name.txt)"
}

# The step sweep: one process, shared parameters, variants alternated (kd_jax/bench/step.py).
SWEEP=(--variant name=xla
       --variant name=cudnn,attention=cudnn
       --variant name=cudnn+dots_nobatch,attention=cudnn,remat=dots_with_no_batch_dims_saveable
       --variant name=cudnn+chunk1024,attention=cudnn,chunk=1024
       --variant name=cudnn+chunk2048,attention=cudnn,chunk=2048
       --variant name=cudnn+unrolled,attention=cudnn,scan=false)

part() {
  case $1 in
    flops) bench flops flops --seq-len 4096 ;;
    loss) bench loss loss --shapes 4096x1536x151936,16384x1536x151936 --repeats 5 --warmup 2 ;;
    input) bench input input --synthetic 2000 --seq-len 4096 --batch "$B" --batches 100 --warmup 10 ;;
    precompute)
      bench precompute_7b precompute --preset qwen2.5-7b --batch 4 --seq-len 4096 --logits-chunks 256,512,1024 \
        --attention cudnn --steps "$STEPS"
      bench precompute_1.5b precompute --preset qwen2.5-1.5b --batch 8 --seq-len 4096 --logits-chunks 512 \
        --attention cudnn --steps "$STEPS" ;;
    step05)
      bench step_0.5b step --preset qwen2.5-0.5b --batch "$B" --seq-len 4096 --steps "$STEPS" "${SWEEP[@]}" \
        --variant name=cudnn+no_remat,attention=cudnn,remat=none \
        --variant name=cudnn+fp32_compute,attention=cudnn,dtype=float32 run.tensorboard=false ;;
    step15)
      bench step_1.5b step --preset qwen2.5-1.5b --batch "$B" --seq-len 4096 --steps "$STEPS" "${SWEEP[@]}" \
        run.tensorboard=false ;;
    xla)
      local best=${BENCH_BEST:-name=cudnn,attention=cudnn}
      XLA_FLAGS= bench xla_default step --preset qwen2.5-1.5b --batch "$B" --seq-len 4096 --steps "$STEPS" \
        --variant "$best"
      XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" bench xla_lhs step --preset qwen2.5-1.5b \
        --batch "$B" --seq-len 4096 --steps "$STEPS" --variant "$best"
      XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false" \
        bench xla_lhs_notriton step --preset qwen2.5-1.5b --batch "$B" --seq-len 4096 --steps "$STEPS" \
        --variant "$best" ;;
    torch)
      bench torch_0.5b torch --preset qwen2.5-0.5b --batch "$B" --seq-len 4096 --steps "$STEPS" --loss liger
      bench torch_0.5b_gc torch --preset qwen2.5-0.5b --batch "$B" --seq-len 4096 --steps "$STEPS" --loss liger \
        --gradient-checkpointing
      bench torch_1.5b_gc torch --preset qwen2.5-1.5b --batch "$B" --seq-len 4096 --steps "$STEPS" --loss liger \
        --gradient-checkpointing
      bench torch_1.5b_gc_bf16 torch --preset qwen2.5-1.5b --batch "$B" --seq-len 4096 --steps "$STEPS" \
        --loss liger --gradient-checkpointing --precision bf16 ;;
    *) echo "unknown part $1"; exit 2 ;;
  esac
}

case ${1:-} in
  fetch) fetch ;;
  run)
    OUT=${2:?usage: h100.sh run OUT [PART ...]}; shift 2
    mkdir -p "$OUT"
    setup
    for p in "${@:-flops loss input precompute step05 step15 xla torch}"; do
      for q in $p; do part "$q"; done
    done ;;
  *) sed -n '2,30p' "$0"; exit 2 ;;
esac
