"""The process group: brought up and down in one pair of functions, and the few agreements every rank must reach
together (the first error of any rank, a value decided on rank 0), so that all ranks always take the same branch."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import fail, free_port, is_rank0, print0


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device


def init_distributed() -> Dist:
    """Joins torchrun's process group (or makes a one-process group when run with plain python)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fail_distributed(message: str) -> None:
    """Every rank reaches the same verdict; rank 0 says it, and all leave the process group cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if not is_rank0():
        raise SystemExit(1)
    fail(message)


def first_error(error: str | None) -> str | None:
    """Every rank learns the first error of any rank, so that all take the same branch (and collectives)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report_host_memory(d: Dist) -> None:
    """Prints every rank's peak host RSS: only rank 0 reads the weights, so the others should stay small."""
    import resource

    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
    per_rank = [None] * d.world_size
    dist.all_gather_object(per_rank, round(peak_rss_gb, 2))
    print0(f"host peak RSS per rank (GB): {per_rank}")
