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
