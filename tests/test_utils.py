import os
import pickle
import stat

import pytest

from utils import InputError, atomic_directory, atomic_write, iter_jsonl_lines, parse_json_line, read_jsonl


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    records = read_jsonl(path)
    assert next(records) == (1, {"a": 1})
    with pytest.raises(InputError) as excinfo:
        next(records)
    assert excinfo.value.line_number == 3
    assert str(path) in str(excinfo.value) and "malformed JSON" in str(excinfo.value)


def test_read_jsonl_rejects_non_objects(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(InputError, match=r":1: expected a JSON object"):
        list(read_jsonl(path))


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("full")
    assert (target / "weights").read_text() == "full"


@pytest.mark.parametrize("body, exit_code, stderr", [
    ("print('done')", 0, ""),
    ("utils.fail('bad input', 3)", 3, "error: bad input"),
    ("sys.exit('stopped')", 1, "stopped"),
    ("sys.exit()", 0, ""),
])
def test_run_and_exit_keeps_the_exit_code_and_flushes(body, exit_code, stderr):
    """train.py leaves through os._exit; what main printed and the code it chose must survive that."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = (f"import sys, utils, distributed\ndef main():\n    print('started', end='')\n    {body}\n"
              "distributed.run_and_exit(main)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == exit_code
    assert result.stdout.startswith("started")  # unflushed output is not lost
    assert stderr in result.stderr


def test_json_error_column_is_where_the_line_breaks_off(tmp_path):
    """json reports a fault at the end of a line after its newline, as "line 2 column 1"; we give the line's column."""
    line = '{"messages": [{"role": "user", "content": "What is two plus two?"}], "id": "long-id-12"'
    assert len(line) == 87
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n" + line + "\r\n" + '{"a": 1, "b": x}\n')
    errors = []
    for line_number, raw in iter_jsonl_lines(path):
        with pytest.raises(InputError) as excinfo:
            parse_json_line(path, line_number, raw)
        errors.append(excinfo.value.reason)
    assert errors[0] == errors[1] == "malformed JSON (Expecting ',' delimiter at column 88)"
    assert errors[2] == "malformed JSON (Expecting value at column 15)"


def test_line_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    records = read_jsonl(path)
    assert next(records) == (1, {"a": 1})
    with pytest.raises(InputError, match=r"data.jsonl:2: not valid UTF-8 \(byte 11\)"):
        next(records)


def test_input_error_survives_pickling_and_names_rows():
    """Worker processes send it back to the main one."""
    error = pickle.loads(pickle.dumps(InputError("t.parquet", 3, "bad row", unit="row")))
    assert (error.path, error.line_number, error.reason, error.unit) == ("t.parquet", 3, "bad row", "row")
    assert str(error) == "t.parquet: row 3: bad row"
    assert str(InputError("a.jsonl", 7, "bad line")) == "a.jsonl:7: bad line"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])  # fmt: skip
def test_atomic_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Like save_pretrained's files (open() and mkdir() apply the umask), not mkstemp's 0600 and mkdtemp's 0700."""
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "out.jsonl") as f:
            f.write("x")
        with atomic_directory(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_text("w")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "ckpt" / "weights").stat().st_mode) == file_mode
