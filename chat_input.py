"""Reading chats for process_data.py: JSONL lines ({"messages": ...} or ShareGPT's {"conversations": ...}) and the
rows of parquet and Arrow files and `datasets` folders, and the checks that make a record a usable chat."""

import json
import os
from collections.abc import Iterator

from masking import MARKER_CHARS_RE, REASONING_FIELDS, has_text
from utils import InputError, iter_jsonl_lines

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "pretrain")
# ShareGPT's "from" -> our role; "function_call" is an assistant's tool call, "observation" a tool's result.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "tool": "tool", "observation": "tool"}  # fmt: skip
TABLE_SUFFIXES = (".parquet", ".arrow")  # read through `datasets`, like a folder written by save_to_disk


def open_input(path: str) -> tuple[Iterator[tuple[int, bytes | dict]], int | None, str]:
    """(items, how many if known, unit): JSONL lines as bytes numbered from 1, or a table's rows as dicts numbered
    from 0 (as `dataset[i]` numbers them), read through the `datasets` library (imported only for those)."""
    if not (os.path.isdir(path) or path.endswith(TABLE_SUFFIXES)):
        with open(path, "rb") as f:
            total = sum(1 for line in f if line.strip())
        return iter_jsonl_lines(path), total, "line"
    import datasets

    try:
        if os.path.isdir(path):
            dataset = datasets.load_from_disk(path)
        else:
            builder = "parquet" if path.endswith(".parquet") else "arrow"
            dataset = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
    except Exception as e:
        raise InputError(path, None, f"cannot be read by the datasets library ({e})") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = os.path.join(path, next(iter(dataset)))
        raise InputError(path, None, f"holds the splits {', '.join(dataset)}: pass one split's folder, e.g. {split}")
    return numbered_rows(path, dataset), len(dataset) if isinstance(dataset, datasets.Dataset) else None, "row"


def numbered_rows(path: str, dataset) -> Iterator[tuple[int, dict]]:
    try:
        yield from enumerate(dataset)
    except Exception as e:  # a corrupt row group, say: the file's fault, not a bug of ours
        raise InputError(path, None, f"cannot be read by the datasets library ({e})") from None


def sharegpt_messages(record: dict) -> list[dict]:
    """ShareGPT's {"conversations": [{"from": ..., "value": ...}]} (and a top-level "system") as messages."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' is not a non-empty list")
    messages = [{"role": "system", "content": record["system"]}] if has_text(record.get("system")) else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] is not an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"conversations[{i}] has unknown 'from' {turn['from']!r} "
                             f"(allowed: {', '.join(SHAREGPT_ROLES)})")  # fmt: skip
        if turn["from"] != "function_call":
            messages.append({"role": role, "content": turn["value"]})
            continue
        try:  # {"name": ..., "arguments": ...}, or a list of them, as a JSON string
            calls = json.loads(turn["value"]) if isinstance(turn["value"], str) else turn["value"]
        except json.JSONDecodeError:
            raise ValueError(f"conversations[{i}] (function_call) is not JSON") from None
        calls = calls if isinstance(calls, list) else [calls]
        if not all(isinstance(c, dict) and "name" in c for c in calls):
            raise ValueError(f"conversations[{i}] (function_call) is not a call with a 'name', nor a list of them")
        messages.append({"role": "assistant", "tool_calls": [{"type": "function", "function": c} for c in calls]})
    return messages


def chat_of(record: dict) -> tuple[list[dict], list | None]:
    """The record's validated messages and tools; ValueError with the reason they are unusable."""
    if "messages" not in record and "conversations" in record:
        messages = sharegpt_messages(record)
    else:
        messages = record.get("messages")
    tools = record.get("tools")
    if isinstance(tools, str) and "conversations" in record:  # ShareGPT keeps tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise ValueError("'tools' is a string that is not JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"'tools' is not a list ({type(tools).__name__})")
    if record.get("unmask") not in (None, True, False):
        raise ValueError(f"'unmask' is not true or false ({record['unmask']!r})")
    validate_messages(messages)
    return messages, tools


def validate_messages(messages) -> None:
    """Raises ValueError with the reason the messages are unusable. Null reasoning and tool_calls count as absent
    (a table fills every field of every row)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is missing or not a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role'")
        role = message["role"]
        if role not in ALLOWED_ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (allowed: {', '.join(ALLOWED_ROLES)})")
        reasoning = [message[f] for f in REASONING_FIELDS if message.get(f) is not None]
        if reasoning and role != "assistant":
            raise ValueError(f"message {i} ({role}) has reasoning; only assistant messages may")
        if not all(isinstance(text, str) for text in reasoning):
            raise ValueError(f"message {i} ({role}) has non-string reasoning")
        content = message.get("content")
        if content is None and role == "assistant" and (message.get("tool_calls") or any(map(has_text, reasoning))):
            pass  # a tool call, or reasoning alone, needs no content
        elif "content" not in message:
            raise ValueError(f"message {i} ({role}) has no 'content'")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has non-string content ({type(content).__name__})")
        if any(MARKER_CHARS_RE.search(text) for text in (content or "", *reasoning)):
            raise ValueError(f"message {i} contains private-use characters U+E000..U+E003, which are reserved")
    if any(m["role"] == "pretrain" for m in messages) and len(messages) > 1:
        raise ValueError("a 'pretrain' message must be the only message of its sample")
