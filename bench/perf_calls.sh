#!/usr/bin/env bash
# The device calls behind BENCHMARKS.md's issue-10 numbers, one part per call (each fits a 10-minute command):
#   bash bench/perf_calls.sh levers    BASE_DIR   # 1 GPU: main (BASE_DIR) vs this tree, one lever at a time
#   bash bench/perf_calls.sh headline             # 1 GPU: TRL's two modes and grad ckpt beside ours, first step
#   bash bench/perf_calls.sh scaling              # 4 GPUs: 7B on 4 with saves, 1.5B on 1 and 4 GPUs, resume 7B on 2
#                                                 # (SAVE_7B=hf: the Hugging Face save only, no state to resume)
# Wheels (trl, datasets, liger, transformers...) are installed by the caller; logs go to $OUT (or /tmp/out).
set -uo pipefail
PART=$1
BASE=${2:-}
OUT=${OUT:-/tmp/out}
WORK=/tmp/bw
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
LOG="$OUT/$PART.log"
timeout 60 python -c "import torch, transformers, liger_kernel; print('torch', torch.__version__, 'transformers', \
transformers.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" | tee -a "$LOG"

step() {  # seconds, then a command: its log lines go to $LOG, its result lines to stdout too
    local seconds=$1
    shift
    echo "=== $(date +%T) $*" | tee -a "$LOG"
    timeout "$seconds" "$@" 2>&1 | tee -a "$LOG" | grep -oE --line-buffered "(BENCH|PEER|SAVE) .*|host peak RSS.*|[0-9]+ (passed|failed).*|[A-Za-z]*Error.*"
    local code=${PIPESTATUS[0]}
    [ "$code" = 0 ] || { echo "FAILED ($code): $*"; tail -5 "$LOG" | cut -c1-300; }
}

bench() {  # label, then bench_train.py arguments
    local label=$1
    shift
    step 150 python bench/bench_train.py --work-dir $WORK --label "$label" "$@"
}

case $PART in
levers)
    step 150 python -m pytest -q -x tests/test_gpu.py
    step 120 python bench/bench_train.py --work-dir $WORK --prepare-only
    cp bench/bench_train.py "$BASE/bench/bench_train.py"  # main's code, timed by the same bench
    L="--use-liger-kernels --max-steps 30"
    (cd "$BASE" && bench "main" $L)
    bench "new" $L
    bench "new, Liger's own fused CE (syncs)" $L --loss liger-flce
    bench "new, compiled layers" $L --compile-layers
    bench "new, keep gathered" $L --keep-gathered
    bench "new, batch 19 samples" $L --batch-size 19
    bench "new, AC" $L --activation-checkpointing --max-steps 20
    (cd "$BASE" && bench "main, AC" $L --activation-checkpointing --max-steps 20)
    bench "new, packing in the loop" $L --no-background
    ;;
headline)
    step 120 python bench/bench_train.py --work-dir $WORK --prepare-only
    echo "Triton cache entries before our first launch: $(ls ~/.triton/cache 2>/dev/null | wc -l)"
    bench "new, first step (first launch)" --use-liger-kernels --run-name first --time-to-first-step
    bench "new, first step (data cached)" --use-liger-kernels --run-name first --time-to-first-step
    step 420 python bench/bench_train.py --work-dir $WORK --peer trl --max-steps 30
    bench "new" --use-liger-kernels --max-steps 30
    bench "new, AC" --use-liger-kernels --activation-checkpointing --max-steps 20
    ;;
scaling)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    step 90 python bench/bench_train.py --work-dir $WORK --model qwen2.5-7b --prepare-only
    step 60 python bench/bench_train.py --work-dir $WORK --prepare-only
    step 200 torchrun --standalone --nproc-per-node=4 bench/bench_train.py --work-dir $WORK --model qwen2.5-7b \
        --label "7B 4 GPUs" --run-name run7b --use-liger-kernels --max-steps 4 --warmup-steps 2 --batch-size 64 \
        --save ${SAVE_7B:-all}
    S="--use-liger-kernels --max-steps 12 --warmup-steps 4"
    bench "1.5B 1 GPU" $S
    step 90 torchrun --standalone --nproc-per-node=4 bench/bench_train.py --work-dir $WORK --label "1.5B 4 GPUs" \
        $S --batch-size 64
    [ "${SAVE_7B:-all}" = all ] && step 300 torchrun --standalone --nproc-per-node=2 bench/bench_train.py \
        --work-dir $WORK --model qwen2.5-7b --label "7B resume on 2 GPUs" --run-name run7b --use-liger-kernels \
        --max-steps 5 --warmup-steps 1 --batch-size 64 --resume
    ;;
esac
grep -oE "(BENCH|PEER|SAVE|FAILED) .*|host peak RSS.*|activation checkpointing.*|[0-9]+ (passed|failed).*" "$LOG" | cut -c1-600
