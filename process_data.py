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

from chat_input import chat_of, open_input
from masking import (
    IGNORE_INDEX,
    MaskingError,
    RenderMismatch,
    Spans,
    TemplateInfo,
    chat_text_and_spans,
    labels_from_offsets,
    probe_template,
)
from utils import InputError, atomic_write, fail, location, parse_json_line, print0

# Samples per task sent to a worker, encoded in one tokenizer call: large enough to amortize IPC and the call,
# small enough to stream. The first chat of each is also rendered without markers as a check (see process_chunk).
CHUNK_SIZE = 64
OUTPUT_FIELDS = ("input_ids", "labels", "len", "num_loss_counted_tokens")


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


def prepare_sample(tokenizer, info: TemplateInfo, record: dict, check: bool = True) -> tuple[str, Spans | None, list]:
    """The text to encode, its trained spans (None for a pretrain sample: all of it, then EOS) and its warnings.
    ValueError with the reason a record is unusable: bad input, MaskingError or ChatTemplateError."""
    messages, tools = chat_of(record)
    if messages[0]["role"] == "pretrain":
        if tokenizer.eos_token_id is None:
            raise MaskingError("the tokenizer has no eos token to end a pretrain sample")
        return messages[0]["content"], None, []
    return chat_text_and_spans(tokenizer, info, messages, tools, bool(record.get("unmask")), check)


def sample_labels(tokenizer, input_ids: list[int], offsets: list, spans: Spans | None) -> tuple[list[int], list[int]]:
    """input_ids and labels from the encoded text of prepare_sample."""
    if spans is None:
        input_ids = input_ids + [tokenizer.eos_token_id]
        return input_ids, list(input_ids)
    return input_ids, labels_from_offsets(input_ids, offsets, spans)


def encode(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, in one call (no attention mask: it would only cost time)."""
    encoding = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return encoding["input_ids"], encoding["offset_mapping"]


def tokenize_sample(tokenizer, info: TemplateInfo, record: dict) -> tuple[list[int], list[int], list[str]]:
    """input_ids, labels and warnings of one record, its render always checked; ValueError otherwise."""
    text, spans, warnings = prepare_sample(tokenizer, info, record)
    (input_ids,), (offsets,) = encode(tokenizer, [text])
    return *sample_labels(tokenizer, input_ids, offsets, spans), warnings


def output_line(record: dict, input_ids: list[int], labels: list[int], num_loss: int) -> str:
    """json.dumps of the record with the output fields set, byte for byte; for a record without them, built
    faster: json's encoder spends longer on the two long lists of ints than their repr, which is the same text."""
    if any(field in record for field in OUTPUT_FIELDS):
        fields = dict(zip(OUTPUT_FIELDS, (input_ids, labels, len(input_ids), num_loss), strict=True))
        return json.dumps({**record, **fields}, ensure_ascii=False)
    return (
        f"{json.dumps(record, ensure_ascii=False)[:-1]}, "
        f'"input_ids": {input_ids!r}, "labels": {labels!r}, "len": {len(input_ids)}, '
        f'"num_loss_counted_tokens": {num_loss}}}'
    )


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------

_worker: dict = {}


def init_worker(
    model_name_or_path: str, chat_template_path: str | None, max_tokens: int | None, path: str, unit: str
) -> None:
    """Pool initializer. The tokenizer and the template probe come from the main process where workers fork from it
    (and in --num-proc 1); loading the tokenizer again costs about 0.8 s. Where they spawn, each loads its own."""
    if "tokenizer" not in _worker:
        tokenizer = load_tokenizer(model_name_or_path, chat_template_path)
        _worker.update(tokenizer=tokenizer, info=probe_template(tokenizer))
    _worker.update(max_tokens=max_tokens, path=path, unit=unit)


def process_chunk(chunk: list[tuple[int, bytes | dict]]) -> list[tuple]:
    """Per item: ("kept", n, json, len, trained, warnings) | ("dropped", n, reason) | ("invalid", n, reason).

    Each chat is rendered once, with markers (the plain text is what removing them leaves). The chunk's first
    usable sample is also rendered plainly to check that both agree; a template that tests how texts start or end
    gets every chat checked, since the markers may change its answers for some chats only."""
    tokenizer, info, max_tokens = _worker["tokenizer"], _worker["info"], _worker["max_tokens"]
    path, unit = _worker["path"], _worker["unit"]
    results: list = [None] * len(chunk)
    prepared = []  # (position in chunk, number, record, text, spans, warnings)
    for k, (number, item) in enumerate(chunk):
        try:
            record = parse_json_line(path, number, item) if isinstance(item, bytes) else item
            check = info.tests_text or not prepared
            prepared.append((k, number, record, *prepare_sample(tokenizer, info, record, check)))
        except InputError as e:
            results[k] = ("invalid", number, e.reason)
        except RenderMismatch as e:
            if not info.tests_text:  # then the chats that were not checked may be wrong too: nothing can be kept
                raise MaskingError(f"{location(path, number, unit)}: {e} (this chat was a check)") from None
            results[k] = ("invalid", number, str(e))
        except ValueError as e:  # includes MaskingError and ChatTemplateError
            results[k] = ("invalid", number, str(e))
    if prepared:
        encoded = zip(prepared, *encode(tokenizer, [p[3] for p in prepared]), strict=True)
        for (k, number, record, _, spans, warnings), input_ids, offsets in encoded:
            input_ids, labels = sample_labels(tokenizer, input_ids, offsets, spans)
            results[k] = sample_result(number, record, input_ids, labels, warnings, max_tokens)
    return results


def sample_result(
    number: int, record: dict, input_ids: list[int], labels: list[int], warnings: list[str], max_tokens: int | None
) -> tuple:
    num_loss = len(labels) - labels.count(IGNORE_INDEX)
    if num_loss == 0:
        return "dropped", number, "no trainable token"
    if max_tokens is not None and len(input_ids) > max_tokens:
        return "dropped", number, f"longer than --max-sample-num-tokens={max_tokens}"
    try:
        line = output_line(record, input_ids, labels, num_loss)
    except TypeError as e:  # a table's row may hold dates or bytes
        return "invalid", number, f"a field cannot be written as JSON ({e})"
    return "kept", number, line, len(input_ids), num_loss, warnings


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


def write_samples(
    args: argparse.Namespace, tokenizer, info: TemplateInfo, out, items: Iterator, total: int | None, unit: str
) -> Stats:
    """Tokenizes every item (in worker processes if --num-proc > 1) and writes the kept ones in input order."""
    from tqdm import tqdm

    stats = Stats()
    rng = random.Random(args.seed)
    _worker.update(tokenizer=tokenizer, info=info)
    init_args = (args.model_name_or_path, args.chat_template, args.max_sample_num_tokens, args.input_file, unit)
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
            stats = write_samples(args, tokenizer, info, out, items, total, unit)
            if not stats.lengths:  # fail inside the block: no output file is written
                print_report(args, tokenizer, stats, unit)
                what = "is empty" if not stats.num_read else f"gives no sample to keep ({stats.num_read} read)"
                fail(f"{args.input_file} {what}; nothing written")
    except InputError as e:  # a bad line (or row), or a table that cannot be read
        fail(f"{e} (use --skip-invalid to skip bad {unit}s)" if e.line_number is not None else str(e))
    except (MaskingError, OSError) as e:
        fail(str(e))
    elapsed = time.perf_counter() - start_time
    print_report(args, tokenizer, stats, unit)
    print0(f"wrote {args.output_file} in {elapsed:.1f}s ({stats.num_read / max(elapsed, 1e-9):.0f} samples/s)")


def without_torch() -> None:
    """Keeps transformers from importing torch, which a tokenizer does not need (about 1 s of start-up here).

    A None entry in sys.modules makes `import torch` fail and find_spec report it missing, which transformers and
    datasets both check. Done only when this file runs as a script (its workers fork from it), never when it is
    imported beside train.py."""
    sys.modules.setdefault("torch", None)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its "PyTorch was not found" notice


if __name__ == "__main__":
    without_torch()
    main()
