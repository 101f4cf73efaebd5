import pytest

from utils import InputError, atomic_directory, atomic_write, read_jsonl


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
