"""The process group: brought up and down in one pair of functions, left through run_and_exit, and the few
agreements every rank must reach together (the first error of any rank, a value decided on rank 0), so that all
ranks always take the same branch."""

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from utils import fail, is_rank0, print0


def free_port() -> int:
    """A TCP port the OS says is free now, for a rendezvous (safer than one derived from the pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def fail_distributed(message: str) -> NoReturn:
    """Every rank reaches the same verdict (also before the process group exists: all ranks validate the same
    arguments); rank 0 says it, once, without a traceback, and all leave the process group and exit 1."""
    if dist.is_initialized():
        dist.destroy_process_group()
    write_torchrun_error_file(message)
    if not is_rank0():
        # torchrun stops every rank as soon as one exits: rank 0 goes first, so that it has said why. Without a
        # launcher to stop them, the others leave after a while.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(30)
        raise SystemExit(1)
    fail(message)


def write_torchrun_error_file(message: str) -> None:
    """torchrun's summary of a failed run shows what a worker wrote to $TORCHELASTIC_ERROR_FILE (in the format of
    torch's @record) instead of "error_file: <N/A>" and a link. Local rank 0 writes it, so every node's summary
    names the reason once; the other ranks' entries keep torchrun's default text."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
    try:
        with open(path, "w") as f:
            json.dump({"message": record}, f)
    except OSError:
        pass  # the message is on rank 0's stderr anyway


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


def run_and_exit(main: Callable[[], None]) -> NoReturn:
    """Runs a distributed entry point, then leaves without the interpreter's teardown.

    DTensor's sharding caches keep the device mesh, and with it the process group and gloo's threads, alive after
    destroy_process_group. Destroying them while the interpreter shuts down aborts now and then ("terminate called
    without an active exception", about 2 in 100 two-rank CPU runs here), which fails a finished run.
    By the time `main` returns or calls fail(), every output file is closed."""
    exit_code = 0
    try:
        main()
    except SystemExit as exit_request:  # fail() and argparse have printed their message; keep their code
        if isinstance(exit_request.code, int):
            exit_code = exit_request.code
        elif exit_request.code is not None:  # sys.exit("message"), as Python itself would do
            print(exit_request.code, file=sys.stderr)
            exit_code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
