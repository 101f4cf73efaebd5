"""Resumable training state: what a killed run needs to continue as if nothing had happened.

    output_dir/state/step_<S>/
        .metadata, __<r>_0.distcp   model and optimizer, sharded by torch.distributed.checkpoint (reshardable)
        trainer_state.json          progress (step, data position, counters), LR scheduler, run parameters
        rng_rank_<r>.pt             RNG states of rank r: torch, CUDA, numpy, python
        COMPLETE                    written last; a folder without it is never loaded

A state is written into `state/.step_<S>.tmp` and renamed to `step_<S>` once complete, so a crash at any moment
leaves the earlier states as they were. Every rank writes its shards into the same folder: the filesystem must be
shared, as it is for the Hugging Face checkpoints.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_DIR = "state"
MARKER = "COMPLETE"
# Settings that decide which samples make up each step: changing them on resume breaks the data order.
DATA_ORDER_PARAMS = ("batch_size", "seed", "data_fingerprint")
# Settings that are expected to change between a run and its resumption.
RESUME_ONLY_PARAMS = ("output_dir", "data_path", "max_steps", "resume", "resume_from", "force_resume", "overwrite",
                      "save_state_every_samples", "keep_last_states", "min_samples_per_checkpoint", "max_bad_steps",
                      "world_size")
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


def first_error(error: str | None) -> str | None:
    """Every rank learns the first error of any rank, so that all take the same branch (and collectives)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


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
               scheduler) -> Progress:
    """Loads a state saved with any number of ranks: DCP reshards model and optimizer to this run's mesh.

    RNG states are per rank: each rank takes its own, and ranks the saved run did not have take rank 0's.
    """
    path = Path(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = read_trainer_state(path)
    scheduler.load_state_dict(trainer_state["scheduler"])
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
