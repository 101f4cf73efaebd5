"""Times process_data.py on a generated chat set, against the floor of a bare apply_chat_template per sample.

    python bench/bench_process_data.py --tokenizer $MINI_TRAINER_TOKENIZERS/qwen2.5-instruct --num-samples 20000

With `--peer trl --peer-python /tmp/trl-venv/bin/python`, TRL's own SFT dataset preparation (bench/peer_trl.py,
run under that python since TRL is not a project dependency) is timed on the same file in the same run, for the
same --num-procs. With `--baseline ../main/process_data.py`, another checkout's process_data.py is timed the same
way, interleaved, and its output compared byte for byte. With --repeats N, each measurement is taken N times
(interleaved) and the median is reported.

Timings: process_data is the whole run (interpreter start, imports, tokenizer loads, reading, writing); TRL is
`load_dataset("json")` + `SFTTrainer._prepare_dataset` only (its imports and model construction are not counted);
the floor is the loop alone. Besides wall time, the CPU time of the floor and of each process_data run (user + system,
all its processes) is reported: on a machine shared with other work, wall time measures the others too.

The data set is deterministic: multi-turn chats (1 to 4 turns, some with a system prompt) of random English-like
words, about 600 tokens median with the Qwen2.5 tokenizer.
"""

import argparse
import json
import os
import random
import resource
import statistics
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


def floor(tokenizer_path: str, input_file: Path) -> tuple[float, float]:
    """Seconds (wall, CPU) for one process to run apply_chat_template (tokenized) on every sample: what no masking
    can beat."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    lines = input_file.read_text().splitlines()
    start, start_cpu = time.perf_counter(), time.process_time()
    for line in lines:
        tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=False)
    return time.perf_counter() - start, time.process_time() - start_cpu


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_process_data(
    tokenizer: str, input_file: Path, output_file: Path, num_proc: str, script: Path
) -> tuple[float, float]:
    """Seconds (wall, CPU of all its processes) of a whole run: interpreter start and tokenizer loads included."""
    command = [sys.executable, str(script), "--input-file", str(input_file)]
    command += ["--output-file", str(output_file), "--model-name-or-path", tokenizer]
    command += ["--num-proc", num_proc, "--num-examples-to-print", "0"]
    start, start_cpu = time.perf_counter(), children_cpu_seconds()
    subprocess.run(command, check=True, capture_output=True, cwd=script.parent)
    return time.perf_counter() - start, children_cpu_seconds() - start_cpu


def run_trl(python: str, tokenizer: str, input_file: Path, output_file: Path, num_proc: str) -> dict:
    command = [python, str(REPO_ROOT / "bench" / "peer_trl.py"), "--input-file", str(input_file)]
    command += ["--tokenizer", tokenizer, "--num-proc", num_proc, "--output-file", str(output_file)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(ours: Path, theirs: Path) -> str:
    """How TRL's input_ids and labels compare with process_data's, sample by sample."""
    same_ids = same_labels = total = 0
    for a, b in zip(ours.open(), theirs.open(), strict=True):
        a, b = json.loads(a), json.loads(b)
        total += 1
        same_ids += a["input_ids"] == b["input_ids"]
        same_labels += a["labels"] == b["labels"]
    return f"input_ids identical in {same_ids}/{total} samples, labels identical in {same_labels}/{total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tokenizer = os.path.join(os.environ.get("MINI_TRAINER_TOKENIZERS", ""), "qwen2.5-instruct")
    parser.add_argument("--tokenizer", default=default_tokenizer, help="Tokenizer folder (default: Qwen2.5's).")
    parser.add_argument("--num-samples", type=int, default=20000, help="Chats to generate.")
    parser.add_argument("--num-procs", default="1,2", help="Comma-separated --num-proc values to time.")
    parser.add_argument("--peer", choices=["trl"], default=None, help="Also time a peer's dataset preparation.")
    parser.add_argument("--peer-python", default=sys.executable, help="Python that has the peer installed.")
    parser.add_argument("--baseline", type=Path, default=None, help="Another process_data.py to time, e.g. main's.")
    parser.add_argument("--repeats", type=int, default=1, help="Times to take each measurement; medians reported.")
    args = parser.parse_args()

    num_procs = args.num_procs.split(",")
    ours = REPO_ROOT / "process_data.py"
    with tempfile.TemporaryDirectory() as tmp:
        input_file, output_file = Path(tmp) / "chats.jsonl", Path(tmp) / "out.jsonl"
        peer_file, baseline_file = Path(tmp) / "peer.jsonl", Path(tmp) / "baseline.jsonl"
        make_chats(input_file, args.num_samples)
        times: dict[str, list[float]] = {}
        cpu_times: dict[str, list[float]] = {}

        def record(key: str, seconds: tuple[float, float]) -> None:
            times.setdefault(key, []).append(seconds[0])
            cpu_times.setdefault(key, []).append(seconds[1])

        peer_info: dict = {}
        for repeat in range(args.repeats):
            record("floor", floor(args.tokenizer, input_file))
            for num_proc in num_procs:
                if args.baseline:
                    record(f"base{num_proc}", run_process_data(args.tokenizer, input_file, baseline_file, num_proc,
                                                               args.baseline))  # fmt: skip
                record(f"pd{num_proc}", run_process_data(args.tokenizer, input_file, output_file, num_proc, ours))
                if args.baseline and baseline_file.read_bytes() != output_file.read_bytes():
                    print(f"num_proc {num_proc}: output differs from the baseline's", flush=True)
                if args.peer == "trl":
                    peer_info = run_trl(args.peer_python, args.tokenizer, input_file, peer_file, num_proc)
                    times.setdefault(f"trl{num_proc}", []).append(peer_info["seconds"])
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)

        num_tokens = sum(json.loads(line)["len"] for line in output_file.open())
        rate = {k: args.num_samples / statistics.median(v) for k, v in times.items()}
        cpu_rate = {k: args.num_samples / statistics.median(v) for k, v in cpu_times.items()}
        per_sample = num_tokens / args.num_samples
        print(f"\n{args.num_samples} chats, {per_sample:.0f} tokens/sample, medians of {args.repeats} run(s)")
        print(f"floor (bare apply_chat_template, 1 process): {rate['floor']:.0f} samples/s "
              f"({cpu_rate['floor']:.0f} per CPU second)")  # fmt: skip
        for num_proc in num_procs:
            names = (f"base{num_proc}", "baseline"), (f"pd{num_proc}", "process_data"), (f"trl{num_proc}", "TRL prep")
            for key, name in names:
                if key in rate:
                    cpu = (
                        f"; {cpu_rate[key]:.0f} per CPU second, {cpu_rate[key] / cpu_rate['floor']:.2f}x"
                        if key in cpu_rate
                        else ""
                    )
                    print(
                        f"{name} num_proc {num_proc}: {rate[key]:.0f} samples/s, "
                        f"{rate[key] * per_sample:.0f} tokens/s, "
                        f"{rate[key] / rate['floor']:.2f}x the floor{cpu}"
                    )
            if f"trl{num_proc}" in rate:
                ratio = rate[f"pd{num_proc}"] / rate[f"trl{num_proc}"]
                print(f"  process_data / TRL at num_proc {num_proc}: {ratio:.2f}x")
        if args.peer == "trl":
            print(f"TRL {peer_info['trl']}, masks from {peer_info['template']}")
            print(f"TRL vs process_data (last run): {compare(output_file, peer_file)}")


if __name__ == "__main__":
    main()
