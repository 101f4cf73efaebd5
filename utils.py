"""What process_data.py and train.py share: rank-0 logging, input errors that name file and line,
JSONL reading, atomic writes, and a clean exit with a message."""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def is_rank0() -> bool:
    """True on the process that should talk to the user (RANK is set by torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so torchrun shows it at once. A progress bar on the terminal is cleared
    first and redrawn after, rather than cut by the line."""
    if is_rank0():
        from tqdm import tqdm

        with tqdm.external_write_mode(file=kwargs.get("file")):
            print(*args, **kwargs, flush=True)


class InputError(ValueError):
    """A problem with a user's input file, reported as `file:line: reason`."""

    def __init__(self, path: str | os.PathLike, line_number: int | None, reason: str):
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason
        where = f"{self.path}:{line_number}" if line_number is not None else self.path
        super().__init__(f"{where}: {reason}")


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, raw line) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield line_number, line


def parse_json_line(path: str | os.PathLike, line_number: int, line: str) -> dict:
    """Parses one JSONL line into a dict, or raises InputError naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(path, line_number, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise InputError(path, line_number, f"expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields (line number, record) for each line; bad JSON raises InputError with the line number."""
    for line_number, line in iter_jsonl_lines(path):
        yield line_number, parse_json_line(path, line_number, line)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Opens a temporary file beside `path` and renames it over `path` only if the block succeeds.

    A crash or an exception leaves either the old file or none, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields a temporary directory beside `path`; renames it to `path` only if the block succeeds.

    Used for checkpoints, so that a crash mid-save never leaves a half-written folder under the
    final name. An existing `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_dir
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_dir, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def fail(message: str, exit_code: int = 1) -> None:
    """Prints a user-facing error without a traceback and exits."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)
