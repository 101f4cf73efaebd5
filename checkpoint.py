"""Everything that writes or reads a run's outputs: Hugging Face checkpoints, resumable states, the choice of the
state to resume from, and preemption.

    output_dir/hf_format/samples_<N>/   a Hugging Face checkpoint (weights in the model's dtype, config, tokenizer)
    output_dir/state/step_<S>/
        .metadata, __<r>_0.distcp   model and optimizer, sharded by torch.distributed.checkpoint (reshardable)
        trainer_state.json          progress (step, data position, counters), LR scheduler, run parameters
        rng_rank_<r>.pt             RNG states of rank r: torch, CUDA, numpy, python
        COMPLETE                    written last; a folder without it is never loaded

Both are written into a temporary folder renamed once complete, so a crash at any moment leaves the earlier ones as
they were. Every rank writes its shards of a state into the same folder: the filesystem must be shared, as it is
for the Hugging Face checkpoints.
"""
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from distributed import Dist, broadcast_from_rank0, fail_distributed, first_error
from hf_stream import gathered, saved_tensors, write_weights
from utils import atomic_directory, atomic_write, print0

STATE_DIR = "state"
MARKER = "COMPLETE"
# Settings that decide which samples make up each step: changing them on resume breaks the data order.
DATA_ORDER_PARAMS = ("batch_size", "seed", "data_fingerprint", "validation_split")
# Settings of the optimizer and the schedule: a changed one applies from the next step (load_state).
HYPERPARAMETERS = ("learning_rate", "weight_decay", "max_grad_norm", "lr_scheduler", "num_warmup_steps", "num_epochs",
                   "total_steps")
# Settings that are expected to change between a run and its resumption.
RESUME_ONLY_PARAMS = ("output_dir", "data_path", "max_steps", "resume", "resume_from", "force_resume", "overwrite",
                      "save_state_every_samples", "keep_last_states", "min_samples_per_checkpoint", "max_bad_steps",
                      "world_size", "validation_data_path", "eval_every_samples", "report_to")
# Test hook: SIGKILL rank 0 in the middle of saving the state of this step (shards written, no marker yet).
KILL_IN_SAVE_STEP = os.environ.get("MINI_TRAINER_TEST_KILL_IN_SAVE")


@dataclass
class Progress:
    """Where training stands, besides weights, optimizer and RNG. The next batch is batch `batch_index` of
    epoch `epoch`: with the sampler a pure function of (seed, epoch), that is the whole data position."""

    step: int = 0  # optimizer steps taken, skipped ones included
    epoch: int = 0
    batch_index: int = 0
    samples_seen: int = 0
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    bad_steps_in_a_row: int = 0
    samples_at_last_checkpoint: int = 0  # samples_seen when the last Hugging Face checkpoint was saved
    samples_at_last_state: int = 0  # and when the last state was saved


# ----------------------------------------------------------------------------------------------------------------------
# Finding states


def state_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_states(output_dir: str | os.PathLike) -> list[Path]:
    """Complete states of a run, oldest first; half-written ones (no marker, or still .tmp) are ignored."""
    root = Path(output_dir) / STATE_DIR
    if not root.is_dir():
        return []
    states = [p for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit() and is_complete(p)]
    return sorted(states, key=state_step)


def latest_state(output_dir: str | os.PathLike) -> Path | None:
    states = complete_states(output_dir)
    return states[-1] if states else None


def prune_states(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Keeps the newest `keep_last` complete states, and removes leftovers of saves that were interrupted."""
    root = Path(output_dir) / STATE_DIR
    for old in complete_states(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading


def describe(error: BaseException) -> str:
    """One line per failure; DCP's CheckpointException carries each failing rank's exception and traceback."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {describe(exc)}" for rank, (exc, _) in sorted(error.failures.items()))
    return f"{type(error).__name__}: {error}".strip()


def rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_state(output_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler, progress: Progress, run_params: dict, keep_last: int) -> str | None:
    """Writes the state of `progress.step` on every rank. Returns None, or what failed (the same on every rank);
    on failure the temporary folder is removed and earlier states are untouched."""
    root = Path(output_dir) / STATE_DIR
    final, tmp = root / f"step_{progress.step}", root / f".step_{progress.step}.tmp"
    rank = dist.get_rank()
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = describe(e)
    error = first_error(error)
    if error is None:
        try:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
            torch.save(rng_states(), tmp / f"rng_rank_{rank}.pt")
        except (Exception, CheckpointException) as e:  # DCP raises the writers' errors as CheckpointException
            error = describe(e)
        error = first_error(error)
    if error is None and rank == 0:
        try:
            trainer_state = {"progress": dataclasses.asdict(progress), "scheduler": scheduler.state_dict(),
                             "run_params": run_params, "world_size": dist.get_world_size()}
            _write_synced(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2))
            if KILL_IN_SAVE_STEP is not None and int(KILL_IN_SAVE_STEP) == progress.step:
                os.kill(os.getpid(), signal.SIGKILL)
            _write_synced(tmp / MARKER, "")
            if final.exists():  # a state of this step from an earlier attempt of the same run
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            error = describe(e)
    error = first_error(error)
    if rank == 0:
        if error is None:
            prune_states(output_dir, keep_last)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if error is None:
        return None
    free_gb = shutil.disk_usage(root if root.is_dir() else root.parent).free / 1e9
    return f"could not save the training state {final}: {error} ({free_gb:.1f} GB free on its filesystem)"


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR) -> Progress:
    """Loads a state saved with any number of ranks: DCP reshards model and optimizer to this run's mesh.

    Adam's moments and the schedule's position come from the state; the peak learning rate and the weight decay are
    this run's (as the optimizer was built with them), so that a resumed run changes them from its next step.
    RNG states are per rank: each rank takes its own, and ranks the saved run did not have take rank 0's.
    """
    path = Path(path)
    hyperparameters = [{"initial_lr": group["initial_lr"], "weight_decay": group["weight_decay"]}
                       for group in optimizer.param_groups]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = read_trainer_state(path)
    saved_schedule = trainer_state["scheduler"]
    base_lrs = [h["initial_lr"] for h in hyperparameters]
    lrs = [base_lr * lr_lambda(saved_schedule["last_epoch"])
           for base_lr, lr_lambda in zip(base_lrs, scheduler.lr_lambdas, strict=True)]
    scheduler.load_state_dict({**saved_schedule, "base_lrs": base_lrs, "_last_lr": lrs})
    for group, group_hyperparameters, lr in zip(optimizer.param_groups, hyperparameters, lrs, strict=True):
        group.update(group_hyperparameters, lr=lr)
    rng_file = path / f"rng_rank_{dist.get_rank()}.pt"
    set_rng_states(torch.load(rng_file if rng_file.exists() else path / "rng_rank_0.pt", weights_only=False))
    return Progress(**trainer_state["progress"])


def changed_params(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changes that break the data order, other changes), each as `name: saved -> current`."""
    breaking, other = [], []
    for name in sorted(set(saved) | set(current)):
        if name in RESUME_ONLY_PARAMS or saved.get(name) == current.get(name):
            continue
        change = f"{name}: {saved.get(name)} -> {current.get(name)}"
        (breaking if name in DATA_ORDER_PARAMS else other).append(change)
    return breaking, other


# ----------------------------------------------------------------------------------------------------------------------
# The resume choice


def choose_resume_state(output_dir: str, resume: bool, resume_from: str | None, overwrite: bool,
                        d: Dist) -> Path | None:
    """The state to continue from, decided on rank 0. An output dir that holds a run is never written over
    silently: it is resumed, or started over with --overwrite, which deletes the earlier run's outputs."""
    output_dir = Path(output_dir)
    verdict, error = None, None
    if d.rank == 0:
        if resume_from:
            verdict = Path(resume_from)
        elif resume:
            verdict = latest_state(output_dir)
            if verdict is None:
                print0(f"--resume: no complete state in {output_dir / STATE_DIR}; starting fresh")
        earlier = [name for name in ("training_metrics.jsonl", "hf_format", STATE_DIR)
                   if (output_dir / name).exists()]
        if earlier and overwrite:
            print0(f"--overwrite: deleting {', '.join(earlier)} of the earlier run in {output_dir}")
            for name in (*earlier, "training_params.json", "training_metrics.png", "tensorboard"):
                target = output_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif earlier and verdict is None and not resume:
            error = (f"--output-dir {output_dir} already holds a run ({', '.join(earlier)}); pass --resume to "
                     "continue it, or --overwrite to start over (deletes its checkpoints, states and metrics)")
    verdict, error = broadcast_from_rank0((verdict, error))
    if error:
        fail_distributed(error)
    return verdict


def already_finished(resume_path: Path, stop_step: int, output_dir: str | os.PathLike) -> int | None:
    """The step of the state to resume from if it leaves nothing to do: it reached `stop_step` and the final
    Hugging Face checkpoint exists (a run preempted after its last step lacks it, and goes on to write it)."""
    progress = read_trainer_state(resume_path)["progress"]
    done = progress["step"] >= stop_step and hf_checkpoint_path(output_dir, progress["samples_seen"]).is_dir()
    return progress["step"] if broadcast_from_rank0(done) else None


def save_run_params(output_dir: Path, run_params: dict, d: Dist) -> None:
    """training_params.json, written by rank 0; a failure (full disk, permission) stops every rank with its cause."""
    error = None
    if d.rank == 0:
        try:
            with atomic_write(output_dir / "training_params.json") as f:
                json.dump(run_params, f, indent=2)
        except OSError as e:
            error = f"could not write {output_dir / 'training_params.json'}: {e}"
    error = first_error(error)
    if error:
        fail_distributed(error)


def check_resume_params(saved: dict, run_params: dict, force_resume: bool, path: Path) -> None:
    """Refuses a resume whose data order would differ from the saved run's, unless --force-resume."""
    breaking, other = changed_params(saved, run_params)
    if breaking and not force_resume:
        fail_distributed(f"cannot resume from {path}: the data order would change ({'; '.join(breaking)}). "
                         "Resume with the saved settings, or pass --force-resume to continue anyway")
    for change in breaking + other:
        applies = " (applies from the next step)" if change.split(":")[0] in HYPERPARAMETERS else ""
        print0(f"resuming with a changed setting: {change}{applies}")


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints, and the Checkpointer that saves them with the states


def hf_checkpoint_path(output_dir: str | os.PathLike, samples_seen: int) -> Path:
    return Path(output_dir) / "hf_format" / f"samples_{samples_seen}"


def latest_hf_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = [p for p in (Path(output_dir) / "hf_format").glob("samples_*")
                   if p.name.removeprefix("samples_").isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.removeprefix("samples_")), default=None)


def save_hf_checkpoint(wrapper: torch.nn.Module, tokenizer, output_dir: str | os.PathLike, samples_seen: int,
                       d: Dist) -> str | None:
    """Writes the weights in Hugging Face format, in the model's original dtype, into a temporary folder renamed at
    the end: a crash never leaves a half checkpoint. The weights are gathered and written one tensor at a time
    (hf_stream.py), so rank 0's host memory holds one tensor, not the model.

    Returns None, or what failed (the same on every rank): a full disk costs this checkpoint, not the run."""
    model = wrapper.model
    save_dtype = model.config.dtype
    if isinstance(save_dtype, str):
        save_dtype = getattr(torch, save_dtype)
    tensors = saved_tensors(model)
    path = hf_checkpoint_path(output_dir, samples_seen)
    full_tensors = None
    if tensors is None:  # transformers merges or renames weights on save: it needs them all at once
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full_tensors = gathered(tensors, save_dtype, on_this_rank=d.rank == 0)
    error = None
    try:
        if d.rank == 0:
            with atomic_directory(path) as tmp:
                if full_tensors is not None:
                    write_weights(tmp, tensors, save_dtype, full_tensors)
                    if model.generation_config is not None:
                        model.generation_config.save_pretrained(tmp)
                else:
                    state_dict = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
                    model.save_pretrained(tmp, state_dict=state_dict, max_shard_size="5GB")
                # The training copy is fp32 (save_pretrained writes that into config.dtype): say the original dtype.
                model.config.dtype = save_dtype
                model.config.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            print0(f"saved {path}")
    except Exception as e:  # disk full, permission: safetensors and transformers raise their own types
        error = f"could not save the Hugging Face checkpoint {path}: {describe(e)}"
    finally:
        for _ in full_tensors or ():  # the other ranks gather every tensor: rank 0 joins them to the end
            pass
    return first_error(error)


@dataclass
class Checkpointer:
    """Saves Hugging Face checkpoints and resumable states of the run. A failed save (full disk, permission) is
    reported and costs only itself: the earlier checkpoints and states stay intact and training goes on."""

    wrapper: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: object
    output_dir: str
    keep_last_states: int
    run_params: dict
    d: Dist

    def save(self, progress: Progress, hf: bool) -> bool:
        """A Hugging Face checkpoint (when `hf`) and a state of this step; True if both were written."""
        samples_seen = progress.samples_seen
        errors = [
            save_hf_checkpoint(self.wrapper, self.tokenizer, self.output_dir, samples_seen, self.d) if hf else None,
            save_state(self.output_dir, self.wrapper, self.optimizer, self.scheduler, progress, self.run_params,
                       self.keep_last_states),
        ]
        for error in filter(None, errors):
            if self.d.rank == 0:
                print(f"error: {error}", file=sys.stderr, flush=True)
        return not any(errors)

    def missing(self, progress: Progress) -> tuple[bool, bool]:
        """Whether the Hugging Face checkpoint and the state of this step are still to be written (rank 0 looks)."""
        state_path = Path(self.output_dir) / STATE_DIR / f"step_{progress.step}"
        return broadcast_from_rank0((not hf_checkpoint_path(self.output_dir, progress.samples_seen).is_dir(),
                                     not is_complete(state_path)))


def save_due(samples_seen: int, samples_at_last_save: int, every: int | None) -> bool:
    """A save is due each time the samples seen since the last one reach `every`. The counters are part of
    the saved state, so a resumed run saves at the same moments as an uninterrupted one."""
    return every is not None and samples_seen - samples_at_last_save >= every


# ----------------------------------------------------------------------------------------------------------------------
# Preemption


class PreemptionSignal:
    """SIGTERM and SIGUSR1 (what schedulers send before killing a job) only set a flag; the loop checks it after
    each step, agreed over all ranks, then saves a state and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal."""
        flag = torch.tensor(float(self.received is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
