"""process_data.py on the tiny tokenizer: labels, bad input, and the CLI end to end."""

import copy
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import trained_runs

import process_data
from masking import IGNORE_INDEX, MaskingError, labels_from_offsets, probe_template
from process_data import tokenize_sample

REPO_ROOT = Path(__file__).resolve().parent.parent
EOT = "<|im_end|>"

TOOL_CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def tokenize(tokenizer, messages):
    input_ids, labels, _ = tokenize_sample(tokenizer, probe_template(tokenizer), {"messages": messages})
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
    input_ids, labels, _ = tokenize_sample(
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


# ---------------------------------------------------------------------------------------------------------------------
# Reasoning, unmask and the template's own doings (issues 9 and 11)
# ---------------------------------------------------------------------------------------------------------------------

# ChatML that renders an assistant's reasoning_content as a <think> block before its content when {keep} holds.
THINK_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' and m.reasoning_content is string and (KEEP) %}"
    "{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ m.content if m.content is string else '' }}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
KEEP_ALL = THINK_TEMPLATE.replace("KEEP", "true")
KEEP_LAST = THINK_TEMPLATE.replace("KEEP", "loop.last")  # like Qwen3: only the last turn keeps its reasoning
NO_SYSTEM = KEEP_ALL.replace("{% for m in messages %}", "{% for m in messages if m.role != 'system' %}")


def with_template(tokenizer, template: str):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def tokenize_with_warnings(tokenizer, record: dict) -> tuple[list[str], list[str]]:
    """Trained runs and warnings; checks input_ids against apply_chat_template."""
    input_ids, labels, warnings = tokenize_sample(tokenizer, probe_template(tokenizer), record)
    assert input_ids == tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"), return_dict=False)
    return trained_runs(tokenizer, input_ids, labels), warnings


def reasoning_chat(field: str = "reasoning_content") -> list[dict]:
    return [
        {"role": "user", "content": "Q one?"},
        {"role": "assistant", field: "first thought", "content": "A one."},
        {"role": "user", "content": "Q two?"},
        {"role": "assistant", field: "second thought"},  # no content: reasoning alone is a valid turn
    ]


@pytest.mark.parametrize("field", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_is_trained_as_rendered_inside_the_assistant_turn(tiny_tokenizer, field):
    tokenizer = with_template(tiny_tokenizer, KEEP_ALL)
    assert probe_template(tokenizer).renders_reasoning
    runs, warnings = tokenize_with_warnings(tokenizer, {"messages": reasoning_chat(field)})
    assert runs == ["<think>\nfirst thought\n</think>\n\nA one." + EOT, "<think>\nsecond thought\n</think>\n\n" + EOT]
    assert warnings == []


def test_reasoning_left_out_of_earlier_turns_is_warned(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, KEEP_LAST)
    runs, warnings = tokenize_with_warnings(tokenizer, {"messages": reasoning_chat()})
    assert runs == ["A one." + EOT, "<think>\nsecond thought\n</think>\n\n" + EOT]
    assert warnings == ["the chat template leaves out the reasoning of an assistant turn (not the last one)"]


def test_template_that_renders_no_reasoning_is_detected(tiny_tokenizer):
    messages = reasoning_chat()
    messages[3]["content"] = "A two."
    assert not probe_template(tiny_tokenizer).renders_reasoning
    runs, warnings = tokenize_with_warnings(tiny_tokenizer, {"messages": messages})
    assert runs == ["A one." + EOT, "A two." + EOT]
    assert "the chat template does not render reasoning fields" in warnings


def test_default_system_prompt_and_left_out_messages_are_warned(tiny_tokenizer):
    assert probe_template(tiny_tokenizer).default_system == "You are a tiny helpful assistant."
    _, warnings = tokenize_with_warnings(tiny_tokenizer, chat("Hi", "Hello."))
    assert warnings == ["the chat template adds its default system prompt 'You are a tiny helpful assistant.'"]
    system = {"messages": [{"role": "system", "content": "Be brief."}, *chat("Hi", "Hello.")["messages"]]}
    assert tokenize_with_warnings(tiny_tokenizer, system)[1] == []

    tokenizer = with_template(tiny_tokenizer, NO_SYSTEM)
    assert probe_template(tokenizer).default_system == ""
    runs, warnings = tokenize_with_warnings(tokenizer, system)
    assert runs == ["Hello." + EOT] and warnings == ["the chat template leaves out a system message"]


def test_unmask_trains_user_and_tool_contents_but_not_system_or_headers(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": " sunny\n"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' + EOT
    runs, _ = tokenize_with_warnings(tiny_tokenizer, {"messages": messages, "unmask": True})
    # The content's first token "Ġsunny" holds the space before it: a token that overlaps the content is trained.
    assert runs == ["Weather in Paris?", call, " sunny", "It is sunny." + EOT]
    runs, _ = tokenize_with_warnings(tiny_tokenizer, {"messages": messages, "unmask": False})
    assert runs == [call, "It is sunny." + EOT]
    # The default system prompt the template adds is not trained either, and a user-only chat now trains.
    runs, _ = tokenize_with_warnings(tiny_tokenizer, {"messages": messages[1:2], "unmask": True})
    assert runs == ["Weather in Paris?"]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"messages": [{"role": "user", "content": "a", "reasoning_content": "r"}]}, "only assistant messages may"),
        ({"messages": [{"role": "assistant", "content": "a", "thinking": 3}]}, "non-string reasoning"),
        ({"messages": [{"role": "assistant", "reasoning_content": " "}]}, "message 0 (assistant) has no 'content'"),
        ({"messages": [{"role": "assistant", "content": "a", "reasoning": "\ue002"}]}, "private-use characters"),
        ({**chat("a", "b"), "unmask": "yes"}, "'unmask' is not true or false ('yes')"),
        ({**chat("a", "b"), "tools": {"name": "f"}}, "'tools' is not a list (dict)"),
        ({"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0] has unknown 'from' 'bot'"),
        ({"conversations": [{"from": "human"}]}, "conversations[0] is not an object with 'from' and 'value'"),
        ({"conversations": [{"from": "function_call", "value": "{"}]}, "conversations[0] (function_call) is not JSON"),
        ({"conversations": []}, "'conversations' is not a non-empty list"),
    ],
)
def test_bad_reasoning_unmask_and_sharegpt_fields(tiny_tokenizer, record, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        tokenize_sample(tiny_tokenizer, probe_template(tiny_tokenizer), record)


def test_sharegpt_lines_are_read_as_messages(tiny_tokenizer):
    sharegpt = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(TOOL_CALL["function"])},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ],
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    info = probe_template(tiny_tokenizer)
    expected = tokenize_sample(tiny_tokenizer, info, {"messages": messages})
    assert tokenize_sample(tiny_tokenizer, info, sharegpt) == expected
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    plain = {"conversations": turns}
    as_messages = {"messages": [{"role": "system", "content": "S"}, *chat("Q", "A")["messages"]]}
    assert tokenize_sample(tiny_tokenizer, info, plain) == tokenize_sample(tiny_tokenizer, info, as_messages)


def run_main(capsys, input_file, output_file, model_dir, *extra) -> tuple[int, str, str]:
    """process_data.main in this process; (exit code, stdout, stderr)."""
    argv = ["--input-file", str(input_file), "--output-file", str(output_file), "--model-name-or-path", str(model_dir)]
    capsys.readouterr()  # what the test printed before (datasets' progress bars)
    code = 0
    try:
        process_data.main(argv + ["--num-proc", "1", *extra])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_warns_once_and_counts_in_the_summary(tmp_path, tiny_model_dir):
    records = [chat(f"q{i}", f"a{i}") for i in range(100)]
    for record in records[::10]:
        record["messages"][1]["reasoning_content"] = "thinking"
    records[5]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    input_file = write_lines(tmp_path / "in.jsonl", records)
    result = run_cli(input_file, tmp_path / "out.jsonl", tiny_model_dir, "--num-proc", "2")
    assert result.returncode == 0, result.stderr
    default = "the chat template adds its default system prompt 'You are a tiny helpful assistant.'"
    reasoning = "the chat template does not render reasoning fields"
    assert result.stderr.count(f"warning: {default} (first at {input_file}:1;") == 1
    assert result.stderr.count(f"warning: {reasoning} (first at {input_file}:1;") == 1
    assert f"warning ({default}): 99 kept samples" in result.stdout
    assert f"warning ({reasoning}): 10 kept samples" in result.stdout


@pytest.mark.parametrize("lines, skip, what", [
    ([], False, "is empty"),
    (["", "  "], False, "is empty"),
    ([{"messages": [{"role": "user", "content": "no answer"}]}] * 2, False, "gives no sample to keep (2 read)"),
    (["{bad", {"messages": []}], True, "gives no sample to keep (2 read)"),
])  # fmt: skip
def test_cli_nothing_to_keep_is_an_error_that_writes_nothing(tmp_path, tiny_model_dir, capsys, lines, skip, what):
    input_file = tmp_path / "in.jsonl"
    input_file.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    output_file = tmp_path / "out" / "tokenized.jsonl"
    extra = ["--skip-invalid"] if skip else []
    code, out, err = run_main(capsys, input_file, output_file, tiny_model_dir, *extra)
    assert code == 1 and f"error: {input_file} {what}; nothing written" in err
    assert "samples kept:    0" in out
    assert list((tmp_path / "out").iterdir()) == []  # no output, no temporary file


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--num-proc", "0"], "--num-proc must be at least 1 (got 0)"),
    (["--num-proc", "two"], "argument --num-proc: invalid int value: 'two'"),
    (["--max-sample-num-tokens", "0"], "--max-sample-num-tokens must be at least 1 (got 0)"),
    (["--num-examples-to-print", "-1"], "--num-examples-to-print must be 0 or more (got -1)"),
    (["--chat-template", "missing.jinja"], "--chat-template missing.jinja: no such file"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])  # fmt: skip
def test_bad_flags_give_one_error_line(tmp_path, tiny_model_dir, capsys, extra, message):
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")])
    code, _, err = run_main(capsys, input_file, tmp_path / "out.jsonl", tiny_model_dir, *extra)
    assert code == 2 and message in one_error_line(err)


def test_missing_paths_give_one_error_line(tmp_path, tiny_model_dir, capsys):
    code, _, err = run_main(capsys, tmp_path / "nope.jsonl", tmp_path, tiny_model_dir)
    line = one_error_line(err)
    assert code == 2 and f"--input-file {tmp_path}/nope.jsonl: no such file or folder" in line
    assert f"--output-file {tmp_path} is a folder" in line  # every problem at once
    with pytest.raises(SystemExit) as exit_info:
        process_data.main(["--input-file", "x.jsonl"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --output-file" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name, message", [
    ("/no/such/model", "/no/such/model is not a folder, nor a model name the hub could have"),
    ("someorg/no-such-model", "someorg/no-such-model is not a folder, and the hub cannot be reached"),
])  # fmt: skip
def test_model_that_is_neither_folder_nor_reachable(tmp_path, capsys, name, message):
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")])
    code, _, err = run_main(capsys, input_file, tmp_path / "out.jsonl", name)
    assert code == 1 and message in one_error_line(err)


def test_model_folder_without_tokenizer(tmp_path, capsys):
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")])
    (tmp_path / "empty-model").mkdir()
    code, _, err = run_main(capsys, input_file, tmp_path / "out.jsonl", tmp_path / "empty-model")
    assert code == 1 and "empty-model: no tokenizer could be loaded from this folder" in one_error_line(err)


def test_model_name_the_hub_does_not_have():
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/a/b"))
    try:  # what transformers raises: an OSError caused by huggingface_hub's error
        try:
            raise RepositoryNotFoundError("404 Client Error", response=response)
        except RepositoryNotFoundError as cause:
            raise OSError("a/b is not a local folder and is not a valid model identifier") from cause
    except OSError as error:
        message = process_data.why_no_tokenizer("a/b", error)
    assert message == "--model-name-or-path a/b is not a folder, and the hub has no such model (or it is private)"


# ---------------------------------------------------------------------------------------------------------------------
# Tables: parquet, Arrow and datasets folders
# ---------------------------------------------------------------------------------------------------------------------


def table_records() -> list[dict]:
    # Every record has "unmask": from_list takes the columns from the first record (nested fields from all).
    records = [chat(f"What is {i} plus {i}?", f"It is {2 * i}.", id=i, unmask=False) for i in range(70)]
    records[3]["messages"][1]["reasoning_content"] = "adding"
    records[4]["messages"] = [{"role": "user", "content": "Weather?"},
                              {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                              {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    records[5]["unmask"] = True
    return records


def write_tables(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    """The same records as parquet, Arrow (stream and file formats) and a save_to_disk folder."""
    import datasets
    import pyarrow as pa

    dataset = datasets.Dataset.from_list(records)
    paths = {"parquet": tmp_path / "t.parquet", "folder": tmp_path / "saved", "arrow": tmp_path / "t.arrow",
             "arrow-file": tmp_path / "file.arrow"}  # fmt: skip
    dataset.to_parquet(str(paths["parquet"]))
    dataset.save_to_disk(str(paths["folder"]))
    table = dataset.data.table
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(paths["arrow-file"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return paths


def test_tables_give_the_same_samples_as_jsonl(tmp_path, tiny_model_dir, capsys):
    records = table_records()
    jsonl = write_lines(tmp_path / "in.jsonl", records)
    code, _, err = run_main(capsys, jsonl, tmp_path / "from-jsonl.jsonl", tiny_model_dir)
    assert code == 0, err
    expected = [json.loads(line) for line in (tmp_path / "from-jsonl.jsonl").read_text().splitlines()]
    assert expected[5]["num_loss_counted_tokens"] > expected[6]["num_loss_counted_tokens"]  # unmask made it in
    for kind, path in write_tables(tmp_path, records).items():
        output_file = tmp_path / f"from-{kind}.jsonl"
        code, out, err = run_main(capsys, path, output_file, tiny_model_dir)
        assert code == 0, err
        samples = [json.loads(line) for line in output_file.read_text().splitlines()]
        assert [(s["id"], s["input_ids"], s["labels"]) for s in samples] == [
            (s["id"], s["input_ids"], s["labels"]) for s in expected
        ], kind
        assert "=== example: row " in out
    assert samples[3]["messages"][1]["reasoning_content"] == "adding"  # table rows hold every nested field
    assert samples[4]["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_table_errors_name_the_row(tmp_path, tiny_model_dir, capsys):
    import datasets

    records = [chat("a", "b"), chat("c", "d")]
    records[1]["messages"][0]["role"] = "wizard"
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    code, _, err = run_main(capsys, path, tmp_path / "out.jsonl", tiny_model_dir)
    assert code == 1 and f"error: {path}: row 1: message 0 has unknown role 'wizard'" in err

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:1])}).save_to_disk(str(splits))
    code, _, err = run_main(capsys, splits, tmp_path / "out.jsonl", tiny_model_dir)
    assert code == 1 and f"holds the splits train: pass one split's folder, e.g. {splits}/train" in one_error_line(err)
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The fast path: one marked render per chat, one tokenizer call per chunk (issue 10)
# ---------------------------------------------------------------------------------------------------------------------


def run_chunk(tokenizer, items: list) -> list[tuple]:
    """process_chunk in this process, on (number, JSON line as bytes or record) items."""
    process_data._worker.update(tokenizer=tokenizer, info=probe_template(tokenizer), max_tokens=None, path="in.jsonl",
                                unit="line")  # fmt: skip
    return process_data.process_chunk(items)


def test_chunk_gives_what_each_sample_gives_alone(tiny_tokenizer):
    records = [
        chat("Hi", "Hello."),
        {"messages": [{"role": "pretrain", "content": "Waves roll in."}], "id": 1},
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "thinking": "t"}]},
        {"messages": [{"role": "system", "content": "S"}, *chat("Weather?", "Sunny.")["messages"]], "unmask": True},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {**chat("Hi", "Hello."), "input_ids": [1], "len": 0},  # output fields replaced in place, as json.dumps does
    ]
    items = [(n, json.dumps(r).encode()) for n, r in enumerate(records, start=1)]
    items.insert(2, (99, b"{bad json"))
    results = run_chunk(tiny_tokenizer, items)
    assert [r[:2] for r in results] == [("kept", 1), ("kept", 2), ("invalid", 99), ("kept", 3), ("kept", 4),
                                        ("dropped", 5), ("kept", 6)]  # fmt: skip
    info = probe_template(tiny_tokenizer)
    for record, result in zip(records[:4] + records[5:], results[:2] + results[3:5] + results[6:], strict=True):
        input_ids, labels, warnings = tokenize_sample(tiny_tokenizer, info, record)
        num_loss = sum(label != IGNORE_INDEX for label in labels)
        fields = {"input_ids": input_ids, "labels": labels, "len": len(input_ids), "num_loss_counted_tokens": num_loss}
        assert result[2:] == (json.dumps({**record, **fields}, ensure_ascii=False), len(input_ids), num_loss, warnings)


def test_a_chunk_check_that_fails_stops_the_run(tmp_path, tiny_model_dir, capsys):
    """Only the first chat of each chunk is rendered twice; if its renders differ, the unchecked chats may be wrong
    too, so nothing is kept (--skip-invalid or not)."""
    template = tmp_path / "branchy.jinja"  # renders a content differently when it equals 'magic' exactly
    template.write_text(KEEP_ALL.replace("{{ m.content if m.content is string else '' }}",
                                         "{{ 'MAGIC' if m.content == 'magic' else m.content }}"))  # fmt: skip
    input_file = write_lines(tmp_path / "in.jsonl", [chat("magic", "b")] + [chat("a", "b")] * 70)
    code, _, err = run_main(capsys, input_file, tmp_path / "out.jsonl", tiny_model_dir, "--chat-template",
                            str(template), "--skip-invalid")  # fmt: skip
    assert code == 1
    assert f"error: {input_file}:1: the chat template transforms message content; cannot mask reliably" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_does_not_import_torch(tmp_path, tiny_model_dir):
    """A tokenizer needs no torch; importing it cost about a second of every run."""
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")])
    command = [sys.executable, "-X", "importtime", str(REPO_ROOT / "process_data.py"), "--input-file", str(input_file),
               "--output-file", str(tmp_path / "out.jsonl"), "--model-name-or-path", str(tiny_model_dir)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| transformers" in result.stderr  # importtime did report
    assert not re.findall(r"\|\s*torch$", result.stderr, flags=re.MULTILINE)
    assert "PyTorch was not found" not in result.stderr


def test_one_process_loads_the_tokenizer_once(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A second load cost about 0.8 s of every --num-proc 1 run (Qwen2.5's tokenizer)."""
    loads = []
    load = process_data.load_tokenizer
    monkeypatch.setattr(process_data, "load_tokenizer", lambda *args: loads.append(args) or load(*args))
    input_file = write_lines(tmp_path / "in.jsonl", [chat("a", "b")])
    code, _, err = run_main(capsys, input_file, tmp_path / "out.jsonl", tiny_model_dir)
    assert code == 0, err
    assert len(loads) == 1


def test_labels_follow_the_overlap_rule():
    """A token is trained when it overlaps a span, or is empty and lies inside one (at its start included)."""
    rng = random.Random(0)
    for _ in range(20000):
        length = rng.randint(1, 30)
        offsets = sorted((a, min(length, a + rng.randint(0, 4))) for a in rng.choices(range(length + 1), k=12))
        cuts = sorted(rng.choices(range(length + 1), k=2 * rng.randint(0, 3)))
        spans = list(zip(cuts[::2], cuts[1::2], strict=True))
        expected = [
            t if any(s < b and (e > a or a <= s == e) for a, b in spans) else IGNORE_INDEX
            for t, (s, e) in enumerate(offsets)
        ]
        assert labels_from_offsets(list(range(len(offsets))), offsets, spans) == expected, (offsets, spans)
