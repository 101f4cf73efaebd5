"""process_data.py on the tiny tokenizer: labels, bad input, and the CLI end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import trained_runs

import process_data
from process_data import IGNORE_INDEX, MaskingError, probe_template, tokenize_sample

REPO_ROOT = Path(__file__).resolve().parent.parent
EOT = "<|im_end|>"

TOOL_CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}




def tokenize(tokenizer, messages):
    input_ids, labels = tokenize_sample(tokenizer, probe_template(tokenizer), {"messages": messages})
    assert input_ids == tokenizer.apply_chat_template(messages, return_dict=False)
    return input_ids, labels


def test_probe_finds_chatml_header_and_eot(tiny_tokenizer):
    info = probe_template(tiny_tokenizer)
    assert info.header == "<|im_start|>assistant\n"
    assert info.eot == EOT


def test_default_system_prompt_is_masked(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    input_ids, labels = tokenize(tiny_tokenizer, messages)
    assert "tiny helpful assistant" in tiny_tokenizer.decode(input_ids)
    assert trained_runs(tiny_tokenizer, input_ids, labels) == ["Four." + EOT]


def test_multi_turn_trains_every_assistant_turn_exactly(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hola."},
        {"role": "user", "content": "And two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
    ]
    input_ids, labels = tokenize(tiny_tokenizer, messages)
    assert trained_runs(tiny_tokenizer, input_ids, labels) == ["Hola." + EOT, "Two plus two is four." + EOT]
    # Every token outside the assistant turns, newlines after <|im_end|> included, is masked.
    assert sum(label != IGNORE_INDEX for label in labels) == len(
        tiny_tokenizer("Hola." + EOT + "Two plus two is four." + EOT, add_special_tokens=False)["input_ids"]
    )


def test_tool_call_trained_and_tool_result_masked(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    input_ids, labels = tokenize(tiny_tokenizer, messages)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' + EOT
    assert trained_runs(tiny_tokenizer, input_ids, labels) == [call, "It is sunny." + EOT]


def test_content_with_surrounding_whitespace(tiny_tokenizer):
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "\n Four. \n"}]
    input_ids, labels = tokenize(tiny_tokenizer, messages)
    assert trained_runs(tiny_tokenizer, input_ids, labels) == ["\n Four. \n" + EOT]


def test_pretrain_sample(tiny_tokenizer):
    input_ids, labels = tokenize_sample(
        tiny_tokenizer, probe_template(tiny_tokenizer), {"messages": [{"role": "pretrain", "content": "The sea."}]}
    )
    assert input_ids == tiny_tokenizer("The sea.", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id
    ]
    assert labels == input_ids


def test_template_that_transforms_content_is_refused(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[:5] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(MaskingError, match="cannot mask reliably"):
        probe_template(tokenizer)  # a cut content cuts its end marker too


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"text": "hi"}, "'messages' is missing"),
        ({"messages": []}, "'messages' is missing or not a non-empty list"),
        ({"messages": [{"content": "hi"}]}, "message 0 has no 'role'"),
        ({"messages": [{"role": "user"}]}, "message 0 (user) has no 'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, "non-string content (int)"),
        ({"messages": [{"role": "assistant", "content": None}]}, "non-string content (NoneType)"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role 'wizard'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "pretrain", "content": "b"}]},
            "'pretrain' message must be the only",
        ),
        ({"messages": [{"role": "user", "content": "a\ue000"}]}, "private-use characters"),
    ],
)
def test_bad_input_names_file_line_and_reason(tmp_path, tiny_model_dir, capsys, record, reason):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}
    input_file = tmp_path / "in.jsonl"
    input_file.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    stderr = run_main_failing(input_file, tmp_path / "out.jsonl", tiny_model_dir, capsys)
    assert f"{input_file}:2: " in stderr and reason in stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_malformed_json_names_line(tmp_path, tiny_model_dir, capsys):
    input_file = tmp_path / "in.jsonl"
    input_file.write_text('{"messages": [}\n')
    stderr = run_main_failing(input_file, tmp_path / "out.jsonl", tiny_model_dir, capsys)
    assert f"{input_file}:1: malformed JSON" in stderr


def run_main_failing(input_file, output_file, model_dir, capsys) -> str:
    """Runs process_data.main in this process (fast: no new interpreter) and returns its stderr."""
    argv = ["--input-file", str(input_file), "--output-file", str(output_file), "--model-name-or-path", str(model_dir)]
    with pytest.raises(SystemExit) as exit_info:
        process_data.main(argv + ["--num-proc", "1"])
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# CLI end to end
# ---------------------------------------------------------------------------------------------------------------------


def run_cli(input_file, output_file, model_dir, *extra) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "process_data.py"), "--input-file", str(input_file)]
    command += ["--output-file", str(output_file), "--model-name-or-path", str(model_dir), "--num-proc", "1"]
    return subprocess.run(command + list(extra), capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def chat(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_cli_writes_all_fields_in_input_order(tmp_path, tiny_model_dir, num_proc):
    records = [chat(f"What is {i} plus {i}?", f"It is {2 * i}.", id=i) for i in range(150)]  # > one chunk
    records.append({"messages": [{"role": "pretrain", "content": "Waves roll in."}], "id": 150})
    input_file = write_lines(tmp_path / "in.jsonl", records)
    output_file = tmp_path / "out.jsonl"
    result = run_cli(input_file, output_file, tiny_model_dir, "--num-proc", num_proc)
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in output_file.read_text().splitlines()]
    assert [s["id"] for s in samples] == list(range(151))
    for record, sample in zip(records, samples, strict=True):
        assert sample["messages"] == record["messages"]
        assert sample["len"] == len(sample["input_ids"]) == len(sample["labels"])
        assert sample["num_loss_counted_tokens"] == sum(label != IGNORE_INDEX for label in sample["labels"]) > 0
    assert "samples read:    151" in result.stdout and "samples kept:    151" in result.stdout
    assert "p50" in result.stdout and "p99" in result.stdout
    assert result.stdout.count("=== example: line") == 2 and "[[" in result.stdout


def test_cli_examples_are_reproducible_with_seed(tmp_path, tiny_model_dir):
    input_file = write_lines(tmp_path / "in.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)])

    def example_lines(seed: str) -> list[str]:
        result = run_cli(input_file, tmp_path / "out.jsonl", tiny_model_dir, "--seed", seed)
        return [line for line in result.stdout.splitlines() if line.startswith("=== example")]

    assert example_lines("1") == example_lines("1")
    assert len(example_lines("1")) == 2


def test_cli_skip_invalid_lists_and_counts(tmp_path, tiny_model_dir):
    lines = [
        chat("a", "b"),
        "{not json",
        {"messages": []},
        chat("c", "d"),
        {"messages": [{"role": "x", "content": ""}]},
    ]
    input_file = write_lines(tmp_path / "in.jsonl", lines)
    output_file = tmp_path / "out.jsonl"
    result = run_cli(input_file, output_file, tiny_model_dir, "--skip-invalid")
    assert result.returncode == 0, result.stderr
    assert len(output_file.read_text().splitlines()) == 2
    assert "skipped 3 invalid line(s)" in result.stdout
    for line_number in (2, 3, 5):
        assert f"{input_file}:{line_number}: " in result.stdout
    assert "invalid skipped: 3" in result.stdout


def test_cli_drops_long_and_untrainable_samples_by_reason(tmp_path, tiny_model_dir):
    lines = [
        chat("a", "b"),
        chat("a", "a much longer answer " * 20),
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    input_file = write_lines(tmp_path / "in.jsonl", lines)
    output_file = tmp_path / "out.jsonl"
    result = run_cli(input_file, output_file, tiny_model_dir, "--max-sample-num-tokens", "60")
    assert result.returncode == 0, result.stderr
    assert len(output_file.read_text().splitlines()) == 1
    assert "dropped (longer than --max-sample-num-tokens=60): 1" in result.stdout
    assert "dropped (no trainable token): 1" in result.stdout


def test_cli_failure_leaves_no_output_and_no_temp_file(tmp_path, tiny_model_dir):
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")] * 100 + ["{bad"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli(input_file, out_dir / "out.jsonl", tiny_model_dir)
    assert result.returncode != 0 and f"{input_file}:101: malformed JSON" in result.stderr
    assert list(out_dir.iterdir()) == []


def test_cli_failure_keeps_existing_output(tmp_path, tiny_model_dir):
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b"), {"messages": []}])
    output_file = tmp_path / "out.jsonl"
    output_file.write_text("previous\n")
    result = run_cli(input_file, output_file, tiny_model_dir)
    assert result.returncode != 0
    assert output_file.read_text() == "previous\n"
    assert {p.name for p in tmp_path.iterdir()} == {"in.jsonl", "out.jsonl"}  # no temp file left behind


def test_cli_chat_template_override(tmp_path, tiny_model_dir):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")])
    output_file = tmp_path / "out.jsonl"
    result = run_cli(input_file, output_file, tiny_model_dir, "--chat-template", str(template))
    assert result.returncode == 0, result.stderr
    sample = json.loads(output_file.read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.decode(sample["input_ids"])
    assert text == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"  # no default system prompt
    assert trained_runs(tokenizer, sample["input_ids"], sample["labels"]) == ["b" + EOT]


def test_help_lists_every_flag():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "process_data.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    for flag in ("--input-file", "--output-file", "--model-name-or-path", "--max-sample-num-tokens", "--num-proc",
                 "--num-examples-to-print", "--seed", "--chat-template", "--skip-invalid"):  # fmt: skip
        assert flag in result.stdout
