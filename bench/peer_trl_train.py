"""TRL's SFTTrainer on bench_train.py's workload, the peer of train.py; run by bench_train.py --peer trl.

Runs under a python that has trl (not a project dependency):

    python bench/peer_trl_train.py --data-path data.jsonl --model-dir model --max-length 16384 --modes bf16,fp32

Same samples (input_ids, and their labels as TRL's completion_mask with completion_only_loss=True), packing=True
(best-fit decreasing rows of at most --max-length tokens), padding_free=True, flex_attention, Liger's layer kernels
(TRL computes the loss with its own chunked LM head), one packed row per optimizer step, fused AdamW with the
betas, clipping and LR of train.py. Modes, all in this one process so that flex_attention is compiled once:

    bf16      weights loaded in the checkpoint's dtype (bf16), what TRL does with a bf16 checkpoint
    fp32      fp32 master weights, bf16 autocast (train.py's numerics)
    bf16-gc   bf16 weights with gradient checkpointing

tokens/s counts every token of the rows over the wall time from the end of step --warmup-steps to the end of the
last step (a callback waits for the GPU at each step end). The first mode's first step includes the compile.
Prints one PEER JSON line per mode.
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

LAUNCH = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--modes", default="bf16,fp32,bf16-gc")
    parser.add_argument("--work-dir", default="/tmp/peer_trl")
    parser.add_argument("--attn-implementation", default="flex_attention")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tiny_model import build_tiny_tokenizer

    rows = [json.loads(line) for line in open(args.data_path)]
    dataset = datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in rows],
        "completion_mask": [[int(label != -100) for label in r["labels"]] for r in rows],
    })
    tokenizer = build_tiny_tokenizer()  # the data is tokenized already: TRL needs only a pad token from it
    cuda = torch.cuda.is_available()  # the CPU only checks this script with a tiny model

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    for mode in args.modes.split(","):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        config = SFTConfig(
            output_dir=os.path.join(args.work_dir, mode), per_device_train_batch_size=1,
            gradient_accumulation_steps=1, max_steps=args.max_steps, learning_rate=1e-5, warmup_steps=2,
            lr_scheduler_type="constant_with_warmup", adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch_fused", bf16=cuda, packing=True, padding_free=True, max_length=args.max_length,
            completion_only_loss=True, use_liger_kernel=cuda, gradient_checkpointing=mode.endswith("-gc"),
            model_init_kwargs={"dtype": torch.float32 if mode.startswith("fp32") else "auto",
                               "attn_implementation": args.attn_implementation},
            save_strategy="no", report_to=[], logging_steps=10, seed=42, dataloader_num_workers=0,
        )  # fmt: skip
        timer = StepTimer()
        start, start_wall = time.perf_counter(), time.time()
        trainer = SFTTrainer(model=args.model_dir, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
        tokens: list[int] = []
        compute_loss = trainer.compute_loss

        def counting_compute_loss(model, inputs, *a, _compute_loss=compute_loss, _tokens=tokens, **k):
            _tokens.append(int(inputs["input_ids"].numel()))
            return _compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = counting_compute_loss
        trainer.train()
        ends, w = timer.ends, args.warmup_steps
        seconds = ends[-1] - ends[w - 1]
        result = dict(
            peer="trl", mode=mode, trl=trl.__version__, transformers=transformers.__version__,
            torch=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu",
            weights_dtype=str(next(trainer.model.parameters()).dtype), steps=len(ends), timed_steps=len(ends) - w,
            tokens_per_second=round(sum(tokens[w:len(ends)]) / seconds),
            tokens_per_step=round(sum(tokens) / len(tokens)),
            peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
            first_step_s_since_trainer_init=round(ends[0] - start, 1),
            first_step_s_since_launch=round(start_wall + ends[0] - start - LAUNCH, 1),
            step_s=[round(b - a, 3) for a, b in zip([start, *ends[:-1]], ends, strict=True)],
        )
        print("PEER " + json.dumps(result), flush=True)
        del trainer, compute_loss
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
