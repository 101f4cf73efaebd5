#!/usr/bin/env bash
# GPU end-to-end check: the demo pipeline and a Qwen2.5-1.5B-shaped model on NGPU GPUs, Liger on and off.
# For each run: the loss must fall on the learnable demo set, and the final checkpoint must reload with
# from_pretrained (tied weights tied) and give finite logits.
#   bash bench/gpu_check.sh 1 /tmp/gpu_check       # one GPU
#   bash bench/gpu_check.sh 2 /tmp/gpu_check       # two GPUs
set -euo pipefail
NGPU=${1:-1}
WORK=${2:-/tmp/gpu_check}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."

python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"

python tiny_model.py --output-dir "$WORK/tiny-model" >/dev/null
python process_data.py --input-file demo/chats.jsonl --output-file "$WORK/demo.jsonl" \
    --model-name-or-path "$WORK/tiny-model" --num-proc 4 --num-examples-to-print 0 | tail -3

check_run() {  # output_dir: loss fell, checkpoint reloads
    python - "$1" <<'EOF'
import json, sys, pathlib, torch
from transformers import AutoModelForCausalLM
out = pathlib.Path(sys.argv[1])
metrics = [json.loads(line) for line in open(out / "training_metrics.jsonl")]
first, last = metrics[0]["loss"], metrics[-1]["loss"]
checkpoint = sorted((out / "hf_format").iterdir(), key=lambda p: int(p.name.split("_")[1]))[-1]
model = AutoModelForCausalLM.from_pretrained(checkpoint)
tied = model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
logits = model(torch.arange(8)[None]).logits
print(f"CHECK {out.name}: steps {len(metrics)} loss {first:.3f} -> {last:.3f}, checkpoint {checkpoint.name} "
      f"dtype {model.dtype} tied {tied} finite {bool(torch.isfinite(logits).all())} "
      f"tok/s {metrics[-1]['tokens_per_second']:.0f} mfu {metrics[-1]['mfu']} mem {metrics[-1]['peak_memory_gb']} GB")
assert last < 0.5 * first and torch.isfinite(logits).all()
EOF
}

train_and_check() {  # model folder under $WORK, then train.py flags: a run with Liger and one without
    local model=$1
    shift
    for liger in --use-liger-kernels --no-use-liger-kernels; do
        run="$WORK/$model-${NGPU}gpu$liger"
        rm -rf "$run"
        torchrun --standalone --nproc-per-node="$NGPU" train.py --data-path "$WORK/demo.jsonl" \
            --model-name-or-path "$WORK/$model" --output-dir "$run" --num-warmup-steps 2 --seed 893 "$@" $liger \
            2>&1 | grep -v "it/s" | tail -3
        check_run "$run"
        rm -rf "$run/hf_format"  # checked; a 1.5B checkpoint is 3 GB
    done
}

train_and_check tiny-model --batch-size 16 --max-tokens-per-gpu 2048 --learning-rate 3e-3 --num-epochs 3

# Qwen2.5-1.5B shape, random init, on the demo chats (tokenized with the tiny tokenizer: ids < 320 < vocab)
python - "$WORK" <<'EOF'
import sys, torch
sys.path.insert(0, "bench")
from bench_train import QWEN25_15B
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
work = sys.argv[1]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN25_15B, dtype="bfloat16"), dtype=torch.bfloat16)
model.save_pretrained(f"{work}/qwen1.5b")
AutoTokenizer.from_pretrained(f"{work}/tiny-model").save_pretrained(f"{work}/qwen1.5b")
EOF
train_and_check qwen1.5b --batch-size 32 --max-tokens-per-gpu 4096 --learning-rate 1e-4 --num-epochs 2
