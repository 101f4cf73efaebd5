"""train.py end to end on CPU: the schedule, clear errors, checkpoints, and training that learns."""

import json

import pytest
import torch
from conftest import run_train, write_tokenized_samples
from transformers import AutoModelForCausalLM

import train
from tiny_model import save_tiny_model


def test_warmup_rises_linearly_from_zero():
    assert [train.lr_factor(s, 4, 10, "constant_with_warmup") for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_decay_reaches_zero_at_the_last_step(scheduler):
    factors = [train.lr_factor(s, 2, 12, scheduler) for s in range(12)]
    assert factors[:3] == [0, 0.5, 1.0]
    assert factors[-1] == 0.0
    assert all(a > b for a, b in zip(factors[2:-1], factors[3:], strict=False))


def test_cosine_and_linear_values():
    import math

    assert train.lr_factor(5, 0, 11, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_factor(5, 0, 11, "linear") == pytest.approx(0.5)
    assert train.lr_factor(3, 1, 6, "linear") == pytest.approx(1 - 2 / 4)


def test_defaults_are_the_dataclass_defaults():
    config = train.parse_args(["--data-path", "d", "--model-name-or-path", "m", "--output-dir", "o"])
    assert config == train.TrainConfig(data_path="d", model_name_or_path="m", output_dir="o")
    config = train.parse_args(["--data-path", "d", "--model-name-or-path", "m", "--output-dir", "o",
                               "--use-liger-kernels", "--max-steps", "3", "--dtype", "bf16"])
    assert config.use_liger_kernels and config.max_steps == 3 and config.dtype == "bf16"


def base_args(data_path, model_dir, output_dir, *extra):
    return ["--data-path", str(data_path), "--model-name-or-path", str(model_dir), "--output-dir", str(output_dir),
            "--learning-rate", "3e-3", "--num-warmup-steps", "2", "--seed", "7", *extra]


def test_two_processes_learn_and_checkpoint_reloads(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=40)
    output_dir = tmp_path / "run"
    run_train(base_args(data, tiny_model_dir, output_dir, "--batch-size", "8", "--max-tokens-per-gpu", "64",
                        "--num-epochs", "6", "--min-samples-per-checkpoint", "100", "--lr-scheduler", "cosine"),
              nproc=2)
    metrics = [json.loads(line) for line in open(output_dir / "training_metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first_epoch = sum(m["loss"] for m in metrics[:5]) / 5
    last_epoch = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last_epoch < 0.8 * first_epoch, (first_epoch, last_epoch)
    assert metrics[-1]["lr"] == 0.0
    for key in ("step", "epoch", "lr", "loss", "grad_norm", "num_samples", "num_loss_tokens", "num_tokens",
                "micro_batches", "tokens_per_second", "mfu", "peak_memory_gb", "elapsed_s"):
        assert key in metrics[0]
    # 40 samples a epoch, a checkpoint each time the samples seen pass a multiple of 100, and one at the end.
    checkpoints = sorted(p.name for p in (output_dir / "hf_format").iterdir())
    assert checkpoints == ["samples_104", "samples_208", "samples_240"]
    model = AutoModelForCausalLM.from_pretrained(output_dir / "hf_format" / "samples_240")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert (output_dir / "hf_format" / "samples_240" / "tokenizer.json").exists()
    params = json.loads((output_dir / "training_params.json").read_text())
    assert params["batch_size"] == 8 and params["world_size"] == 2


@pytest.mark.parametrize("arch", ["qwen3", "llama", "mistral", "gemma"])
def test_architectures_train_a_step(tmp_path, tiny_tokenizer, arch):
    from tiny_model import build_tiny_model

    model_dir = tmp_path / arch
    build_tiny_model(len(tiny_tokenizer), arch=arch).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=8)
    run_train(base_args(data, model_dir, tmp_path / "run", "--batch-size", "8", "--max-tokens-per-gpu", "128",
                        "--num-epochs", "2", "--activation-checkpointing"))
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "training_metrics.jsonl")]
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_format" / "samples_16")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])  # streamed save, and save_pretrained's (merged experts)
def test_checkpoint_keeps_the_original_dtype_and_generation_config(tmp_path, tiny_tokenizer, arch):
    model_dir = save_tiny_model(tmp_path / "model", arch=arch)
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    source.generation_config.update(do_sample=True, temperature=0.3, top_p=0.7, eos_token_id=[2, 0])
    source.save_pretrained(model_dir)
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=4)
    run_train(base_args(data, model_dir, tmp_path / "run", "--batch-size", "2", "--max-tokens-per-gpu", "128",
                        "--min-samples-per-checkpoint", "2"))
    from safetensors import safe_open

    for samples in (2, 4):  # the second save too: the first must not leave the training copy's dtype behind
        checkpoint = tmp_path / "run" / "hf_format" / f"samples_{samples}"
        assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
        generation_config = json.loads((checkpoint / "generation_config.json").read_text())
        assert generation_config["temperature"] == 0.3 and generation_config["eos_token_id"] == [2, 0]
        for file in checkpoint.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                assert all(f.get_tensor(name).dtype == torch.bfloat16 for name in f.keys())


def test_untokenized_input_says_run_process_data(tmp_path, tiny_model_dir):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = run_train(base_args(data, tiny_model_dir, tmp_path / "run", "--batch-size", "1"), check=False)
    assert result.returncode != 0
    assert f"{data}:1:" in result.stderr and "run process_data.py first" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_file_is_a_clear_error(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = run_train(base_args(data, tiny_model_dir, tmp_path / "run", "--batch-size", "1"), check=False)
    assert result.returncode != 0 and "no usable sample" in result.stderr and "Traceback" not in result.stderr


def test_argument_problems_are_reported_together(tmp_path, tiny_model_dir):
    result = run_train(base_args(tmp_path / "nope.jsonl", tiny_model_dir, tmp_path / "run", "--batch-size", "0",
                                 "--use-liger-kernels"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and "--batch-size must be at least 1" in result.stderr
    if not torch.cuda.is_available():
        assert "--use-liger-kernels needs a CUDA GPU" in result.stderr


def test_over_long_samples_are_dropped_and_counted(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=12)
    lengths = [json.loads(line)["len"] for line in open(data)]
    budget = sorted(lengths)[6]
    num_too_long = sum(length > budget for length in lengths)
    result = run_train(base_args(data, tiny_model_dir, tmp_path / "run", "--batch-size", "4",
                                 "--max-tokens-per-gpu", str(budget), "--max-steps", "1"))
    assert f"dropped {num_too_long} samples: longer than --max-tokens-per-gpu" in result.stdout
    result = run_train(base_args(data, tiny_model_dir, tmp_path / "run2", "--batch-size", "4",
                                 "--max-tokens-per-gpu", "2"), check=False)
    assert result.returncode != 0 and "no usable sample" in result.stderr


def test_batch_size_larger_than_dataset(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=5)
    result = run_train(base_args(data, tiny_model_dir, tmp_path / "run", "--batch-size", "6"), check=False)
    assert result.returncode != 0 and "--batch-size 6 is larger than the dataset (5 usable samples)" in result.stderr
