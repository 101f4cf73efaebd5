"""GPU-only checks of the kernels CI cannot run: packed attention (flash varlen, flex for softcaps), Liger's fused
loss, and every family of tests/test_families.py through them in bf16.

Skipped without CUDA. Run on a GPU machine with `python -m pytest -q tests/test_gpu.py` (-s prints each family's
errors).
"""

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import run_train, write_tokenized_samples
from test_families import FAMILIES, VOCAB_SIZE, family_samples, own_loss_sum, trainer_loss_sum

from data import TokenizedData, pack_micro_batch
from model import (
    CausalLMWithSummedLoss,
    LinearCrossEntropySum,
    choose_attn_implementation,
    chunked_cross_entropy_sum,
    own_head_reason,
)
from tiny_model import build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_data(samples):
    return TokenizedData(
        input_ids=np.concatenate([s for s in samples]).astype(np.int32),
        labels=np.concatenate([s for s in samples]).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in samples])]),
        num_loss_tokens=np.array([len(s) - 1 for s in samples]),
    )


def decoder_output(model, batch):
    decoder = getattr(model, model.base_model_prefix)
    return decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                   cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                   max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).last_hidden_state[0].float()


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma"])
def test_packed_attention_equals_separate_sdpa(arch):
    """Packed micro-batch through packed attention == each sample alone through sdpa, in bf16."""
    device = torch.device("cuda")
    choose_attn_implementation(None)
    rng = np.random.default_rng(0)
    samples = [rng.integers(3, 300, n) for n in (37, 101, 5, 64)]
    model = build_tiny_model(300, arch=arch, seed=0).to(device, torch.bfloat16)
    wrapper = CausalLMWithSummedLoss(model, use_liger=False)
    data = packed_data(samples)
    batch = pack_micro_batch(data, list(range(len(samples))), device)

    model.config._attn_implementation = "sdpa"
    separate_batches = [pack_micro_batch(packed_data([s]), [0], device) for s in samples]
    separate_hidden = torch.cat([decoder_output(model, b) for b in separate_batches])
    separate_loss = sum(wrapper(b) for b in separate_batches)
    model.config._attn_implementation = "packed"
    packed_hidden = decoder_output(model, batch)
    packed_loss = wrapper(batch)
    packed_loss.backward()
    error = relative_error(packed_hidden, separate_hidden)
    assert error < 2e-2
    torch.testing.assert_close(packed_loss.float(), separate_loss.float(), rtol=2e-2, atol=1e-2)

    # The check can fail: one sequence over the whole row lets samples attend to each other.
    total = batch.num_tokens
    batch.cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=device)
    batch.max_seqlen = total
    leaky_error = relative_error(decoder_output(model, batch), separate_hidden)
    assert leaky_error > 5 * error, (leaky_error, error)


def test_liger_fused_loss_equals_chunked_loss():
    device = torch.device("cuda")
    torch.manual_seed(0)
    hidden = torch.randn(3000, 64, device=device, requires_grad=True)
    weight = torch.randn(5000, 64, device=device, requires_grad=True)
    targets = torch.randint(0, 5000, (3000,), device=device)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
    liger_grads = torch.autograd.grad(liger, [hidden, weight])
    chunked = chunked_cross_entropy_sum(hidden, weight, targets, softcap=None, chunk_size=1024)
    chunked_grads = torch.autograd.grad(chunked, [hidden, weight])
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(liger, reference, rtol=1e-4, atol=1e-3)
    for a, b in zip(liger_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("softcap", "chunk_mem_const"), [(None, 64), (None, 1), (30.0, 4)])
def test_linear_cross_entropy_sum_equals_reference(softcap, chunk_mem_const):
    """The loss train.py uses with Liger (no read-back to the host) against fp32 torch, in one or many chunks."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    hidden = torch.randn(3000, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5000, 64, device=device) * 0.3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 5000, (3000,), device=device)
    loss = LinearCrossEntropySum.apply(hidden, weight, targets, softcap, chunk_mem_const)
    grads = torch.autograd.grad(loss * 0.5, [hidden, weight])
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    reference_grads = torch.autograd.grad(reference * 0.5, [hidden, weight])
    torch.testing.assert_close(loss, reference, rtol=2e-3, atol=1e-2)
    for a, b in zip(grads, reference_grads, strict=True):
        assert a.dtype == torch.bfloat16
        assert relative_error(a.float(), b.float()) < 2e-2


def gradients(model, loss) -> torch.Tensor:
    """All of the model's gradients of `loss`, one fp32 vector (zeros for a parameter the loss does not use)."""
    parameters = list(model.parameters())
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten()
                      for p, g in zip(parameters, grads, strict=True)])


def family_errors(arch: str, use_liger: bool = False, drop_window: bool = False) -> dict:
    """The trainer in bf16 (packed attention on CUDA's kernels, the loss path train.py picks) and the model's own
    per-sample loss in bf16 (eager), each against the model's own per-sample loss in fp32: the loss's relative
    error and the gradients' (all parameters as one vector)."""
    device = torch.device("cuda")
    model32 = build_tiny_model(VOCAB_SIZE, arch=arch, seed=1, tie_word_embeddings=None)
    model32.config._attn_implementation = "eager"
    head_reason = own_head_reason(model32)  # as load_model: on the CPU, in fp32
    model32 = model32.to(device)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    samples = family_samples(lengths=(37, 101, 5, 64, 12))
    reference = own_loss_sum(model32, samples)
    reference_grads = gradients(model32, reference)
    baseline = own_loss_sum(model16, samples)
    baseline_grads = gradients(model16, baseline)
    if drop_window:
        model16.config.sliding_window = None
    trainer = trainer_loss_sum(model16, samples, head_reason, loss_impl="liger" if use_liger and not head_reason
                               else None)
    trainer_grads = gradients(model16, trainer)
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    errors = {"loss": abs(trainer.item() / reference.item() - 1), "loss_bf16_eager": abs(baseline.item() /
              reference.item() - 1), "grad": relative(trainer_grads, reference_grads),
              "grad_bf16_eager": relative(baseline_grads, reference_grads)}
    print(f"\nGPU family {arch}{' liger' if use_liger else ''}{' no-window' if drop_window else ''}: " +
          ", ".join(f"{name} {value:.2e}" for name, value in errors.items()))
    return errors


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_trains_exactly_on_gpu(arch):
    """bf16 tolerances: the trainer is no further from the fp32 truth than twice the model's own bf16 eager
    attention one sample at a time, or 1% (loss) and 3% (gradients)."""
    errors = family_errors(arch)
    assert errors["loss"] <= max(2 * errors["loss_bf16_eager"], 1e-2)
    assert errors["grad"] <= max(2 * errors["grad_bf16_eager"], 3e-2)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger_kernel")
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_oss"])
def test_family_with_liger_loss_on_gpu(arch):
    errors = family_errors(arch, use_liger=True)
    assert errors["loss"] <= max(2 * errors["loss_bf16_eager"], 1e-2)
    assert errors["grad"] <= max(2 * errors["grad_bf16_eager"], 3e-2)


def test_a_dropped_window_would_be_caught_on_gpu():
    """The family check can fail: the same model with its 4-token window switched off in the trainer only."""
    errors = family_errors("mistral_sliding", drop_window=True)
    assert errors["grad"] > 10 * max(errors["grad_bf16_eager"], 3e-2)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_train_py_on_gpu_with_softcaps_and_sinks(tmp_path, tiny_tokenizer, arch):
    """train.py end to end on CUDA, FSDP and bf16: flex_attention for Gemma 2's softcap, flash with sinks for
    gpt-oss (an MoE, with its router loss)."""
    model_dir = tmp_path / arch
    build_tiny_model(len(tiny_tokenizer), arch=arch, tie_word_embeddings=None).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = write_tokenized_samples(tmp_path / "data.jsonl", tiny_tokenizer, num_samples=16)
    result = run_train(["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir",
                        str(tmp_path / "run"), "--batch-size", "8", "--max-tokens-per-gpu", "128",
                        "--learning-rate", "1e-3", "--num-warmup-steps", "0"])
    assert "attention packed" in result.stdout
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "training_metrics.jsonl")]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) and not m["skipped"] for m in metrics)
