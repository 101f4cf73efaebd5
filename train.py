"""Full fine-tuning of a Hugging Face causal LM with FSDP2, token-budget multipacking and padding-free attention.

    torchrun --nproc-per-node=8 train.py --data-path tokenized.jsonl --model-name-or-path Qwen/Qwen2.5-1.5B-Instruct \
        --output-dir out --batch-size 128 --max-tokens-per-gpu 16384 --learning-rate 6e-6 --num-warmup-steps 20

Every optimizer step is mathematically one big batch on one device: the loss is the sum of cross-entropy over every
loss token of the step, on all ranks and micro-batches, divided by the number of those tokens.
"""

import argparse
import dataclasses
import importlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from checkpoint import (
    MARKER,
    STATE_DIR,
    Checkpointer,
    PreemptionSignal,
    Progress,
    already_finished,
    check_resume_params,
    choose_resume_state,
    is_complete,
    latest_hf_checkpoint,
    latest_state,
    load_state,
    read_trainer_state,
    save_due,
    save_run_params,
)
from data import PackedStep, in_background, load_data, pack_micro_batch, pack_steps
from distributed import (
    Dist,
    cleanup_distributed,
    fail_distributed,
    init_distributed,
    report_host_memory,
    run_and_exit,
)
from evaluation import evaluate, evaluation_due, training_and_validation
from metrics import RunReport
from model import (
    CausalLMWithSummedLoss,
    apply_activation_checkpointing,
    apply_fsdp,
    apply_liger,
    choose_activation_checkpointing,
    choose_attn_implementation,
    clip_grad_norm,
    device_peak_flops,
    load_model,
    materialize_weights,
    model_path_problem,
    step_flops,
)
from sampler import batches_from
from utils import print0


# ----------------------------------------------------------------------------------------------------------------------
# Defaults: edit them here, or override any of them on the command line (--batch-size 64 ...).
@dataclass
class TrainConfig:
    data_path: str = field(default="", metadata={"help": "Tokenized JSONL written by process_data.py."})
    model_name_or_path: str = field(default="", metadata={"help": "Hub id or local folder of the model to tune."})
    output_dir: str = field(default="", metadata={"help": "Where checkpoints and metrics are written."})
    batch_size: int = field(default=128, metadata={"help": "Samples per optimizer step, over all GPUs."})
    max_tokens_per_gpu: int = field(default=16384, metadata={"help": "Token budget of one micro-batch on one GPU."})
    learning_rate: float = field(default=6e-6, metadata={"help": "Peak learning rate of AdamW."})
    num_warmup_steps: int = field(default=20, metadata={"help": "Steps of linear warmup from 0."})
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata={"help": "LR after warmup.", "choices": ["constant_with_warmup", "cosine", "linear"]},
    )
    num_epochs: int = field(default=1, metadata={"help": "Passes over the data."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (the LR schedule still spans "
                                "--num-epochs, so a stopped run resumes exactly)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this."})
    validation_split: float | None = field(
        default=None, metadata={"help": "Hold out this fraction of the data, chosen from --seed (the same on any "
                                "number of GPUs and on resume), never trained on, and evaluate on it."}
    )
    validation_data_path: str | None = field(
        default=None, metadata={"help": "Tokenized JSONL to evaluate on, instead of --validation-split."}
    )
    eval_every_samples: int | None = field(
        default=None, metadata={"help": "Evaluate each time the samples seen pass a multiple of this; the "
                                "validation data is always evaluated at the end."}
    )
    report_to: str = field(
        default="none", metadata={"help": "Also log every step to this tracker (rank 0; wandb goes offline when "
                                  "there is no API key).", "choices": ["none", "tensorboard", "wandb"]}
    )
    min_samples_per_checkpoint: int = field(
        default=10000, metadata={"help": "Save a Hugging Face checkpoint (and a state) each time the samples seen "
                                  "since the last one reach this."}
    )
    save_state_every_samples: int | None = field(
        default=None, metadata={"help": "Also save a state each time the samples seen since the last one reach "
                                 "this."}
    )
    keep_last_states: int = field(default=2, metadata={"help": "Resumable states kept in output-dir/state."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete state in output-dir."})
    resume_from: str | None = field(default=None, metadata={"help": "Continue from this state folder."})
    force_resume: bool = field(
        default=False, metadata={"help": "Resume even if batch size, seed or data differ from the saved run."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Start over in an output-dir that holds a run (deletes its outputs)."}
    )
    max_bad_steps: int = field(
        default=5, metadata={"help": "Stop after more than this many non-finite steps in a row."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the data order and of torch."})
    use_liger_kernels: bool = field(default=False, metadata={"help": "Liger kernels and fused linear CE (GPU)."})
    fsdp_sharding_strategy: str = field(
        default="FULL_SHARD",
        metadata={
            "help": "FULL_SHARD: reshard after forward; SHARD_GRAD_OP: keep gathered until backward; "
            "HYBRID_SHARD: shard within a node, replicate across nodes; NO_SHARD: replicate.",
            "choices": ["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"],
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Compute dtype (default: bf16 on GPU, fp32 on CPU).", "choices": ["bf16", "fp32"]},
    )
    activation_checkpointing: str = field(
        default="auto",
        metadata={"help": "Recompute each decoder layer in backward to save memory; auto: only if the run would "
                  "not fit without it (estimated from the model and --max-tokens-per-gpu; always off on CPU).",
                  "choices": ["auto", "on", "off"]},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (default: packed, mini_trainer's own; see README's Model families)."},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line: argparse built from TrainConfig, and every problem with the arguments reported at once


class ArgumentParser(argparse.ArgumentParser):
    """An argparse error is one line from rank 0, like every other problem, not a usage block from each rank."""

    def error(self, message: str) -> NoReturn:
        fail_distributed(f"{message} (train.py --help lists the flags)")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Builds argparse from TrainConfig, so that the defaults above are the only ones."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if f.name == "activation_checkpointing":  # a bare flag still means "on"
            parser.add_argument(flag, nargs="?", const="on", default=f.default, choices=f.metadata["choices"],
                                help=help_text + f" (default: {f.default})")
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="off")
            continue
        value_type = {"int | None": int, "str | None": str, "float | None": float}.get(str(f.type), f.type)
        required = f.default == ""
        parser.add_argument(
            flag, type=value_type, default=None if required else f.default, required=required,
            choices=f.metadata.get("choices"), help=help_text + ("" if required else f" (default: {f.default})"),
        )
    return TrainConfig(**vars(parser.parse_args(argv)))


def validate(config: TrainConfig) -> list[str]:
    """Every problem with the arguments at once, each with what to do."""
    problems = [problem for problem in [model_path_problem(config.model_name_or_path)] if problem]
    for flag, path in (("--data-path", config.data_path), ("--validation-data-path", config.validation_data_path)):
        if path is not None and not os.path.isfile(path):
            problems.append(f"{flag} {path} does not exist" if not os.path.exists(path) else f"{flag} {path} is "
                            "not a file")
    for name in ("batch_size", "max_tokens_per_gpu", "num_epochs", "min_samples_per_checkpoint", "keep_last_states"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("num_warmup_steps", "max_bad_steps"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("max_steps", "save_state_every_samples", "eval_every_samples"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if config.overwrite and (config.resume or config.resume_from):
        problems.append("--overwrite starts over, --resume and --resume-from continue: pick one")
    if config.resume_from and not is_complete(config.resume_from):
        problems.append(f"--resume-from {config.resume_from} is not a complete state (no {MARKER} marker); "
                        f"pick a step_<S> folder of output-dir/{STATE_DIR}, or use --resume for the newest")
    if config.use_liger_kernels and not torch.cuda.is_available():
        problems.append("--use-liger-kernels needs a CUDA GPU (Liger's kernels are Triton); leave it out on CPU")
    if config.validation_split is not None and not 0 < config.validation_split < 1:
        problems.append(f"--validation-split {config.validation_split} must be a fraction between 0 and 1")
    if config.validation_split is not None and config.validation_data_path:
        problems.append("--validation-split and --validation-data-path both give validation data: pick one")
    if config.eval_every_samples and config.validation_split is None and not config.validation_data_path:
        problems.append("--eval-every-samples needs validation data: --validation-split or --validation-data-path")
    if config.report_to != "none":
        try:  # only the tracker asked for is imported
            importlib.import_module(config.report_to)
        except ImportError:
            problems.append(f"--report-to {config.report_to} needs the {config.report_to} package: "
                            f"pip install {config.report_to}")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_factor(step: int, num_warmup_steps: int, total_steps: int, scheduler: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based).

    Warmup rises linearly from 0: step / num_warmup_steps. Then constant, or cosine / linear decay that
    reaches 0 at the last step (total_steps - 1).
    """
    if step < num_warmup_steps:
        return step / num_warmup_steps
    if scheduler == "constant_with_warmup":
        return 1.0
    decay_steps = max(1, total_steps - 1 - num_warmup_steps)
    progress = min(1.0, (step - num_warmup_steps) / decay_steps)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr scheduler {scheduler}")


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=config.weight_decay, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------------
# Training


def train_step(wrapper, optimizer, scheduler, step: PackedStep, config: TrainConfig, d: Dist,
               inject_nan: bool = False) -> dict:
    """One optimizer step over one global batch, of which `step` holds this rank's micro-batches.

    A non-finite loss or gradient norm drops the step's gradients and skips both the optimizer and the LR
    scheduler, so the schedule counts the updates actually applied. Every rank sees the same all-reduced
    values, so all agree on the skip. On CUDA the host never waits for the GPU before the whole step is queued: the
    update is skipped on the device (fused AdamW's found_inf, the flag torch.amp.GradScaler hands it), and the
    loss and gradient norm are read back once, after the optimizer step.
    """
    loss_scale = d.world_size / step.num_loss_tokens  # FSDP averages gradients over ranks; we want the global sum
    loss_sum = torch.zeros((), device=d.device)
    for host_batch in step.micro_batches:
        ce_sum = wrapper(host_batch.to(d.device))
        if inject_nan:
            ce_sum = ce_sum * float("nan")
        (ce_sum * loss_scale).backward()
        loss_sum += ce_sum.detach()
    grad_norm = clip_grad_norm(wrapper, config.max_grad_norm)
    dist.all_reduce(loss_sum)
    lr = scheduler.get_last_lr()[0]
    skip_on_device = optimizer.defaults["fused"]  # on CUDA; the CPU has no GPU to keep busy
    if skip_on_device:
        optimizer.found_inf = (~(loss_sum.isfinite() & grad_norm.isfinite())).float()
        optimizer.step()
    loss_sum, grad_norm = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()
    loss = loss_sum / step.num_loss_tokens
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        if not skip_on_device:
            optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "skipped": skipped,
        "num_samples": len(step.sample_ids),
        "num_loss_tokens": step.num_loss_tokens,
        "num_tokens": step.num_tokens,
        "micro_batches": len(step.micro_batches),
    }


def main(argv: list[str] | None = None) -> None:
    start_time = time.time()
    config = parse_args(argv)
    problems = validate(config)
    if problems:
        fail_distributed("\n  ".join(["invalid arguments:", *problems]))
    d = init_distributed()
    preemption = PreemptionSignal()
    torch.manual_seed(config.seed)
    resume_path = choose_resume_state(config.output_dir, config.resume, config.resume_from, config.overwrite, d)
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards": noise in a log file

    # Data
    model_config = AutoConfig.from_pretrained(config.model_name_or_path)
    data = load_data(config.data_path, config.output_dir, config.max_tokens_per_gpu, model_config.vocab_size, d)
    if len(data) == 0:
        fail_distributed(f"{config.data_path}: no usable sample (empty file, or every sample was dropped)")
    validation_data = load_data(config.validation_data_path, config.output_dir, config.max_tokens_per_gpu,
                                model_config.vocab_size, d) if config.validation_data_path else None
    train_ids, validation = training_and_validation(data, validation_data, config.validation_split, config.seed,
                                                    config.batch_size, config.max_tokens_per_gpu, d)
    if config.batch_size > len(train_ids):
        held_out = ", after the validation split" if config.validation_split is not None else ""
        fail_distributed(f"--batch-size {config.batch_size} is larger than the dataset "
                         f"({len(train_ids)} usable samples{held_out}); lower it")
    # The schedule spans every epoch; --max-steps only stops early, so a stopped and resumed run keeps its LR curve.
    total_steps = math.ceil(len(train_ids) / config.batch_size) * config.num_epochs
    stop_step = min(total_steps, config.max_steps or total_steps)
    run_params = {**dataclasses.asdict(config), "world_size": d.world_size, "total_steps": total_steps,
                  "num_samples": len(data), "data_fingerprint": data.fingerprint}
    if resume_path is not None:
        check_resume_params(read_trainer_state(resume_path)["run_params"], run_params, config.force_resume,
                            resume_path)
        done_step = already_finished(resume_path, stop_step, config.output_dir)
        if done_step is not None:
            limit = f"of {total_steps}" if stop_step == total_steps else f"(--max-steps {config.max_steps})"
            print0(f"the run in {config.output_dir} already finished at step {done_step} {limit}; nothing to do")
            cleanup_distributed()
            return

    # Model
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype or
                                                                    ("bf16" if d.device.type == "cuda" else "fp32")]
    attn_implementation = choose_attn_implementation(config.attn_implementation)
    model, full_state_dict, buffers, own_head_reason = load_model(config.model_name_or_path, attn_implementation, d)
    if config.use_liger_kernels:
        apply_liger(model)
    num_params = sum(p.numel() for p in model.parameters())
    use_checkpointing, why = choose_activation_checkpointing(
        config.activation_checkpointing, config.fsdp_sharding_strategy, config.max_tokens_per_gpu, model_config,
        num_params, d)
    print0(f"activation checkpointing {'on' if use_checkpointing else 'off'} ({why})")
    if use_checkpointing:
        apply_activation_checkpointing(model)
    wrapper = CausalLMWithSummedLoss(model, config.use_liger_kernels, own_head_reason, config.max_tokens_per_gpu)
    apply_fsdp(wrapper, config.fsdp_sharding_strategy, compute_dtype, d)
    materialize_weights(wrapper, full_state_dict, buffers, d)
    del full_state_dict, buffers
    wrapper.refuse_unsupported(pack_micro_batch(data, [0], d.device))  # a no-grad forward of one sample
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path) if d.rank == 0 else None
    print0(f"model {config.model_name_or_path}: {num_params / 1e6:.1f}M parameters, "
           f"attention {attn_implementation}, compute {compute_dtype}, {d.world_size} ranks, "
           f"{config.fsdp_sharding_strategy}; loss: {wrapper.describe_loss()}")

    # Optimizer
    optimizer = build_optimizer(wrapper, config, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.num_warmup_steps, total_steps, config.lr_scheduler))

    # Resume
    progress = Progress()
    if resume_path is not None:
        progress = load_state(resume_path, wrapper, optimizer, scheduler)
        print0(f"resumed from {resume_path}: step {progress.step}, epoch {progress.epoch}, "
               f"batch {progress.batch_index} of the epoch, {progress.samples_seen} samples seen")

    # Loop
    output_dir = Path(config.output_dir)
    save_run_params(output_dir, {**run_params, "attn_implementation": attn_implementation}, d)
    report = RunReport(output_dir, progress.step, stop_step, config.report_to, run_params, enabled=d.rank == 0)
    peak_flops = device_peak_flops(d.device)
    # Test hook: these steps' losses are multiplied by NaN, to exercise the non-finite path end to end.
    nan_steps = {int(s) for s in os.environ.get("MINI_TRAINER_TEST_NAN_STEPS", "").split(",") if s}
    checkpointer = Checkpointer(wrapper, optimizer, scheduler, tokenizer, config.output_dir, config.keep_last_states,
                                run_params, d)
    loop_start, preempted = time.time(), False
    batches = ((epoch, batch_index, train_ids[positions].tolist()) for epoch, batch_index, positions in
               batches_from(len(train_ids), config.batch_size, config.seed, config.num_epochs, progress.epoch,
                            progress.batch_index))
    for packed in in_background(pack_steps(data, batches, config.max_tokens_per_gpu, d)):
        if progress.step >= stop_step:
            break
        step_start = time.time()
        metrics = train_step(wrapper, optimizer, scheduler, packed, config, d,
                             inject_nan=progress.step + 1 in nan_steps)
        progress.step += 1
        progress.epoch, progress.batch_index = packed.epoch, packed.batch_index + 1
        progress.samples_seen += metrics["num_samples"]
        progress.bad_steps += metrics["skipped"]
        progress.bad_steps_in_a_row = progress.bad_steps_in_a_row + 1 if metrics["skipped"] else 0
        step, step_time = progress.step, time.time() - step_start
        flops = step_flops(model_config, data.lengths[packed.sample_ids])
        eval_due = validation is not None and (step == stop_step or evaluation_due(
            progress.samples_seen, metrics["num_samples"], config.eval_every_samples))
        metrics.update(
            step=step, bad_steps=progress.bad_steps, tokens_per_second=metrics["num_tokens"] / step_time,
            epoch=packed.epoch, mfu=flops / step_time / (peak_flops * d.world_size) if peak_flops else None,
            peak_memory_gb=torch.cuda.max_memory_allocated(d.device) / 1e9 if d.device.type == "cuda" else None,
            eval_loss=evaluate(wrapper, validation, d) if eval_due else None, elapsed_s=time.time() - loop_start,
        )
        report.log(metrics, step_time, flops)
        if metrics["skipped"]:
            print0(f"step {step}: non-finite loss {metrics['loss']} or gradient norm {metrics['grad_norm']}; "
                   f"skipped the update ({progress.bad_steps_in_a_row} in a row)")
        if progress.bad_steps_in_a_row > config.max_bad_steps:
            fail_distributed(f"{progress.bad_steps_in_a_row} non-finite steps in a row (up to step {step}), more "
                             f"than --max-bad-steps {config.max_bad_steps}: stopping without saving. The weights "
                             "were never updated by those steps; the newest saved state is "
                             f"{latest_state(output_dir)}. Lower the learning rate or check the data")
        if save_due(progress.samples_seen, progress.samples_at_last_checkpoint, config.min_samples_per_checkpoint):
            progress.samples_at_last_checkpoint = progress.samples_at_last_state = progress.samples_seen
            checkpointer.save(progress, hf=True)
            report.plot()
        elif save_due(progress.samples_seen, progress.samples_at_last_state, config.save_state_every_samples):
            progress.samples_at_last_state = progress.samples_seen
            checkpointer.save(progress, hf=False)
            report.plot()
        if preemption.agreed(d.device):
            preempted = True
            print0(f"received {preemption.received or 'a signal on another rank'}: stopping after step {step}")
            break

    # Final save: whatever the last step lacks. A preempted run saves only its state, the fast part.
    hf_missing, state_missing = checkpointer.missing(progress)
    save_hf = hf_missing and not preempted
    if (save_hf or state_missing) and not checkpointer.save(progress, hf=save_hf):
        fail_distributed("the final save failed (see above); the earlier checkpoints and states are intact")
    stop_reason = (f"stopped by {preemption.received or 'a signal on another rank'}" if preempted else
                   "finished" if progress.step >= total_steps else f"stopped by --max-steps {config.max_steps}")
    report.finish(stop_reason, total_steps, time.time() - start_time, peak_flops * d.world_size if peak_flops else None,
                  latest_hf_checkpoint(output_dir), latest_state(output_dir))
    report_host_memory(d)
    cleanup_distributed()


if __name__ == "__main__":
    run_and_exit(main)
