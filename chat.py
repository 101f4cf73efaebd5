"""Chats with a checkpoint through its own chat template: interactive and multi-turn (the history is kept), or one
answer with --prompt. Greedy unless --temperature is above 0.

    python chat.py demo_output/run        # a run's output dir: its newest checkpoint, hf_format/samples_<N>
    python chat.py demo_output/run/hf_format/samples_96 --prompt "What is the capital of France?"
"""

import argparse
import re
import sys
from pathlib import Path

from utils import fail

CHECKPOINT_NAME = re.compile(r"samples_(\d+)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest checkpoint of a run's output dir (the largest N of
    hf_format/samples_<N>; the temporary folders of a save in progress start with a dot and never match)."""
    path = Path(path)
    if not path.is_dir():
        fail(f"{path} does not exist or is not a folder")
    if (path / "config.json").is_file():
        return path
    numbered = [(int(match[1]), child) for child in (path / "hf_format").glob("samples_*")
                if (match := CHECKPOINT_NAME.fullmatch(child.name)) and (child / "config.json").is_file()]
    if not numbered:
        fail(f"{path} is neither a checkpoint (no config.json) nor a run's output dir (no hf_format/samples_<N>)")
    return max(numbered)[1]


def load_checkpoint(path: Path):
    """Model and tokenizer, on the GPU when there is one (in the checkpoint's dtype), else on CPU in fp32, where
    bf16 matmuls are slow and train.py computes in fp32 too."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars would interleave with the chat
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        fail(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0) -> str:
    """The assistant's next message after `messages`, rendered with the tokenizer's chat template."""
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    # Greedy or sampled is our flags' choice, whatever the checkpoint's generation_config says; top_k=0 turns off
    # its top-k (or transformers' default of 50), so that --top-p alone filters what is sampled.
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
        do_sample=False)
    pad_token_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **settings)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_loop(model, tokenizer, messages: list[dict], **settings) -> None:
    """Reads user turns from stdin until EOF (Ctrl-D) or /exit; each answer sees the whole conversation."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if not line.strip():
            continue
        if not interactive:
            print(f"you> {line}")
        messages.append({"role": "user", "content": line})
        reply = generate_reply(model, tokenizer, messages, **settings)
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A checkpoint folder, or a run's --output-dir (its newest checkpoint).")
    parser.add_argument("--prompt", help="Answer this one message and exit, printing only the answer.")
    parser.add_argument("--system", help="A system message that opens the conversation.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Longest answer, in tokens.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (with --temperature above 0).")
    parser.add_argument("--seed", type=int, help="Makes sampling reproducible.")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        fail("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")

    path = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_checkpoint(path)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(generate_reply(model, tokenizer, [*messages, {"role": "user", "content": args.prompt}], **settings))
    else:
        print(f"Chatting with {path}; Ctrl-D or /exit to quit.", flush=True)
        try:
            chat_loop(model, tokenizer, messages, **settings)
        except KeyboardInterrupt:
            print()


if __name__ == "__main__":
    main()
