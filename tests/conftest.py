"""Shared fixtures: a tiny offline model and tokenizer, and the real tokenizers folder when given."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model with its tokenizer, saved once per test session."""
    from tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def real_tokenizers_dir() -> Path:
    """The folder of real tokenizers named by MINI_TRAINER_TOKENIZERS; tests using it skip when unset."""
    value = os.environ.get("MINI_TRAINER_TOKENIZERS")
    if not value:
        pytest.skip("MINI_TRAINER_TOKENIZERS is not set")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"MINI_TRAINER_TOKENIZERS={value} is not a directory")
    return path


def run_train(args: list[str], nproc: int = 1, check: bool = True, extra_torchrun: list[str] | None = None,
              env: dict[str, str] | None = None, preexec_fn=None):
    """Runs train.py as users do: plain python for one process, torchrun (gloo on CPU) for several.
    `env` adds environment variables; `preexec_fn` runs in the child before train.py (resource limits)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc == 1 and not extra_torchrun:
        command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   *(extra_torchrun or ["--standalone"]), str(REPO_ROOT / "train.py"), *args]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            preexec_fn=preexec_fn)
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        raise AssertionError(f"train.py failed ({result.returncode}):\n{output}")
    return result


def write_tokenized_samples(path: Path, tokenizer, num_samples: int = 24, seed: int = 0) -> Path:
    """Tokenized chat-like samples of varied length; the first third of each is masked, like a prompt."""
    import json
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog what is two plus four capital of France Paris".split()
    with open(path, "w") as f:
        for _ in range(num_samples):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
            input_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            num_masked = len(input_ids) // 3
            labels = [-100] * num_masked + input_ids[num_masked:]
            f.write(json.dumps({"input_ids": input_ids, "labels": labels, "len": len(input_ids)}) + "\n")
    return path


def trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, run = [], []
    for token_id, label in zip(input_ids, labels, strict=True):
        if label != -100:
            assert label == token_id
            run.append(token_id)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs
