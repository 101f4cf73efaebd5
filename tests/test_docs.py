"""The README and the Makefile say what the scripts do: every flag is documented, and `make demo` can run again."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", ["train.py", "process_data.py", "chat.py", "smollm2.py"])
def test_every_flag_is_in_the_readme(script):
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                               check=True).stdout
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", help_text)) - {"--help"}
    assert flags, help_text
    # argparse's automatic negation of a boolean flag (--no-resume for --resume) needs no words of its own.
    negations = {f"--no-{flag[2:]}" for flag in flags if f"{flag}, --no-{flag[2:]}" in help_text}
    missing = sorted(flag for flag in flags - negations if not re.search(re.escape(flag) + r"(?![\w-])", README))
    assert not missing, f"{script} flags missing from README.md: {missing}"


def dry_run(target: str) -> str:
    """The commands `make TARGET` would run, without running them."""
    # Run from `make test` too: a nested make would inherit its flags and print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    output = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, check=True).stdout
    return output.replace("\\\n", " ")  # one line per command


def test_make_demo_starts_its_run_over_and_ends_with_a_chat():
    commands = dry_run("demo")
    [train] = [line for line in commands.splitlines() if "train.py" in line and "torchrun" in line]
    assert "--overwrite" in train, "a second `make demo` would refuse the existing run"
    assert "OMP_NUM_THREADS=" in train, "torchrun warns on every run without it"
    assert "process_data.py" in commands and "smollm2.py" in commands
    assert commands.rstrip().splitlines()[-1].split()[1:3] == ["chat.py", "demo_output/run"]


def test_make_test_prints_skip_reasons_and_clean_is_documented():
    assert re.search(r"pytest .*-rs", dry_run("test"))
    assert "rm -rf demo_output" in dry_run("clean")
    assert "make clean" in README
