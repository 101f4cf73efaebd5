"""Every causal LM family the installed transformers ships trains exactly, on CPU in fp32: the trainer's summed loss
over a packed row equals the model's own per-sample losses (from its own forward, labels and attention), summed, and
so do the gradients. tests/test_gpu.py does the same on CUDA's kernels, in bf16."""

import json

import numpy as np
import pytest
import torch
from conftest import run_train, write_tokenized_samples

from data import TokenizedData, pack_micro_batch
from model import CausalLMWithSummedLoss, choose_attn_implementation, own_head_reason
from tiny_model import build_tiny_model

# The families of issue 9, with sliding windows switched on where the family has them (tiny_model.TINY_CONFIGS).
FAMILIES = ["llama", "mistral_sliding", "qwen2_sliding", "qwen3_sliding", "qwen3_moe", "mixtral", "gemma", "gemma2",
            "gemma3_text", "phi", "phi3", "cohere", "granite", "olmo2", "smollm3", "gpt_oss"]
# Heads that do more than hidden @ lm_head.weight.T (+ final softcap): a logit scale, a logit divisor, a bias.
OWN_HEAD_FAMILIES = {"cohere", "granite", "phi"}
VOCAB_SIZE = 300


def family_samples(lengths=(7, 12, 5, 9), seed=0) -> list[tuple[list[int], list[int]]]:
    """Samples longer than the tiny configs' 4-token windows, each with a masked prompt, as process_data writes."""
    rng = np.random.default_rng(seed)
    samples = []
    for length in lengths:
        ids = rng.integers(3, VOCAB_SIZE, size=length).tolist()
        samples.append((ids, [-100] * (length // 3) + ids[length // 3:]))
    return samples


def packed_batch(samples, device: torch.device | str = "cpu"):
    data = TokenizedData(
        input_ids=np.concatenate([ids for ids, _ in samples]).astype(np.int32),
        labels=np.concatenate([labels for _, labels in samples]).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum([len(ids) for ids, _ in samples])]),
        num_loss_tokens=np.array([sum(t != -100 for t in labels[1:]) for _, labels in samples]),
    )
    return pack_micro_batch(data, list(range(len(samples))), device)


def own_loss_sum(model, samples, attn_implementation="eager"):
    """The model's own loss, summed over the samples' loss tokens: its forward with labels, one sample at a time, in
    its own attention. For MoE models, plus router_aux_loss_coef x its auxiliary loss over all the samples' tokens
    (a padded batch, padding masked) once per loss token: what CausalLMWithSummedLoss adds for a micro-batch."""
    model.config._attn_implementation = attn_implementation
    moe = {"output_router_logits": False} if hasattr(model.config, "router_aux_loss_coef") else {}
    tensor = lambda rows: torch.tensor(rows, device=model.device)  # noqa: E731
    total, num_loss_tokens = 0.0, 0
    for ids, labels in samples:
        n = sum(t != -100 for t in labels[1:])
        output = model(input_ids=tensor([ids]), labels=tensor([labels]), use_cache=False, **moe)
        total = total + output.loss.float() * n
        num_loss_tokens += n
    if moe:
        longest = max(len(ids) for ids, _ in samples)
        input_ids = tensor([ids + [0] * (longest - len(ids)) for ids, _ in samples])
        mask = tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in samples])
        aux_loss = model(input_ids=input_ids, attention_mask=mask, use_cache=False, output_router_logits=True).aux_loss
        total = total + model.config.router_aux_loss_coef * aux_loss * num_loss_tokens
    return total


def trainer_loss_sum(model, samples, head_reason, loss_impl=None):
    """The trainer's summed loss: attention and loss path as train.py sets them up, given own_head_reason's verdict
    (which load_model finds on an fp32 copy of the model, in its own attention)."""
    model.config._attn_implementation = choose_attn_implementation(None)
    return CausalLMWithSummedLoss(model, use_liger=False, own_head_reason=head_reason, loss_impl=loss_impl)(
        packed_batch(samples, model.device))


def gradient_errors(model, loss, reference) -> dict[str, float]:
    """Per parameter, |grad of loss - grad of reference| / |grad of reference| (1e-8 absolute slack); a parameter
    that one of them does not use counts as a zero gradient."""
    parameters = dict(model.named_parameters())
    grads, reference_grads = (
        [torch.zeros_like(p) if g is None else g for p, g in zip(
            parameters.values(), torch.autograd.grad(x, list(parameters.values()), retain_graph=True,
                                                     allow_unused=True), strict=True)]
        for x in (loss, reference))
    return {name: ((a - b).norm() / (b.norm() + 1e-8)).item()
            for name, a, b in zip(parameters, grads, reference_grads, strict=True)}


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_trains_exactly(arch):
    model = build_tiny_model(VOCAB_SIZE, arch=arch, seed=1, tie_word_embeddings=None)
    model.config._attn_implementation = "eager"
    head_reason = own_head_reason(model)
    assert (head_reason is not None) == (arch in OWN_HEAD_FAMILIES)
    samples = family_samples()
    trainer = trainer_loss_sum(model, samples, head_reason)
    reference = own_loss_sum(model, samples)
    assert trainer.item() == pytest.approx(reference.item(), rel=1e-5)
    errors = gradient_errors(model, trainer, reference)
    assert max(errors.values()) <= 1e-5, {name: error for name, error in errors.items() if error > 1e-5}


@pytest.mark.parametrize("arch", sorted(OWN_HEAD_FAMILIES))
def test_hidden_times_lm_head_would_miss_these_heads(arch):
    """The check above can fail: the fast loss (hidden @ lm_head.weight.T) gets these heads' gradients wrong."""
    model = build_tiny_model(VOCAB_SIZE, arch=arch, seed=1, tie_word_embeddings=None)
    model.config._attn_implementation = "eager"
    samples = family_samples()
    fast = trainer_loss_sum(model, samples, None, loss_impl="chunked")
    assert max(gradient_errors(model, fast, own_loss_sum(model, samples)).values()) > 0.1


def test_leaking_attention_would_be_caught():
    """The check can fail: transformers' own eager attention on gpt-oss builds its mask without the packing, so a
    packed row through it lets samples see each other."""
    model = build_tiny_model(VOCAB_SIZE, arch="gpt_oss", seed=1, tie_word_embeddings=None)
    samples = family_samples()
    model.config._attn_implementation = "eager"
    leaky = CausalLMWithSummedLoss(model, use_liger=False)(packed_batch(samples))
    assert abs(leaky.item() / own_loss_sum(model, samples).item() - 1) > 1e-3


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_families_sdpa_refuses_train_through_train_py_on_cpu(tmp_path, tiny_tokenizer, arch):
    """Gemma 2 (attention softcap) and gpt-oss (sinks) used to crash on CPU in transformers' sdpa."""
    model_dir = tmp_path / arch
    build_tiny_model(len(tiny_tokenizer), arch=arch, tie_word_embeddings=None).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=8)
    result = run_train(["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir",
                        str(tmp_path / "run"), "--batch-size", "4", "--max-tokens-per-gpu", "64", "--num-epochs", "1",
                        "--learning-rate", "1e-3", "--num-warmup-steps", "0"])
    assert "attention packed" in result.stdout and "Traceback" not in result.stderr
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "training_metrics.jsonl")]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


def test_an_attention_feature_the_kernels_lack_is_refused_at_start(tmp_path, tiny_tokenizer):
    """Gemma 3 with bidirectional attention (as EmbeddingGemma has it): packed attention is causal, so the run stops
    before training, naming the feature, without a traceback."""
    model_dir = tmp_path / "bidirectional"
    model = build_tiny_model(len(tiny_tokenizer), arch="gemma3_text", tie_word_embeddings=None)
    model.config.use_bidirectional_attention = True
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=4)
    result = run_train(["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir",
                        str(tmp_path / "run"), "--batch-size", "4"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("error: cannot train Gemma3ForCausalLM exactly: Gemma3Attention asks for non-causal attention, which "
            "mini_trainer's packed attention does not implement") in result.stderr
    assert not (tmp_path / "run" / "training_metrics.jsonl").exists()
