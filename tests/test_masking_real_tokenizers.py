"""Assistant-only labels on every real tokenizer family in $MINI_TRAINER_TOKENIZERS (skipped when unset).

Template-only families (.jinja files) are rendered on a loadable tokenizer after adding their special
tokens, as shared/tokenizers/README.md says.
"""

import copy
import functools
import json

import pytest
from conftest import trained_runs

import process_data
from masking import probe_template
from process_data import tokenize_sample

LOADABLE = ["qwen2.5-instruct", "qwen3", "mistral-7b-instruct-v0.3", "smollm2-instruct", "tinyllama-1.1b-chat-v1.0"]

LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
PHI3 = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
DEEPSEEK = [
    "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>",
]  # fmt: skip
MISTRAL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]"]  # fmt: skip
# name: (base tokenizer folder, template file, bos, eos, special tokens); bos/eos as in each family's config.
TEMPLATE_ONLY = {
    "llama-3.1": ("qwen2.5-instruct", "llama-3.x-instruct/meta-llama-Llama-3.1-8B-Instruct.jinja",
                  "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "llama-3.2": ("qwen2.5-instruct", "llama-3.x-instruct/meta-llama-Llama-3.2-3B-Instruct.jinja",
                  "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "gemma-2": ("tinyllama-1.1b-chat-v1.0", "gemma-2-it/google-gemma-2-2b-it.jinja", "<bos>", "<end_of_turn>",
                ["<start_of_turn>", "<end_of_turn>"]),
    "gemma-3": ("tinyllama-1.1b-chat-v1.0", "gemma-3-it/chat_template.jinja", "<bos>", "<end_of_turn>",
                ["<start_of_turn>", "<end_of_turn>"]),
    "phi-3": ("qwen2.5-instruct", "phi-3-mini-instruct/chat_template.jinja", "<s>", "<|endoftext|>", PHI3),
    "phi-3.5": ("qwen2.5-instruct", "phi-3.5-mini-instruct/microsoft-Phi-3.5-mini-instruct.jinja", "<s>",
                "<|endoftext|>", PHI3),
    "phi-4": ("qwen2.5-instruct", "phi-4/chat_template.jinja", "<|endoftext|>", "<|im_end|>",
              ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "deepseek-r1-distill": ("qwen2.5-instruct", "deepseek-r1-distill/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK),
    "mistral-nemo": ("tinyllama-1.1b-chat-v1.0",
                     "mistral-nemo-instruct-2407/mistralai-Mistral-Nemo-Instruct-2407.jinja",
                     "<s>", "</s>", MISTRAL),
}  # fmt: skip
FAMILIES = LOADABLE + list(TEMPLATE_ONLY)
# Families whose templates render assistant tool calls and tool results.
TOOL_FAMILIES = {"qwen2.5-instruct", "qwen3", "mistral-7b-instruct-v0.3", "llama-3.1", "llama-3.2", "mistral-nemo"}
NO_SYSTEM_ROLE = {"gemma-2"}
SENTENCEPIECE = {"mistral-7b-instruct-v0.3", "tinyllama-1.1b-chat-v1.0", "gemma-2", "gemma-3", "mistral-nemo"}
# Text a template injects that must never be trained.
INJECTED = ["You are Qwen", "SmolLM", "Cutting Knowledge", "Today Date"]

SYSTEM = "SYSTEM-TEXT be brief"
DEFAULT_SYSTEM_WARNINGS = {
    "qwen2.5-instruct": ["the chat template adds its default system prompt "
                         "'You are Qwen, created by Alibaba Cloud. You are a helpful...'"],
    "smollm2-instruct": ["the chat template adds its default system prompt "
                         "'You are a helpful AI assistant named SmolLM, trained by H...'"],
}  # fmt: skip
TOOL_CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@functools.cache
def _load(root: str, family: str):
    from transformers import AutoTokenizer

    if family in LOADABLE:
        return AutoTokenizer.from_pretrained(f"{root}/{family}")
    base, template, bos, eos, specials = TEMPLATE_ONLY[family]
    tokenizer = copy.deepcopy(_load(root, base))
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": specials})
    with open(f"{root}/{template}", encoding="utf-8") as f:
        tokenizer.chat_template = f.read()
    return tokenizer


@pytest.fixture(params=FAMILIES)
def family(request, real_tokenizers_dir):
    return request.param, _load(str(real_tokenizers_dir), request.param)


def check(name, tokenizer, messages, unmask: bool = False) -> tuple[list[str], list[str]]:
    """Tokenizes; checks input_ids against apply_chat_template and that nothing but assistant turns (and with
    `unmask` user and tool contents) is trained. Returns the trained runs and the warnings."""
    record = {"messages": messages, "unmask": unmask}
    input_ids, labels, warnings = tokenize_sample(tokenizer, probe_template(tokenizer), record)
    assert input_ids == tokenizer.apply_chat_template(messages, return_dict=False)
    assert (
        tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        == input_ids
    )
    runs = trained_runs(tokenizer, input_ids, labels)
    eot = probe_template(tokenizer).eot
    trained_roles = ("assistant", "user", "tool") if unmask else ("assistant",)
    assert len(runs) == sum(m["role"] in trained_roles for m in messages)
    for run in runs:
        assert run.endswith(eot) or unmask
        for message in messages:
            if message["role"] not in trained_roles and message["content"]:
                assert message["content"] not in run
        for text in INJECTED:
            assert text not in run
    if name in SENTENCEPIECE:  # "▁Hello" after "[/INST]" decodes with or without its space
        runs = [run.removeprefix(" ") for run in runs]
    return runs, warnings


def two_turn_chat(name: str, first_answer: str) -> list[dict]:
    """System prompt (where the family has the role), then two user/assistant turns."""
    messages = [{"role": "system", "content": SYSTEM}] if name not in NO_SYSTEM_ROLE else []
    return messages + [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]


def test_multi_turn_with_system(family):
    name, tokenizer = family
    messages = two_turn_chat(name, "The capital of France is Paris.")
    eot = probe_template(tokenizer).eot
    last = "<think>\n\n</think>\n\n" if name == "qwen3" else ""  # Qwen3 adds an empty think block to the last turn
    runs, warnings = check(name, tokenizer, messages)
    assert runs == ["The capital of France is Paris." + eot, last + "Madrid." + eot]
    if name in ("mistral-7b-instruct-v0.3", "mistral-nemo"):  # the system prompt goes with the LAST user turn only
        assert warnings == ["the chat template leaves out a system message"]
    else:
        assert warnings == ([] if messages[0]["role"] == "system" else DEFAULT_SYSTEM_WARNINGS.get(name, []))


def test_reasoning_blocks(family):
    name, tokenizer = family
    messages = [
        {"role": "user", "content": "Q one?"},
        {"role": "assistant", "content": "<think>\nfirst thought\n</think>\n\nA one."},
        {"role": "user", "content": "Q two?"},
        {"role": "assistant", "content": "<think>\nsecond thought\n</think>\n\nA two."},
    ]
    eot = probe_template(tokenizer).eot
    runs, warnings = check(name, tokenizer, messages)
    cut = "the chat template leaves out part of an assistant message (a <think> block?)"
    assert (cut in warnings) == (name in ("qwen3", "deepseek-r1-distill"))
    if name == "qwen3":  # earlier think blocks are stripped; the last one is kept and trained
        assert runs == ["A one." + eot, "<think>\nsecond thought\n</think>\n\nA two." + eot]
    elif name == "deepseek-r1-distill":  # keeps only what follows </think>
        assert runs == ["\n\nA one." + eot, "\n\nA two." + eot]
    else:
        assert runs == [m["content"] + eot for m in messages[1::2]]


def test_tool_call_and_result(family):
    name, tokenizer = family
    if name not in TOOL_FAMILIES:
        pytest.skip(f"{name}'s template has no tool calls")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "sunny 22C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    eot = probe_template(tokenizer).eot
    runs, _ = check(name, tokenizer, messages)
    assert "get_weather" in runs[0] and "Paris" in runs[0] and "sunny" not in runs[0]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert runs[0] in rendered  # the call exactly as the template renders it
    last = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
    assert runs[1] == last + "It is sunny." + eot


def test_reasoning_fields(family):
    """Qwen3 renders the last turn's reasoning_content (trained, inside the assistant body) and drops earlier
    turns'; every other family here renders no reasoning field at all, DeepSeek-R1's included."""
    name, tokenizer = family
    messages = [
        {"role": "user", "content": "Q one?"},
        {"role": "assistant", "content": "A one.", "reasoning_content": "first thought"},
        {"role": "user", "content": "Q two?"},
        {"role": "assistant", "content": "A two.", "thinking": "second thought"},
    ]
    eot = probe_template(tokenizer).eot
    runs, warnings = check(name, tokenizer, messages)
    assert probe_template(tokenizer).renders_reasoning == (name == "qwen3")
    if name == "qwen3":
        assert runs == ["A one." + eot, "<think>\nsecond thought\n</think>\n\nA two." + eot]
        assert warnings == ["the chat template leaves out the reasoning of an assistant turn (not the last one)"]
    else:
        assert runs == ["A one." + eot, "A two." + eot]
        assert "the chat template does not render reasoning fields" in warnings


def test_unmask(family):
    """User contents are trained as rendered (tokens that overlap them), never the system prompt or headers."""
    name, tokenizer = family
    messages = two_turn_chat(name, "Paris.")
    eot = probe_template(tokenizer).eot
    last = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
    runs, _ = check(name, tokenizer, messages, unmask=True)
    assert runs == ["What is the capital of France?", "Paris." + eot, "And of Spain?", last + "Madrid." + eot]


def test_default_system_prompt_is_detected(family):
    name, tokenizer = family
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert check(name, tokenizer, messages)[1] == DEFAULT_SYSTEM_WARNINGS.get(name, [])


def test_pretrain(family):
    name, tokenizer = family
    input_ids, labels, warnings = tokenize_sample(
        tokenizer, probe_template(tokenizer), {"messages": [{"role": "pretrain", "content": "Plain text."}]}
    )
    assert warnings == []
    expected = tokenizer("Plain text.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert input_ids == expected and labels == input_ids


def test_deepseek_single_tool_call_is_refused(real_tokenizers_dir):
    """DeepSeek's template fails on a lone tool call with null content (and would not close it with an
    end-of-turn token): the sample is refused with a reason, never written with wrong labels."""
    tokenizer = _load(str(real_tokenizers_dir), "deepseek-r1-distill")
    tool_call = {**TOOL_CALL, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "content": "sunny 22C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    with pytest.raises(ValueError, match="chat template error|cannot mask"):  # MaskingError is a ValueError
        tokenize_sample(tokenizer, probe_template(tokenizer), {"messages": messages})


def test_gemma2_system_role_gives_template_error_with_line(real_tokenizers_dir, tmp_path, capsys):
    tokenizer = _load(str(real_tokenizers_dir), "gemma-2")
    tokenizer.save_pretrained(tmp_path / "gemma-2")
    input_file = tmp_path / "in.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "system", "content": "S"}, *good["messages"]]}
    input_file.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    argv = ["--input-file", str(input_file), "--output-file", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        process_data.main(argv + ["--model-name-or-path", str(tmp_path / "gemma-2"), "--num-proc", "1"])
    assert exit_info.value.code == 1
    assert f"{input_file}:2: chat template error: System role not supported" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_template_that_tests_texts_gets_every_chat_checked(real_tokenizers_dir):
    """Qwen3 tells a tool response sent as a user message by how its text starts and ends; with markers it would
    take it for a query and drop an earlier turn's reasoning. A chunk renders only its first chat twice, but such a
    template gets every chat checked: the chat is refused, never kept with input_ids unlike apply_chat_template's."""
    root = str(real_tokenizers_dir)
    tokenizer = _load(root, "qwen3")
    assert probe_template(tokenizer).tests_text and not probe_template(_load(root, "qwen2.5-instruct")).tests_text
    normal = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    tool_response_as_user = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "look it up"},
        {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "it is sunny"},
    ]}  # fmt: skip
    process_data._worker.update(tokenizer=tokenizer, info=probe_template(tokenizer), max_tokens=None, path="in",
                                unit="line")  # fmt: skip
    results = process_data.process_chunk([(1, normal), (2, tool_response_as_user)])
    assert results[0][0] == "kept"
    assert results[1] == ("invalid", 2, "the chat template transforms message content; cannot mask reliably")
