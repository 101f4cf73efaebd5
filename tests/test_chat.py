"""chat.py: one answer with --prompt, the interactive mode fed through stdin, sampling flags, and its errors.

Each answer is compared with what plain transformers generates through the chat template. The tiny model's
weights are redrawn larger first: at its own tiny scale every prompt gives the same answer, a run of newlines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

import chat

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its matrices redrawn at std 0.3, so that its answers depend on the prompt, and a
    generation_config that asks for sampling (as Qwen's checkpoints do), which chat.py's greedy default overrides."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=20)
    output_dir = tmp_path_factory.mktemp("chat-model")
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(output_dir)
    return output_dir


def run_chat(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """chat.py as a user runs it; stdout and stderr as raw bytes (a random model's text may hold a carriage return,
    which text mode would turn into a newline)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "chat.py"), *args], cwd=REPO_ROOT, env=env,
                          input=stdin.encode() if stdin is not None else None, capture_output=True, timeout=300)


def reference_replies(model_dir: Path, user_turns: list[str], system: str | None = None, keep_history: bool = True,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Plain transformers' answer to each user turn (12 new tokens, greedy unless `temperature`), with the earlier
    turns and answers in the prompt when `keep_history`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature else dict(
        do_sample=False)
    set_seed(seed)
    opening = [{"role": "system", "content": system}] if system else []
    messages, replies = list(opening), []
    for turn in user_turns:
        messages = [*(messages if keep_history else opening), {"role": "user", "content": turn}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        output = model.generate(**inputs, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, **settings)
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_prompt_answers_once_greedily_through_the_chat_template(chat_model_dir):
    system = "You answer in one short sentence."
    result = run_chat([str(chat_model_dir), "--prompt", QUESTION, "--system", system, "--max-new-tokens", "12"])
    assert result.returncode == 0, result.stderr.decode()
    [expected] = reference_replies(chat_model_dir, [QUESTION], system=system)
    assert expected != reference_replies(chat_model_dir, [QUESTION])[0]  # the system message reached the model
    assert result.stdout.decode() == expected + "\n"


def test_sampling_flags_and_seed(chat_model_dir):
    flags = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "12"]
    result = run_chat([str(chat_model_dir), "--prompt", QUESTION, *flags])
    assert result.returncode == 0, result.stderr.decode()
    [expected] = reference_replies(chat_model_dir, [QUESTION], temperature=0.8, top_p=0.9, seed=7)
    assert expected != reference_replies(chat_model_dir, [QUESTION])[0]  # sampled, not greedy
    assert result.stdout.decode() == expected + "\n"


def test_interactive_chat_keeps_the_history_until_exit(chat_model_dir):
    turns = [QUESTION, "And of Spain?"]
    stdin = "\n".join([*turns, "/exit", "Never read"]) + "\n"
    result = run_chat([str(chat_model_dir), "--max-new-tokens", "12"], stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    stdout = result.stdout.decode()
    first, second = reference_replies(chat_model_dir, turns)
    assert second != reference_replies(chat_model_dir, turns, keep_history=False)[1]  # the history changes it
    assert f"assistant> {first}\n" in stdout
    assert f"assistant> {second}\n" in stdout
    assert stdout.count("assistant> ") == 2 and "Never read" not in stdout


def test_missing_folder_is_a_one_line_error():
    result = run_chat(["/no/such/checkpoint", "--prompt", "Hi"])
    assert result.returncode == 1
    assert result.stderr.decode() == "error: /no/such/checkpoint does not exist or is not a folder\n"
    assert result.stdout == b""


def test_run_dir_resolves_to_its_newest_checkpoint(tmp_path, capsys):
    for name in ["samples_96", "samples_192", "samples_1000", ".samples_2000.abc.tmp", "samples_3000"]:
        (tmp_path / "hf_format" / name).mkdir(parents=True)
        if name != "samples_3000":  # a folder without config.json is not a checkpoint
            (tmp_path / "hf_format" / name / "config.json").write_text("{}")
    assert chat.resolve_checkpoint(tmp_path) == tmp_path / "hf_format" / "samples_1000"  # by number, not by name
    assert chat.resolve_checkpoint(tmp_path / "hf_format" / "samples_96") == tmp_path / "hf_format" / "samples_96"
    with pytest.raises(SystemExit):
        chat.resolve_checkpoint(tmp_path / "hf_format")
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'hf_format'} is neither a checkpoint")
