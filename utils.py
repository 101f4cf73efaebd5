"""What process_data.py and train.py share: rank-0 logging, input errors that name file and line (or row),
JSONL reading, atomic writes, and a clean exit with a message."""

import contextlib
import json
import os
import secrets
import shutil
import sys
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
    """A problem with a user's input file, reported as `file:line: reason` (or `file: row N: reason`)."""

    def __init__(self, path: str | os.PathLike, line_number: int | None, reason: str, unit: str = "line"):
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason
        self.unit = unit
        super().__init__(f"{location(self.path, line_number, unit)}: {reason}")

    def __reduce__(self):  # pickled from a worker process: rebuild from the fields, not from the message
        return InputError, (self.path, self.line_number, self.reason, self.unit)


def location(path: str | os.PathLike, number: int | None, unit: str = "line") -> str:
    """`file:line` as editors and grep write it, `file: row N` for a table's row, or the file alone."""
    if number is None:
        return str(path)
    return f"{path}:{number}" if unit == "line" else f"{path}: {unit} {number}"


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yields (1-based line number, raw line as bytes) for every non-blank line of a JSONL file.

    Bytes, so that a line that is not UTF-8 is an error naming its line (parse_json_line), not of the whole read."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield line_number, line


def parse_json_line(path: str | os.PathLike, line_number: int, line: str | bytes) -> dict:
    """Parses one JSONL line into a dict, or raises InputError naming the file and line."""
    try:
        text = line.decode() if isinstance(line, bytes) else line
        record = json.loads(text)
    except UnicodeDecodeError as e:
        raise InputError(path, line_number, f"not valid UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        # An error at the end of the line is reported by json after the newline, on "line 2 column 1".
        column = min(e.pos, len(text.rstrip("\r\n"))) + 1
        raise InputError(path, line_number, f"malformed JSON ({e.msg} at column {column})") from None
    if not isinstance(record, dict):
        raise InputError(path, line_number, f"expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields (line number, record) for each line; bad JSON raises InputError with the line number."""
    for line_number, line in iter_jsonl_lines(path):
        yield line_number, parse_json_line(path, line_number, line)


def temporary_path(path: Path) -> Path:
    """A new hidden name beside `path` (64 random bits: creating it exclusively does not collide in practice)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Opens a temporary file beside `path` and renames it over `path` only if the block succeeds.

    A crash or an exception leaves either the old file or none, never a truncated one. The file is created with
    mode 0666 less the umask, as open() and save_pretrained create theirs (mkstemp would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = temporary_path(path)
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    final name. An existing `path` is replaced. The folder gets mode 0777 less the umask, like mkdir (mkdtemp would
    make it 0700).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temporary_path(path)
    os.mkdir(tmp_dir, 0o777)
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
