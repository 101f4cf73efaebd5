"""Tokenizes chat JSONL into `input_ids` and `labels` for train.py, training only on assistant turns.

    python process_data.py --input-file chats.jsonl --output-file tokenized.jsonl \
        --model-name-or-path Qwen/Qwen2.5-1.5B-Instruct --max-sample-num-tokens 32768

Labels are found without `{% generation %}` markers: the chat template is rendered a second time with
each message's content wrapped in private-use unicode markers, which tells us where every message
landed in the rendered text. A one-off probe of the template tells us what an assistant header and
an end-of-turn token look like. Tokens inside an assistant turn's body (after its header, through its
end-of-turn token) are trained; everything else is -100. Anything unexpected is an error, never a
silently wrong label.
"""

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool

from utils import InputError, atomic_write, fail, iter_jsonl_lines, parse_json_line, print0

IGNORE_INDEX = -100
ALLOWED_ROLES = ("system", "user", "assistant", "tool", "pretrain")
CHUNK_SIZE = 64  # lines per task sent to a worker: large enough to amortize IPC, small enough to stream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-file", required=True, help="JSONL file, one {'messages': [...]} chat per line.")
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
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------------------------


class MaskingError(ValueError):
    """The chat template does something we cannot locate assistant turns in reliably."""


# Private-use code points: \ue000 i \ue001 opens message i's content, \ue002 i \ue003 closes it.
MARKER_CHARS = "\ue000\ue001\ue002\ue003"
MARKER_RE = re.compile("\ue000(\\d+)\ue001|\ue002(\\d+)\ue003")
MARKER_CHARS_RE = re.compile(f"[{MARKER_CHARS}]")


@dataclass
class TemplateInfo:
    """What a probe of the chat template found: see probe_template."""

    header: str  # text that opens an assistant turn ("<|im_start|>assistant\n"), or "" when there is none
    gap: str  # text between a user's content and the next assistant's content
    eot: str  # the special token that closes an assistant turn ("<|im_end|>", "</s>", ...)


def load_tokenizer(model_name_or_path: str, chat_template_path: str | None = None):
    """AutoTokenizer, fast only (we need offsets), with an optional chat template override."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if not tokenizer.is_fast:
        raise MaskingError(f"{model_name_or_path}: a fast tokenizer (tokenizer.json) is needed for offsets")
    if chat_template_path is not None:
        with open(chat_template_path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not tokenizer.chat_template:
        raise MaskingError(f"{model_name_or_path}: the tokenizer has no chat template; pass --chat-template")
    return tokenizer


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def wrap_contents(messages: list[dict]) -> list[dict]:
    """Copies of the messages with each non-blank string content wrapped in its index's markers.

    Leading and trailing whitespace stays outside the markers so that templates which `trim`
    (Mistral, Gemma, Llama 3) render the same text as without markers.
    """
    wrapped = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and content.strip():
            core = content.strip()
            start = content.index(core)
            content = f"{content[:start]}\ue000{i}\ue001{core}\ue002{i}\ue003{content[start + len(core) :]}"
            message = {**message, "content": content}
        wrapped.append(message)
    return wrapped


def locate_markers(marked: str) -> tuple[str, dict[int, list[int]], dict[int, list[int]]]:
    """Removes the markers; returns the clean text and, per message, where its START/END markers were in it."""
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    pieces = []
    last = 0
    removed = 0
    for match in MARKER_RE.finditer(marked):
        pieces.append(marked[last : match.start()])
        position = match.start() - removed
        if match.group(1) is not None:
            starts.setdefault(int(match.group(1)), []).append(position)
        else:
            ends.setdefault(int(match.group(2)), []).append(position)
        removed += match.end() - match.start()
        last = match.end()
    pieces.append(marked[last:])
    clean = "".join(pieces)
    if MARKER_CHARS_RE.search(clean):
        raise MaskingError("the chat template splits message content; cannot mask reliably")
    return clean, starts, ends


def render_with_markers(tokenizer, messages: list[dict], tools: list | None = None):
    """Renders plainly and with markers; checks both agree. Returns (text, starts, ends)."""
    text = render(tokenizer, messages, tools)
    clean, starts, ends = locate_markers(render(tokenizer, wrap_contents(messages), tools))
    if clean != text:
        raise MaskingError("the chat template transforms message content; cannot mask reliably")
    return text, starts, ends


def special_token_strings(tokenizer) -> list[str]:
    """Every added token marked special (eos, <|im_end|>, <end_of_turn>, ...)."""
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens.update(tokenizer.all_special_tokens)
    return sorted(t for t in tokens if t)


def probe_template(tokenizer) -> TemplateInfo:
    """Learns the assistant header and end-of-turn token from a tiny [user, assistant, user] render.

    header = the longest prefix of the generation prompt that also ends the user->assistant gap (it
    excludes what a generation prompt adds beyond the header, like DeepSeek's "<think>\\n").
    eot = the first special token after the assistant's content.
    """
    probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    try:
        text, starts, ends = render_with_markers(tokenizer, probe)
    except MaskingError:
        raise
    except Exception as e:
        raise MaskingError(f"the chat template fails on a plain user/assistant/user chat: {e}") from None
    if not all(k in d for d in (starts, ends) for k in (0, 1, 2)):
        raise MaskingError("the chat template drops message content in a user/assistant/user chat")
    gap = text[ends[0][0] : starts[1][0]]
    after = text[ends[1][0] : starts[2][0]]

    user_only = probe[:1]
    without = render(tokenizer, user_only)
    with_prompt = render(tokenizer, user_only, add_generation_prompt=True)
    common = os.path.commonprefix([without, with_prompt])
    generation_prompt = with_prompt[len(common) :]
    header = ""
    for n in range(len(generation_prompt), 0, -1):
        if gap.endswith(generation_prompt[:n]):
            header = generation_prompt[:n]
            break

    specials = special_token_strings(tokenizer)
    # The common-prefix cut may fall inside a special token (Phi-3: "<|endoftext|>" vs "<|assistant|>"): widen it.
    header_at = len(gap) - len(header)
    for token in specials:
        at = gap.find(token)
        while at >= 0:
            if at < header_at < at + len(token):
                header, header_at = gap[at:], at
            at = gap.find(token, at + 1)

    found = [(after.find(t), t) for t in specials if t in after]
    if not found:
        raise MaskingError(f"no special end-of-turn token after an assistant turn (found {after!r}); cannot mask")
    eot = min(found, key=lambda x: (x[0], -len(x[1])))[1]
    if not header and not gap.strip():
        raise MaskingError("the chat template has no visible text before an assistant turn; cannot mask reliably")
    return TemplateInfo(header=header, gap=gap, eot=eot)


def assistant_spans(messages: list[dict], text: str, starts: dict, ends: dict, info: TemplateInfo) -> list[tuple]:
    """Character spans (start, end) in `text` of each assistant turn's body, end-of-turn token included."""
    all_markers = [(p, j) for d in (starts, ends) for j, ps in d.items() for p in ps]
    spans = []
    cursor = 0  # everything before it belongs to earlier messages
    for i, message in enumerate(messages):
        role = message["role"]
        if role != "assistant":
            # System prompts may be moved (Mistral folds it into the last user turn), so they don't move the cursor.
            if role != "system" and i in ends and ends[i][0] > cursor:
                cursor = ends[i][-1]
            continue
        start_i = starts.get(i, [None])
        end_i = ends.get(i, [None])
        if len(start_i) > 1 or len(end_i) > 1:
            raise MaskingError(f"message {i}: the template renders this assistant content twice; cannot mask reliably")
        start_i, end_i = start_i[0], end_i[0]
        at = text.find(info.header, cursor) if info.header else -1
        if at >= 0 and (start_i is None or at + len(info.header) <= start_i):
            body_start = at + len(info.header)
        elif info.header and start_i is None:
            raise MaskingError(f"message {i}: assistant header {info.header!r} not found; cannot mask reliably")
        elif start_i is not None:  # no header here (DeepSeek after a tool result): the content starts the body
            body_start = start_i
        else:
            anchor = info.gap.strip()
            at = text.find(anchor, cursor)
            if at < 0:
                raise MaskingError(f"message {i}: {anchor!r} before the assistant turn not found; cannot mask reliably")
            body_start = at + len(anchor)
        eot_from = max(body_start, end_i if end_i is not None else body_start)
        at = text.find(info.eot, eot_from)
        if at < 0:
            raise MaskingError(f"message {i}: end of turn {info.eot!r} not found; cannot mask reliably")
        body_end = at + len(info.eot)
        in_order = (start_i is None or body_start <= start_i) and (
            end_i is None or (body_start <= end_i < body_end and (start_i is None or start_i <= end_i))
        )
        foreign = [j for p, j in all_markers if j != i and body_start < p < body_end]
        if not in_order or foreign:
            raise MaskingError(f"message {i}: assistant turn not where expected in the rendered chat; cannot mask")
        spans.append((body_start, body_end))
        cursor = body_end
    return spans


def validate_messages(record: dict) -> list[dict]:
    """Returns the messages of a record, or raises ValueError with the reason they are unusable."""
    messages = record.get("messages")
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
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and content in (None, ""):
            continue
        if "content" not in message:
            raise ValueError(f"message {i} ({role}) has no 'content'")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has non-string content ({type(content).__name__})")
        if MARKER_CHARS_RE.search(content):
            raise ValueError(f"message {i} contains private-use characters U+E000..U+E003, which are reserved")
    if any(m["role"] == "pretrain" for m in messages) and len(messages) > 1:
        raise ValueError("a 'pretrain' message must be the only message of its sample")
    return messages


def tokenize_sample(tokenizer, info: TemplateInfo, record: dict) -> tuple[list[int], list[int]]:
    """input_ids and labels of one record; ValueError (bad input) or MaskingError (template) otherwise."""
    messages = validate_messages(record)
    if messages[0]["role"] == "pretrain":
        input_ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is None:
            raise MaskingError("the tokenizer has no eos token to end a pretrain sample")
        input_ids = input_ids + [tokenizer.eos_token_id]
        return input_ids, list(input_ids)
    tools = record.get("tools")
    try:
        text, starts, ends = render_with_markers(tokenizer, messages, tools)
    except MaskingError:
        raise
    except Exception as e:  # the template's own raise_exception, or a Jinja error on odd input
        raise ValueError(f"chat template error: {e}") from None
    spans = assistant_spans(messages, text, starts, ends, info)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    k = 0
    for t, (s, e) in enumerate(encoding["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        span_start, span_end = spans[k]
        if s < span_end and (e > span_start or (s == e and s >= span_start)):
            labels[t] = input_ids[t]
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------

_worker: dict = {}


def init_worker(model_name_or_path: str, chat_template_path: str | None, max_tokens: int | None, path: str) -> None:
    """Pool initializer: loads the tokenizer and probes its template once per process."""
    tokenizer = load_tokenizer(model_name_or_path, chat_template_path)
    _worker.update(tokenizer=tokenizer, info=probe_template(tokenizer), max_tokens=max_tokens, path=path)


def process_chunk(chunk: list[tuple[int, str]]) -> list[tuple]:
    """Per line: ("kept", line, json, len, trained) | ("dropped", line, reason) | ("invalid", line, reason)."""
    tokenizer, info, max_tokens, path = _worker["tokenizer"], _worker["info"], _worker["max_tokens"], _worker["path"]
    results = []
    for line_number, line in chunk:
        try:
            record = parse_json_line(path, line_number, line)
            input_ids, labels = tokenize_sample(tokenizer, info, record)
        except InputError as e:
            results.append(("invalid", line_number, e.reason))
            continue
        except ValueError as e:  # includes MaskingError
            results.append(("invalid", line_number, str(e)))
            continue
        num_loss = sum(label != IGNORE_INDEX for label in labels)
        if num_loss == 0:
            results.append(("dropped", line_number, "no trainable token"))
        elif max_tokens is not None and len(input_ids) > max_tokens:
            results.append(("dropped", line_number, f"longer than --max-sample-num-tokens={max_tokens}"))
        else:
            record.update(input_ids=input_ids, labels=labels, len=len(input_ids), num_loss_counted_tokens=num_loss)
            results.append(("kept", line_number, json.dumps(record, ensure_ascii=False), len(input_ids), num_loss))
    return results


def chunked(lines: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk = []
    for item in lines:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.isfile(args.input_file):
        fail(f"{args.input_file}: no such file")
    try:
        tokenizer = load_tokenizer(args.model_name_or_path, args.chat_template)
        info = probe_template(tokenizer)
    except (MaskingError, OSError) as e:
        fail(str(e))
    print0(f"chat template: assistant header {info.header!r}, end of turn {info.eot!r}")

    from tqdm import tqdm

    with open(args.input_file, "rb") as f:
        total_lines = sum(1 for line in f if line.strip())
    rng = random.Random(args.seed)
    examples: list[tuple[int, str]] = []  # (line number, output line): a seeded reservoir sample of kept samples
    lengths: list[int] = []
    dropped: Counter = Counter()
    invalid: list[tuple[int, str]] = []
    num_read = trained_tokens = 0
    init_args = (args.model_name_or_path, args.chat_template, args.max_sample_num_tokens, args.input_file)
    chunks = chunked(iter_jsonl_lines(args.input_file), CHUNK_SIZE)
    start_time = time.perf_counter()
    pool = Pool(args.num_proc, initializer=init_worker, initargs=init_args) if args.num_proc > 1 else None
    if pool is None:
        init_worker(*init_args)
    try:
        results = pool.imap(process_chunk, chunks) if pool else map(process_chunk, chunks)
        with atomic_write(args.output_file) as out, tqdm(total=total_lines, unit="sample", file=sys.stderr) as bar:
            for chunk_results in results:
                for result in chunk_results:
                    kind, line_number = result[0], result[1]
                    num_read += 1
                    if kind == "invalid":
                        if not args.skip_invalid:
                            raise InputError(args.input_file, line_number, result[2])
                        invalid.append((line_number, result[2]))
                    elif kind == "dropped":
                        dropped[result[2]] += 1
                    else:
                        _, _, line, length, num_loss = result
                        out.write(line + "\n")
                        lengths.append(length)
                        trained_tokens += num_loss
                        if len(examples) < args.num_examples_to_print:
                            examples.append((line_number, line))
                        elif args.num_examples_to_print > 0:
                            j = rng.randrange(len(lengths))
                            if j < args.num_examples_to_print:
                                examples[j] = (line_number, line)
                bar.update(len(chunk_results))
    except InputError as e:
        fail(f"{e} (use --skip-invalid to skip bad lines)")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = time.perf_counter() - start_time

    color = sys.stdout.isatty()
    for line_number, line in sorted(examples):
        sample = json.loads(line)
        input_ids, labels = sample["input_ids"], sample["labels"]
        print0(f"\n=== example: line {line_number} ({len(input_ids)} tokens; trained spans in [[ ]]) ===")
        print0(format_example(tokenizer, input_ids, labels, color))
    if invalid:
        print0(f"\nskipped {len(invalid)} invalid line(s):")
        for line_number, reason in invalid:
            print0(f"  {args.input_file}:{line_number}: {reason}")
    lengths.sort()
    print0("\n=== summary ===")
    print0(f"samples read:    {num_read}")
    print0(f"samples kept:    {len(lengths)}")
    print0(f"invalid skipped: {len(invalid)}")
    for reason, count in sorted(dropped.items()):
        print0(f"dropped ({reason}): {count}")
    print0(f"tokens: {sum(lengths)} total, {trained_tokens} trained")
    print0(
        f"length: p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
        f"p99 {percentile(lengths, 99)}, max {lengths[-1] if lengths else 0}"
    )
    print0(f"wrote {args.output_file} in {elapsed:.1f}s ({num_read / max(elapsed, 1e-9):.0f} samples/s)")


if __name__ == "__main__":
    main()
