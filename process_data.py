"""Tokenizes chats into `input_ids` and `labels` for train.py, training assistant turns (and asked, user contents).

    python process_data.py --input-file chats.jsonl --output-file tokenized.jsonl \\
        --model-name-or-path Qwen/Qwen2.5-1.5B-Instruct --max-sample-num-tokens 32768

Input: JSONL, one chat per line, as {"messages": [...]} or ShareGPT's {"conversations": [...]}; or the rows of a
parquet or Arrow file or of a `datasets` folder (save_to_disk). How labels are found is masking.py's docstring.
"""

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool

from masking import (
    IGNORE_INDEX,
    MARKER_CHARS_RE,
    REASONING_FIELDS,
    MaskingError,
    TemplateInfo,
    has_text,
    probe_template,
    tokenize_chat,
)
from utils import InputError, atomic_write, fail, iter_jsonl_lines, location, parse_json_line, print0

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "pretrain")
# ShareGPT's "from" -> our role; "function_call" is an assistant's tool call, "observation" a tool's result.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "tool": "tool", "observation": "tool"}  # fmt: skip
TABLE_SUFFIXES = (".parquet", ".arrow")  # read through `datasets`, like a folder written by save_to_disk
CHUNK_SIZE = 64  # samples per task sent to a worker: large enough to amortize IPC, small enough to stream


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one `error: ...` line, like every other error of this script."""

    def error(self, message: str) -> None:
        fail(f"{message} (see --help)", 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input-file", required=True, help="JSONL file of chats, or a parquet/Arrow file or datasets folder."
    )
    parser.add_argument(
        "--output-file", required=True, help="JSONL file to write (atomically) the tokenized samples to."
    )
    parser.add_argument(
        "--model-name-or-path", required=True, help="Model folder or name whose tokenizer (AutoTokenizer) is used."
    )
    parser.add_argument(
        "--max-sample-num-tokens",
        type=int,
        default=None,
        help="Drop (and count) samples longer than this many tokens. Default: no limit.",
    )
    parser.add_argument(
        "--num-proc", type=int, default=os.cpu_count() or 1, help="Worker processes. Default: all cores."
    )
    parser.add_argument(
        "--num-examples-to-print", type=int, default=2, help="Kept samples to print with trained spans marked."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed for choosing which examples to print.")
    parser.add_argument(
        "--chat-template", default=None, help="Jinja file that overrides the tokenizer's chat template."
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="Skip bad input lines (listing each with its reason) instead of stopping at the first one.",
    )
    args = parser.parse_args(argv)
    problems = argument_problems(args)
    if problems:
        fail("; ".join(problems), 2)
    return args


def argument_problems(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments that can be seen before reading anything."""
    problems = []
    if not os.path.exists(args.input_file):
        problems.append(f"--input-file {args.input_file}: no such file or folder")
    if os.path.isdir(args.output_file):
        problems.append(f"--output-file {args.output_file} is a folder")
    elif os.path.exists(args.input_file) and os.path.realpath(args.output_file) == os.path.realpath(args.input_file):
        problems.append("--output-file is the input file")
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        problems.append(f"--chat-template {args.chat_template}: no such file")
    if args.num_proc < 1:
        problems.append(f"--num-proc must be at least 1 (got {args.num_proc})")
    if args.max_sample_num_tokens is not None and args.max_sample_num_tokens < 1:
        problems.append(f"--max-sample-num-tokens must be at least 1 (got {args.max_sample_num_tokens})")
    if args.num_examples_to_print < 0:
        problems.append(f"--num-examples-to-print must be 0 or more (got {args.num_examples_to_print})")
    return problems


def load_tokenizer(model_name_or_path: str, chat_template_path: str | None = None):
    """AutoTokenizer, fast only (we need offsets), with an optional chat template override. ValueError, one line
    saying what is wrong, otherwise."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except Exception as e:
        raise ValueError(why_no_tokenizer(model_name_or_path, e)) from None
    if not tokenizer.is_fast:
        raise MaskingError(f"{model_name_or_path}: a fast tokenizer (tokenizer.json) is needed for offsets")
    if chat_template_path is not None:
        with open(chat_template_path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not tokenizer.chat_template:
        raise MaskingError(f"{model_name_or_path}: the tokenizer has no chat template; pass --chat-template")
    return tokenizer


def why_no_tokenizer(name: str, error: BaseException) -> str:
    """One line for a tokenizer that did not load: a folder without one, or a name the hub did not give."""
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.isdir(name):
        return f"--model-name-or-path {name}: no tokenizer could be loaded from this folder ({first_line})"
    if os.path.exists(name):
        return f"--model-name-or-path {name} is a file, not a model folder"
    causes = []
    while error is not None and error not in causes:
        causes.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, HFValidationError) for e in causes):
        return f"--model-name-or-path {name} is not a folder, nor a model name the hub could have"
    if any(isinstance(e, RepositoryNotFoundError) for e in causes):
        return f"--model-name-or-path {name} is not a folder, and the hub has no such model (or it is private)"
    if any(isinstance(e, (LocalEntryNotFoundError, ConnectionError)) for e in causes):
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "no network?"
        return f"--model-name-or-path {name} is not a folder, and the hub cannot be reached ({why})"
    return f"--model-name-or-path {name} is not a folder, and the hub did not give its tokenizer ({first_line})"


# ---------------------------------------------------------------------------------------------------------------------
# Reading and checking the input
# ---------------------------------------------------------------------------------------------------------------------


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


def tokenize_sample(tokenizer, info: TemplateInfo, record: dict) -> tuple[list[int], list[int], list[str]]:
    """input_ids, labels and warnings of one record; ValueError (bad input) or MaskingError (template) otherwise."""
    messages, tools = chat_of(record)
    if messages[0]["role"] == "pretrain":
        input_ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is None:
            raise MaskingError("the tokenizer has no eos token to end a pretrain sample")
        input_ids = input_ids + [tokenizer.eos_token_id]
        return input_ids, list(input_ids), []
    return tokenize_chat(tokenizer, info, messages, tools, unmask=bool(record.get("unmask")))


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------

_worker: dict = {}


def init_worker(model_name_or_path: str, chat_template_path: str | None, max_tokens: int | None, path: str) -> None:
    """Pool initializer: loads the tokenizer and probes its template once per process."""
    tokenizer = load_tokenizer(model_name_or_path, chat_template_path)
    _worker.update(tokenizer=tokenizer, info=probe_template(tokenizer), max_tokens=max_tokens, path=path)


def process_chunk(chunk: list[tuple[int, bytes | dict]]) -> list[tuple]:
    """Per item: ("kept", n, json, len, trained, warnings) | ("dropped", n, reason) | ("invalid", n, reason)."""
    tokenizer, info, max_tokens, path = _worker["tokenizer"], _worker["info"], _worker["max_tokens"], _worker["path"]
    results = []
    for number, item in chunk:
        try:
            record = parse_json_line(path, number, item) if isinstance(item, bytes) else item
            input_ids, labels, warnings = tokenize_sample(tokenizer, info, record)
        except InputError as e:
            results.append(("invalid", number, e.reason))
            continue
        except ValueError as e:  # includes MaskingError and ChatTemplateError
            results.append(("invalid", number, str(e)))
            continue
        num_loss = sum(label != IGNORE_INDEX for label in labels)
        if num_loss == 0:
            results.append(("dropped", number, "no trainable token"))
        elif max_tokens is not None and len(input_ids) > max_tokens:
            results.append(("dropped", number, f"longer than --max-sample-num-tokens={max_tokens}"))
        else:
            record.update(input_ids=input_ids, labels=labels, len=len(input_ids), num_loss_counted_tokens=num_loss)
            try:
                line = json.dumps(record, ensure_ascii=False)
            except TypeError as e:  # a table's row may hold dates or bytes
                results.append(("invalid", number, f"a field cannot be written as JSON ({e})"))
                continue
            results.append(("kept", number, line, len(input_ids), num_loss, warnings))
    return results


def chunked(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Stats:
    """What the run saw, for the summary."""

    num_read: int = 0
    lengths: list[int] = field(default_factory=list)  # of kept samples
    trained_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> samples
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (number, reason), with --skip-invalid
    warned: Counter = field(default_factory=Counter)  # warning -> kept samples it concerns
    examples: list[tuple[int, str]] = field(default_factory=list)  # (number, output line): a seeded reservoir


def write_samples(args: argparse.Namespace, out, items: Iterator, total: int | None, unit: str) -> Stats:
    """Tokenizes every item (in worker processes if --num-proc > 1) and writes the kept ones in input order."""
    from tqdm import tqdm

    stats = Stats()
    rng = random.Random(args.seed)
    init_args = (args.model_name_or_path, args.chat_template, args.max_sample_num_tokens, args.input_file)
    pool = Pool(args.num_proc, initializer=init_worker, initargs=init_args) if args.num_proc > 1 else None
    if pool is None:
        init_worker(*init_args)
    try:
        chunks = chunked(items, CHUNK_SIZE)
        results = pool.imap(process_chunk, chunks) if pool else map(process_chunk, chunks)
        with tqdm(total=total, unit="sample", file=sys.stderr) as bar:
            for chunk_results in results:
                for result in chunk_results:
                    kind, number = result[0], result[1]
                    stats.num_read += 1
                    if kind == "invalid":
                        if not args.skip_invalid:
                            raise InputError(args.input_file, number, result[2], unit)
                        stats.invalid.append((number, result[2]))
                    elif kind == "dropped":
                        stats.dropped[result[2]] += 1
                    else:
                        _, _, line, length, num_loss, warnings = result
                        out.write(line + "\n")
                        stats.lengths.append(length)
                        stats.trained_tokens += num_loss
                        for warning in warnings:
                            if not stats.warned[warning]:
                                where = location(args.input_file, number, unit)
                                bar.write(f"warning: {warning} (first at {where}; counted in the summary)", sys.stderr)
                            stats.warned[warning] += 1
                        if len(stats.examples) < args.num_examples_to_print:
                            stats.examples.append((number, line))
                        elif args.num_examples_to_print > 0:
                            j = rng.randrange(len(stats.lengths))
                            if j < args.num_examples_to_print:
                                stats.examples[j] = (number, line)
                bar.update(len(chunk_results))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return stats


def format_example(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decoded text with trained spans wrapped in [[ ]] (and green on a terminal)."""
    open_, close = ("\033[32m[[", "]]\033[0m") if color else ("[[", "]]")
    pieces, run, trained = [], [], None
    for token_id, label in zip(input_ids, labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained and run:
            pieces.append((trained, tokenizer.decode(run)))
            run = []
        trained = is_trained
        run.append(token_id)
    if run:
        pieces.append((trained, tokenizer.decode(run)))
    return "".join(f"{open_}{text}{close}" if t else text for t, text in pieces)


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def print_report(args: argparse.Namespace, tokenizer, stats: Stats, unit: str) -> None:
    """The examples, the skipped lines and the summary."""
    color = sys.stdout.isatty()
    for number, line in sorted(stats.examples):
        sample = json.loads(line)
        input_ids, labels = sample["input_ids"], sample["labels"]
        print0(f"\n=== example: {unit} {number} ({len(input_ids)} tokens; trained spans in [[ ]]) ===")
        print0(format_example(tokenizer, input_ids, labels, color))
    if stats.invalid:
        print0(f"\nskipped {len(stats.invalid)} invalid {unit}(s):")
        for number, reason in stats.invalid:
            print0(f"  {location(args.input_file, number, unit)}: {reason}")
    lengths = sorted(stats.lengths)
    print0("\n=== summary ===")
    print0(f"samples read:    {stats.num_read}")
    print0(f"samples kept:    {len(lengths)}")
    print0(f"invalid skipped: {len(stats.invalid)}")
    for reason, count in sorted(stats.dropped.items()):
        print0(f"dropped ({reason}): {count}")
    for warning, count in sorted(stats.warned.items()):
        print0(f"warning ({warning}): {count} kept samples")
    print0(f"tokens: {sum(lengths)} total, {stats.trained_tokens} trained")
    print0(
        f"length: p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
        f"p99 {percentile(lengths, 99)}, max {lengths[-1] if lengths else 0}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tokenizer = load_tokenizer(args.model_name_or_path, args.chat_template)
        info = probe_template(tokenizer)
        items, total, unit = open_input(args.input_file)
    except (ValueError, OSError) as e:  # ValueError includes MaskingError and InputError
        fail(str(e))
    print0(f"chat template: assistant header {info.header!r}, end of turn {info.eot!r}")

    start_time = time.perf_counter()
    try:
        with atomic_write(args.output_file) as out:
            stats = write_samples(args, out, items, total, unit)
            if not stats.lengths:  # fail inside the block: no output file is written
                print_report(args, tokenizer, stats, unit)
                what = "is empty" if not stats.num_read else f"gives no sample to keep ({stats.num_read} read)"
                fail(f"{args.input_file} {what}; nothing written")
    except InputError as e:
        fail(f"{e} (use --skip-invalid to skip bad {unit}s)")
    except OSError as e:
        fail(str(e))
    elapsed = time.perf_counter() - start_time
    print_report(args, tokenizer, stats, unit)
    print0(f"wrote {args.output_file} in {elapsed:.1f}s ({stats.num_read / max(elapsed, 1e-9):.0f} samples/s)")


if __name__ == "__main__":
    main()
