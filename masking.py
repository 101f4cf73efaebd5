"""Which tokens of a rendered chat are trained, found without `{% generation %}` markers.

The chat template is rendered with each message's content, and each assistant's reasoning, wrapped in private-use
unicode markers. Removing them gives the plain text and tells where every message landed; a field whose markers
are missing was left out by the template. A one-off probe of the template tells what an assistant header and an
end-of-turn token look like, whether the template adds a default system prompt, and whether it renders reasoning
at all. Tokens inside an assistant turn's body (after its header, through its end-of-turn token) are trained, and
with `unmask` also the contents of user and tool messages; everything else is -100. Anything unexpected is an
error, never a silently wrong label. That the markers change nothing else is checked by rendering the chat a second
time without them (process_data does it for a sample of chats: see process_chunk).
"""

import os
import re
from dataclasses import dataclass

IGNORE_INDEX = -100
# Names an assistant's reasoning may come under, in the order transformers' apply_chat_template picks one; it passes
# that one to the template as both `reasoning_content` (Qwen3 and most templates) and `thinking` (gpt-oss).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
UNMASKED_ROLES = ("user", "tool")  # what `unmask` adds to the trained text: contents only, never headers


class MaskingError(ValueError):
    """The chat template does something we cannot locate message contents in reliably."""


class RenderMismatch(MaskingError):
    """The template renders a chat differently once its contents carry markers."""


class ChatTemplateError(ValueError):
    """The chat template itself failed on a chat (its own raise_exception, or a Jinja error on odd input)."""


# Private-use code points: \ue000 c3 \ue001 opens message 3's content and \ue002 c3 \ue003 closes it; "r" instead of
# "c" marks its reasoning. Input text may not contain them (see chat_input.validate_messages).
MARKER_CHARS_RE = re.compile("[\ue000-\ue003]")
MARKER_RE = re.compile("\ue000([cr])(\\d+)\ue001|\ue002([cr])(\\d+)\ue003")
FIELD_OF_CODE = {"c": "content", "r": "reasoning"}
Marks = dict[tuple[int, str], list[int]]  # (message index, "content" | "reasoning") -> positions in the plain text
Spans = list[tuple[int, int]]  # (start, end) character spans of the plain text, in order


@dataclass
class TemplateInfo:
    """What a probe of the chat template found: see probe_template."""

    header: str  # text that opens an assistant turn ("<|im_start|>assistant\n"), or "" when there is none
    gap: str  # text between a user's content and the next assistant's content
    eot: str  # the special token that closes an assistant turn ("<|im_end|>", "</s>", ...)
    default_system: str = ""  # the system prompt it adds to a chat that has none ("You are Qwen, ..."), or ""
    renders_reasoning: bool = False  # whether it renders an assistant's reasoning field, at least on the last turn
    tests_text: bool = False  # whether it tests how a text starts or ends (see probe_template)


def has_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def wrap(text: str, code: str, index: int) -> str:
    """`text` with its non-blank core between the markers of (code, index).

    Leading and trailing whitespace stays outside the markers so that templates which trim (Mistral, Gemma,
    Llama 3, Qwen3's reasoning) render the same text as without markers.
    """
    core = text.strip()
    start = text.index(core)
    return f"{text[:start]}\ue000{code}{index}\ue001{core}\ue002{code}{index}\ue003{text[start + len(core) :]}"


def wrap_fields(messages: list[dict]) -> list[dict]:
    """Copies of the messages with each non-blank content and reasoning field wrapped in its index's markers."""
    wrapped = []
    for i, message in enumerate(messages):
        changes = {"content": wrap(message["content"], "c", i)} if has_text(message.get("content")) else {}
        changes.update({f: wrap(message[f], "r", i) for f in REASONING_FIELDS if has_text(message.get(f))})
        wrapped.append({**message, **changes} if changes else message)
    return wrapped


def locate_markers(marked: str) -> tuple[str, Marks, Marks]:
    """Removes the markers; returns the plain text and, per wrapped field, where its START/END markers were in it."""
    starts: Marks = {}
    ends: Marks = {}
    parts = MARKER_RE.split(marked)  # text, then per marker its 4 groups and the text after it
    position = len(parts[0])
    for k in range(1, len(parts), 5):
        start_code, start_index, end_code, end_index, text_after = parts[k : k + 5]
        if start_code is not None:
            starts.setdefault((int(start_index), FIELD_OF_CODE[start_code]), []).append(position)
        else:
            ends.setdefault((int(end_index), FIELD_OF_CODE[end_code]), []).append(position)
        position += len(text_after)
    clean = "".join(parts[::5])
    if MARKER_CHARS_RE.search(clean):
        raise MaskingError("the chat template splits message content; cannot mask reliably")
    return clean, starts, ends


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:
        raise ChatTemplateError(f"chat template error: {e}") from None


def render_with_markers(
    tokenizer, messages: list[dict], tools: list | None = None, check: bool = True
) -> tuple[str, Marks, Marks]:
    """Renders with markers; returns (plain text, starts, ends). With `check`, also renders plainly and raises
    RenderMismatch unless both agree (a template that transforms or branches on content)."""
    text, starts, ends = locate_markers(render(tokenizer, wrap_fields(messages), tools))
    if check and text != render(tokenizer, messages, tools):
        raise RenderMismatch("the chat template transforms message content; cannot mask reliably")
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
    except ChatTemplateError as e:
        raise MaskingError(f"the chat template fails on a plain user/assistant/user chat ({e})") from None
    if not all((k, "content") in d for d in (starts, ends) for k in (0, 1, 2)):
        raise MaskingError("the chat template drops content in a user/assistant/user chat; cannot mask reliably")
    gap = text[ends[0, "content"][0] : starts[1, "content"][0]]
    after = text[ends[1, "content"][0] : starts[2, "content"][0]]

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
    return TemplateInfo(
        header=header,
        gap=gap,
        eot=eot,
        default_system=probe_default_system(tokenizer),
        renders_reasoning=probe_renders_reasoning(tokenizer),
        # A marker changes what startswith/endswith answer, so such a template (Qwen3 tells tool responses from
        # queries that way) may render a marked chat differently on some chats only: check every one.
        tests_text=bool(re.search(r"\b(startswith|endswith)\b", str(tokenizer.chat_template))),
    )


def probe_default_system(tokenizer) -> str:
    """The system prompt the template adds to a chat without one: what stands, in [user] rendered alone, where a
    system message's content stands in [system, user]. "" when it adds none."""
    user = {"role": "user", "content": "U"}
    try:
        text, starts, ends = render_with_markers(tokenizer, [{"role": "system", "content": "S"}, user])
        without = render(tokenizer, [user])
    except (ChatTemplateError, MaskingError):  # a template without a system role (Gemma 2) adds none either
        return ""
    if (0, "content") not in starts or (0, "content") not in ends:
        return ""
    before, after = text[: starts[0, "content"][0]], text[ends[0, "content"][-1] :]
    if len(without) > len(before) + len(after) and without.startswith(before) and without.endswith(after):
        return without[len(before) : len(without) - len(after)]
    return ""


def probe_renders_reasoning(tokenizer) -> bool:
    """Whether the template renders the reasoning of a chat's last assistant turn (Qwen3 does; DeepSeek-R1's and
    templates without reasoning support do not)."""
    chat = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}]
    try:
        _, starts, _ = render_with_markers(tokenizer, chat)
    except (ChatTemplateError, MaskingError):
        return False
    return (1, "reasoning") in starts


def trained_spans(
    messages: list[dict], text: str, starts: Marks, ends: Marks, info: TemplateInfo, unmask: bool = False
) -> Spans:
    """Character spans (start, end) of `text` to train, in order: each assistant turn's body, end-of-turn token
    included, and with `unmask` the content of each user and tool message (from its first to its last non-blank
    character as rendered: no header, no end-of-turn token)."""
    all_markers = [(p, j) for d in (starts, ends) for (j, _), ps in d.items() for p in ps]
    spans = []
    cursor = 0  # everything before it belongs to earlier messages
    for i, message in enumerate(messages):
        role = message["role"]
        content_starts, content_ends = starts.get((i, "content"), []), ends.get((i, "content"), [])
        if role != "assistant":
            if unmask and role in UNMASKED_ROLES and (content_starts or content_ends):
                if len(content_starts) != 1 or len(content_ends) != 1 or content_starts[0] > content_ends[0]:
                    raise MaskingError(f"message {i}: {role} content not rendered once and whole; cannot unmask")
                spans.append((content_starts[0], content_ends[0]))
            # System prompts may be moved (Mistral folds it into the last user turn), so they don't move the cursor.
            if role != "system" and content_ends and content_ends[0] > cursor:
                cursor = content_ends[-1]
            continue
        if len(content_starts) > 1 or len(content_ends) > 1:
            raise MaskingError(f"message {i}: the template renders this assistant content twice; cannot mask reliably")
        own_starts = content_starts + starts.get((i, "reasoning"), [])
        own = own_starts + content_ends + ends.get((i, "reasoning"), [])
        first_start = min(own_starts, default=None)
        at = text.find(info.header, cursor) if info.header else -1
        if at >= 0 and (first_start is None or at + len(info.header) <= first_start):
            body_start = at + len(info.header)
        elif info.header and first_start is None:
            raise MaskingError(f"message {i}: assistant header {info.header!r} not found; cannot mask reliably")
        elif first_start is not None:  # no header here (DeepSeek after a tool result): the content starts the body
            body_start = first_start
        else:
            anchor = info.gap.strip()
            at = text.find(anchor, cursor)
            if at < 0:
                raise MaskingError(f"message {i}: {anchor!r} before the assistant turn not found; cannot mask reliably")
            body_start = at + len(anchor)
        at = text.find(info.eot, max([body_start, *own]))
        if at < 0:
            raise MaskingError(f"message {i}: end of turn {info.eot!r} not found; cannot mask reliably")
        body_end = at + len(info.eot)
        in_order = all(body_start <= p < body_end for p in own) and (
            not content_starts or not content_ends or content_starts[0] <= content_ends[0]
        )
        foreign = [j for p, j in all_markers if j != i and body_start < p < body_end]
        if not in_order or foreign:
            raise MaskingError(f"message {i}: assistant turn not where expected in the rendered chat; cannot mask")
        spans.append((body_start, body_end))
        cursor = body_end
    return sorted(spans)


def render_warnings(messages: list[dict], starts: Marks, ends: Marks, info: TemplateInfo) -> list[str]:
    """What the template did to this chat that the user should know about: each kind once."""
    warnings = set()
    for i, message in enumerate(messages):
        role = message["role"]
        a_role = f"an {role}" if role == "assistant" else f"a {role}"
        if has_text(message.get("content")):
            found = ((i, "content") in starts) + ((i, "content") in ends)
            if found == 0:
                warnings.add(f"the chat template leaves out {a_role} message")
            elif found == 1:  # Qwen3 and DeepSeek-R1 cut the <think> block off an assistant's content
                warnings.add(f"the chat template leaves out part of {a_role} message (a <think> block?)")
        if any(has_text(message.get(f)) for f in REASONING_FIELDS) and (i, "reasoning") not in starts:
            if info.renders_reasoning:
                warnings.add("the chat template leaves out the reasoning of an assistant turn (not the last one)")
            else:
                warnings.add("the chat template does not render reasoning fields")
    if info.default_system and not any(m["role"] == "system" for m in messages):
        prompt = info.default_system if len(info.default_system) <= 60 else info.default_system[:57] + "..."
        warnings.add(f"the chat template adds its default system prompt {prompt!r}")
    return sorted(warnings)


def labels_from_offsets(input_ids: list[int], offsets: list[tuple[int, int]], spans: Spans) -> list[int]:
    """The token's id where a token overlaps a trained span (an empty token counts from its position), else -100."""
    labels = [IGNORE_INDEX] * len(input_ids)
    if not spans:
        return labels
    k = 0
    span_start, span_end = spans[0]
    for t, (s, e) in enumerate(offsets):
        while span_end <= s:  # the span is behind this token: on to the next
            k += 1
            if k == len(spans):
                return labels
            span_start, span_end = spans[k]
        if e > span_start or (s == e and s >= span_start):
            labels[t] = input_ids[t]
    return labels


def chat_text_and_spans(
    tokenizer, info: TemplateInfo, messages: list[dict], tools: list | None, unmask: bool, check: bool
) -> tuple[str, Spans, list[str]]:
    """The rendered text of one validated chat, its trained character spans, and its warnings.

    ChatTemplateError when the template fails on it, MaskingError when its output cannot be located reliably
    (RenderMismatch, with `check`, when the plain render differs from the marked one)."""
    text, starts, ends = render_with_markers(tokenizer, messages, tools, check)
    spans = trained_spans(messages, text, starts, ends, info, unmask)
    return text, spans, render_warnings(messages, starts, ends, info)
