"""TRL's own SFT dataset preparation, timed on a chat JSONL; run by bench_process_data.py --peer trl.

Runs under a python that has trl (not a project dependency):

    /tmp/trl-venv/bin/python bench/peer_trl.py --input-file chats.jsonl --tokenizer DIR --num-proc 2

What is timed: `datasets.load_dataset("json")` of the file, then `SFTTrainer._prepare_dataset` as the trainer's own
constructor calls it, with `SFTConfig(assistant_only_loss=True, packing=False, max_length=None,
dataset_num_proc=N)`: render + tokenize + assistant masks, then labels. TRL swaps in its bundled `{% generation %}`
training template when it recognizes the tokenizer's template; when it does not (the shared Qwen2.5 tokenizer's
template differs from TRL's copy in the tools preamble only), the bundled training template that renders the
first 200 chats to exactly the same text is set as the tokenizer's template first, and its name is reported.
The trainer wraps a tiny random Qwen2 model (no download); its construction outside `_prepare_dataset` is not
counted, nor are imports. Caches go to a fresh temporary folder, so nothing is reused between runs. Prints one
JSON line.
"""

import argparse
import json
import os
import tempfile
import time


def trl_training_template(tokenizer, input_file: str, num_chats: int = 200) -> str:
    """Which template TRL will mask with; sets a matching bundled training template if TRL can't patch this one."""
    from pathlib import Path

    import trl
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return "the tokenizer's own (has generation markers)"
    try:
        get_training_chat_template(tokenizer)
        return "TRL's patch of the tokenizer's template"
    except ValueError:
        pass
    with open(input_file, encoding="utf-8") as f:
        chats = [json.loads(line)["messages"] for line, _ in zip(f, range(num_chats), strict=False)]
    expected = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    for path in sorted((Path(trl.__file__).parent / "chat_templates").glob("*_training.jinja")):
        candidate = path.read_text()
        try:
            rendered = [tokenizer.apply_chat_template(c, tokenize=False, chat_template=candidate) for c in chats]
        except Exception:
            continue
        if rendered == expected:
            tokenizer.chat_template = candidate
            return f"TRL's {path.name} (renders the first {len(chats)} chats identically)"
    raise SystemExit("TRL has no training template for this tokenizer's chat template")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-file", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--output-file", default=None, help="Write input_ids and labels here (JSONL, not timed).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_DATASETS_CACHE"] = cache
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import datasets
        import trl
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
        from trl import SFTConfig, SFTTrainer

        datasets.disable_progress_bars()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
        sft_args = SFTConfig(
            output_dir=os.path.join(cache, "out"), assistant_only_loss=True, packing=False, max_length=None,
            dataset_num_proc=args.num_proc if args.num_proc > 1 else None, report_to=[], save_strategy="no",
            bf16=False, use_cpu=True,
        )  # fmt: skip

        template = trl_training_template(tokenizer, args.input_file)

        seconds = {}
        prepare = SFTTrainer._prepare_dataset

        def timed_prepare(self, *a, **kw):
            start = time.perf_counter()
            out = prepare(self, *a, **kw)
            seconds["prepare"] = time.perf_counter() - start
            return out

        SFTTrainer._prepare_dataset = timed_prepare
        start = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=args.input_file, split="train", cache_dir=cache)
        seconds["load"] = time.perf_counter() - start
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer)
        prepared = trainer.train_dataset
        input_ids, labels = prepared["input_ids"], prepared["labels"]
        if args.output_file:
            with open(args.output_file, "w") as f:
                for ids, lab in zip(input_ids, labels, strict=True):
                    f.write(json.dumps({"input_ids": ids, "labels": lab}) + "\n")
        print(
            json.dumps(
                {
                    "seconds": seconds["load"] + seconds["prepare"],
                    "load_seconds": seconds["load"],
                    "prepare_seconds": seconds["prepare"],
                    "num_samples": len(prepared),
                    "num_tokens": sum(len(ids) for ids in input_ids),
                    "num_trained_tokens": sum(sum(label != -100 for label in lab) for lab in labels),
                    "trl": trl.__version__,
                    "template": template,
                    "columns": prepared.column_names,
                }
            )
        )


if __name__ == "__main__":
    main()
