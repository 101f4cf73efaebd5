"""Times process_data.py on a generated chat set, against the floor of a bare apply_chat_template per sample.

    python bench/bench_process_data.py --tokenizer $MINI_TRAINER_TOKENIZERS/qwen2.5-instruct --num-samples 20000

The data set is deterministic: multi-turn chats (1 to 4 turns, some with a system prompt) of random English-like
words, about 600 tokens median with the Qwen2.5 tokenizer.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can has been if more when will would who so no model data train "
    "token answer question because people time world example system value number function result first new"
).split()


def make_chats(path: Path, num_samples: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(mean_words: int) -> str:
        n = max(3, int(rng.expovariate(1 / mean_words)))
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_samples):
            messages = [{"role": "system", "content": text(30)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 4)):
                messages += [{"role": "user", "content": text(60)}, {"role": "assistant", "content": text(140)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def floor(tokenizer_path: str, input_file: Path) -> float:
    """Seconds for one process to run apply_chat_template (tokenized) on every sample: what no masking can beat."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    lines = input_file.read_text().splitlines()
    start = time.perf_counter()
    for line in lines:
        tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tokenizer = os.path.join(os.environ.get("MINI_TRAINER_TOKENIZERS", ""), "qwen2.5-instruct")
    parser.add_argument("--tokenizer", default=default_tokenizer, help="Tokenizer folder (default: Qwen2.5's).")
    parser.add_argument("--num-samples", type=int, default=20000, help="Chats to generate.")
    parser.add_argument("--num-procs", default="1,2", help="Comma-separated --num-proc values to time.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        input_file, output_file = Path(tmp) / "chats.jsonl", Path(tmp) / "out.jsonl"
        make_chats(input_file, args.num_samples)
        seconds = floor(args.tokenizer, input_file)
        print(f"floor (bare apply_chat_template, 1 process): {args.num_samples / seconds:.0f} samples/s")
        for num_proc in args.num_procs.split(","):
            command = [sys.executable, str(REPO_ROOT / "process_data.py"), "--input-file", str(input_file)]
            command += ["--output-file", str(output_file), "--model-name-or-path", args.tokenizer]
            command += ["--num-proc", num_proc, "--num-examples-to-print", "0"]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds = time.perf_counter() - start  # whole run, interpreter start and tokenizer loads included
            num_tokens = sum(json.loads(line)["len"] for line in output_file.open())
            print(
                f"process_data --num-proc {num_proc}: {args.num_samples / seconds:.0f} samples/s, "
                f"{num_tokens / seconds:.0f} tokens/s ({seconds:.1f}s, "
                f"{num_tokens / args.num_samples:.0f} tokens/sample)"
            )


if __name__ == "__main__":
    main()
